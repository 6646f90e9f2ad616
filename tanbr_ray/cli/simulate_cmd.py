"""`tanbr simulate`: the main job — every policy on one simulated edge fleet, with a table and plots."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import numpy as np

import typer

from tanbr_ray.cli.app import app
from tanbr_ray.cli.output import print_table


@app.command("simulate", context_settings={"help_option_names": ["-h", "--help"]})
def simulate(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Dotted overrides of the config, e.g. slots=60 schedule=switching tanbr.tree.rho=0.8"),
    config: Optional[Path] = typer.Option(None, "--config", help="Simulation YAML, merged onto the scenario its "
                                          "`base:` names (default: the embedded default); see `tanbr config`."),
    quick: bool = typer.Option(False, "--quick", help="The small 4-task MoE and a 12-slot run (a few minutes, the build included)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results directory (overrides `out`)."),
    wandb: Optional[str] = typer.Option(None, "--wandb", help="online | offline | disabled (default: offline "
                                                               "unless a W&B key is configured)."),
    backend: str = typer.Option("local", "--backend", help="local | ray: drive router policies through a local "
                                                           "multi-node Ray cluster (decision actor, 2 mergers, "
                                                           "Serve replicas)."),
    address: Optional[str] = typer.Option(None, "--address", help="with --backend ray: join this Ray cluster "
                                                                   "instead of starting a local one."),
    replicas: Optional[int] = typer.Option(None, "--replicas", min=1, help="with --backend ray: edge replica "
                                           "processes in all, the fleet's nodes multiplexed onto them (at least "
                                           "one per class); default one per node."),
    wandb_project: Optional[str] = typer.Option(None, "--wandb-project", help="W&B project (default tanbr-ray)."),
    memo: bool = typer.Option(True, "--memo/--no-memo", help="Reuse and keep exact predictions on disk, keyed by "
                              "model, serving spec and the example's content; a seeded sample of the reused ones "
                              "is recomputed and compared every run. --no-memo computes every prediction."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Simulate Tanbr and every baseline on an edge fleet; write results JSON/CSV, PNGs and a summary."""
    from tanbr_ray.sim.report import write_results
    from tanbr_ray.sim.seeds import run_seeds, seed_dir

    if backend not in ("local", "ray"):
        raise typer.BadParameter(f"--backend: {backend!r}; choose local or ray")
    if replicas is not None and backend != "ray":
        raise typer.BadParameter("--replicas: only the ray backend has replicas (add --backend ray)")
    if quick and config is not None:
        raise typer.BadParameter("--quick with --config: put `base: quick` in the config file instead")
    cfg = _config(config, quick, [*(overrides or []), *([f"out={out}"] if out is not None else []),
                                  *([f"wandb={wandb}"] if wandb is not None else []),
                                  *([f"wandb_project={wandb_project}"] if wandb_project is not None else [])])
    built, memo_dir = _model(cfg, memo, progress)
    run, trackers = _runner(cfg, built.moe, memo_dir, backend, address, replicas, progress)
    outs = run_seeds(cfg, run)
    for sd, o in zip(cfg.seed_list(), outs):
        paths = write_results(o, seed_dir(cfg, sd))
        runs = trackers[sd].finish(o)  # the traces, table and plots join the runs logged live
        if runs:
            typer.echo(f"W&B: {len(runs)} runs logged under {seed_dir(cfg, sd)}")
    if len(outs) > 1:
        paths = write_results(outs[0], Path(cfg.out))  # the seeds' summary and paired intervals
    _print_report(cfg, outs)
    typer.echo(f"results: {Path(cfg.out).resolve()} ({', '.join(sorted(p.name for p in paths.values()))})")


def _config(config: Optional[Path], quick: bool, extra: list[str]):
    from tanbr_ray.sim.config import DEFAULT_CONFIG, QUICK_CONFIG, load_config

    try:
        return load_config(config or (QUICK_CONFIG if quick else DEFAULT_CONFIG), extra)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _model(cfg, memo: bool, progress: bool):
    """The MoE (built on first use, said beforehand) and its prediction memo's folder."""
    from tanbr_ray.moe.resolve import is_cached, open_model
    from tanbr_ray.sim.estimate import build_line

    typer.echo(build_line(cfg.model, is_cached(cfg.model, cfg.models_dir)))
    try:
        built = open_model(cfg.model, cfg.models_dir, progress=progress, data_dir=cfg.data_dir, isolate=True)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    memo_dir = built.cache_dir / "predictions" / built.moe.identity["weights_sha256"][:16] if memo else None
    return built, memo_dir


def _runner(cfg, moe, memo_dir, backend: str, address, replicas, progress: bool):
    """One seed's run (local or on Ray), logged to W&B live, after saying what the whole job costs."""
    import torch

    from tanbr_ray.sim.costs import host_costs
    from tanbr_ray.sim.estimate import estimate
    from tanbr_ray.sim.fleet import load_fleet
    from tanbr_ray.sim.loop import run_simulation
    from tanbr_ray.sim.memo import stored_entries
    from tanbr_ray.sim.seeds import seed_dir
    from tanbr_ray.tracking import SimulationTracker

    precision = "bf16" if cfg.bf16 else "fp32"
    held = stored_entries(memo_dir, cfg.merge_operator or moe.merge_operator, precision) if memo_dir else 0
    rates = [c.rate for _, c in load_fleet(cfg.fleet).nodes()]
    moe.merged_state(np.full(moe.num_experts, 1.0 / moe.num_experts), cfg.merge_operator)  # one-off set-up
    t0 = time.perf_counter()
    moe.merged_state(np.arange(1.0, moe.num_experts + 1) / (moe.num_experts * (moe.num_experts + 1) / 2), cfg.merge_operator)
    merge_s = time.perf_counter() - t0
    for line in estimate(cfg, host_costs(moe, cfg.bf16, cfg.calibration, cfg.queue.max_batch, cfg.data_dir),
                         rates, merge_s, held, torch.get_num_threads()).lines():
        typer.echo(line)
    multi = len(cfg.seed_list()) > 1
    trackers: dict = {}

    def run(c):
        tracker = trackers[c.seed] = SimulationTracker(c.model_dump(), seed_dir(cfg, c.seed), c.wandb_project,
                                                       cfg.name, c.wandb, c.seed if multi else None)
        if backend == "ray":
            from tanbr_ray.cluster.driver import run_ray_simulation

            out = run_ray_simulation(c, moe, progress=progress, address=address, replicas=replicas,
                                     on_slot=tracker.on_slot)
        else:
            out = run_simulation(c, moe, progress=progress, memo_dir=memo_dir, on_slot=tracker.on_slot)
        return out
    return run, trackers


def _print_report(cfg, outs) -> None:
    """The table of every policy, then what qualifies it: latency ratios, provenance, memo, recovery,
    Tanbr's paired intervals, the monitor's error, throughput, and the cluster's figures."""
    from tanbr_ray.sim.report import format_paired, format_table, latency_ratios, provenance_line
    from tanbr_ray.sim.summary import RECOVERY_TOLERANCE

    s = outs[0].summary
    header, rows = format_table(s)
    print_table(f"{cfg.name}: {cfg.slots} slots × {len(outs[0].nodes)} nodes, {s['requests']} requests "
                f"({cfg.scored_per_slot} scored per node-slot), schedule {cfg.schedule}, seed {cfg.seed_list()[0]}; "
                f"headline: 2nd-half credit", header, rows)
    lines = [*latency_ratios(s), *([provenance_line(s)] if provenance_line(s) else [])]
    if s.get("memo"):
        m = s["memo"]
        lines.append(f"prediction memo REFUSED, every prediction recomputed: {m['refused']}" if m["refused"] else
                     f"prediction memo: {m['hits']} predictions reused, {m['verified']} of them recomputed "
                     f"and equal ({m['file']})")
    if s["policies"].get("Tanbr", {}).get("recovery_slots"):
        lines.append(f"Tanbr: slots until its gap to the oracle is back within {100 * RECOVERY_TOLERANCE:g} "
                     f"point(s) of its level before each mix change: {s['policies']['Tanbr']['recovery_slots']} "
                     f"(None = not within the run, or no full window before or after the change)")
    lines += format_paired(s)
    lines.append("monitor error (total variation, second half): "
                 + ", ".join(f"{k} {v:.3f}" for k, v in s["monitor_error_tv"].items()))
    walls = [o.summary["wall_seconds"] for o in outs]
    lines.append(f"per seed: {s['requests_simulated']} requests served and queued, {s['scored_requests']} scored "
                 f"exactly ({s['model_forwards']} model forwards, {s['padded_tokens_per_real']:.2f} padded tokens per "
                 f"real one) in {s['wall_seconds']:.1f} s: {s['scored_requests_per_second']:.0f} scored requests/s"
                 + (f"; {len(outs)} seeds in {sum(walls):.0f} s" if len(outs) > 1 else ""))
    lines += _ray_lines(s.get("ray"))
    for line in lines:
        typer.echo(line)


def _ray_lines(r: dict | None) -> list[str]:
    if not r:
        return []
    out = [f"ray backend: {len(r['policies_on_cluster'])} policies on the cluster, {r['pushes']} pushes to "
           f"{r['replicas']} replicas: p50 {r['push_seconds_p50']:.3f} s, p95 {r['push_seconds_p95']:.3f} s, "
           f"{r['stale_replicas']} stale, {r['push_retries']} retries; cluster setup {r['cluster_setup_seconds']:.1f} s"]
    for st in r["replicas_status"]:
        out.append(f"  replica {st['replica']} ({st['class']}): {len(st['nodes'])} nodes, models "
                   f"{st['resident_bytes'] / 2**20:.0f} MiB, peak RSS {st['peak_rss_bytes'] / 2**20:.0f} MiB")
    return out
