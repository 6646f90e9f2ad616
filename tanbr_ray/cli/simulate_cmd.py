"""`tanbr simulate`: the main job — every policy on one simulated edge fleet, with a table and plots."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tanbr_ray.cli.app import app
from tanbr_ray.cli.output import print_table


@app.command("simulate", context_settings={"help_option_names": ["-h", "--help"]})
def simulate(
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Dotted overrides of the config, e.g. slots=60 schedule=switching tanbr.tree.rho=0.8"),
    config: Optional[Path] = typer.Option(None, "--config", help="Simulation YAML, merged onto the scenario its "
                                          "`base:` names (default: the embedded default); see `tanbr config`."),
    quick: bool = typer.Option(False, "--quick", help="Small MoE and a short run (about 2 minutes)."),
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
    memo: bool = typer.Option(True, "--memo/--no-memo", help="Reuse and keep exact predictions on disk, keyed by "
                              "model, serving spec and the example's content; a seeded sample of the reused ones "
                              "is recomputed and compared every run. --no-memo computes every prediction."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Simulate Tanbr and every baseline on an edge fleet; write results JSON/CSV, PNGs and a summary."""
    from tanbr_ray.moe import default_config, quick_config
    from tanbr_ray.moe.build import load_or_build_info
    from tanbr_ray.moe.store import weights_checksum
    from tanbr_ray.sim.config import DEFAULT_CONFIG, QUICK_CONFIG, load_config
    from tanbr_ray.sim.loop import run_simulation
    from tanbr_ray.sim.summary import RECOVERY_TOLERANCE
    from tanbr_ray.sim.report import format_paired, format_table, latency_ratios, provenance_line, write_results
    from tanbr_ray.sim.seeds import paired_section, run_seeds, seeds_section
    from tanbr_ray.tracking import log_simulation

    if backend not in ("local", "ray"):
        raise typer.BadParameter(f"--backend: {backend!r}; choose local or ray")
    if replicas is not None and backend != "ray":
        raise typer.BadParameter("--replicas: only the ray backend has replicas (add --backend ray)")
    if quick and config is not None:
        raise typer.BadParameter("--quick with --config: put `base: quick` in the config file instead")
    extra = list(overrides or [])
    if out is not None:
        extra.append(f"out={out}")
    if wandb is not None:
        extra.append(f"wandb={wandb}")
    try:
        cfg = load_config(config or (QUICK_CONFIG if quick else DEFAULT_CONFIG), extra)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    moe_cfg = quick_config() if cfg.model == "quick" else default_config()
    typer.echo(f"model: {moe_cfg.name} (built on first use, then reused from the models cache)")
    built = load_or_build_info(moe_cfg, cfg.models_dir, progress=progress, data_dir=cfg.data_dir)
    moe = built.moe
    memo_dir = built.cache_dir / "predictions" / weights_checksum(built.cache_dir)[:16] if memo else None
    if backend == "ray":
        from tanbr_ray.cluster.driver import run_ray_simulation

        def run(c):
            return run_ray_simulation(c, moe_cfg, moe, progress=progress, address=address, replicas=replicas)
    else:
        def run(c):
            return run_simulation(c, moe, progress=progress, memo_dir=memo_dir)
    seeds = cfg.seed_list()
    outs = run_seeds(cfg, run)
    result = outs[0]
    result.summary["seeds"] = seeds_section(outs, seeds)
    result.summary["paired"] = paired_section(outs)
    if len(outs) > 1:
        for sd, o in zip(seeds, outs):
            write_results(o, Path(cfg.out) / f"seed-{sd}")
    paths = write_results(result, cfg.out)
    header, rows = format_table(result.summary)
    s = result.summary
    print_table(f"{cfg.name}: {cfg.slots} slots × {len(result.nodes)} nodes, {s['requests']} requests "
                f"({cfg.scored_per_slot} scored per node-slot), schedule {cfg.schedule}, seed {seeds[0]}; "
                f"headline: 2nd-half credit", header, rows)
    for line in latency_ratios(s):
        typer.echo(line)
    if provenance_line(s):
        typer.echo(provenance_line(s))
    if s.get("memo"):
        m = s["memo"]
        typer.echo(f"prediction memo REFUSED, every prediction recomputed: {m['refused']}" if m["refused"] else
                   f"prediction memo: {m['hits']} predictions reused, {m['verified']} of them recomputed "
                   f"and equal ({m['file']})")
    if s["policies"].get("Tanbr", {}).get("recovery_slots"):
        typer.echo(f"Tanbr: slots until its gap to the oracle is back within {100 * RECOVERY_TOLERANCE:g} "
                   f"point(s) of its level before each mix change: {s['policies']['Tanbr']['recovery_slots']} "
                   f"(None = not within the run, or no full window before or after the change)")
    for line in format_paired(s):
        typer.echo(line)
    typer.echo(f"monitor error (total variation, second half): "
               + ", ".join(f"{k} {v:.3f}" for k, v in s["monitor_error_tv"].items()))
    walls = [o.summary["wall_seconds"] for o in outs]
    typer.echo(f"per seed: {s['requests_simulated']} requests served and queued, {s['scored_requests']} scored exactly "
               f"({s['model_forwards']} model forwards, {s['padded_tokens_per_real']:.2f} padded tokens per real one) "
               f"in {s['wall_seconds']:.1f} s: {s['scored_requests_per_second']:.0f} scored requests/s"
               + (f"; {len(outs)} seeds in {sum(walls):.0f} s" if len(outs) > 1 else ""))
    if "ray" in s:
        r = s["ray"]
        typer.echo(f"ray backend: {len(r['policies_on_cluster'])} policies on the cluster, {r['pushes']} pushes to "
                   f"{r['replicas']} replicas: p50 {r['push_seconds_p50']:.3f} s, p95 {r['push_seconds_p95']:.3f} s, "
                   f"{r['stale_replicas']} stale, {r['push_retries']} retries; cluster setup "
                   f"{r['cluster_setup_seconds']:.1f} s")
        for st in r["replicas_status"]:
            typer.echo(f"  replica {st['replica']} ({st['class']}): {len(st['nodes'])} nodes, models "
                       f"{st['resident_bytes'] / 2**20:.0f} MiB, peak RSS {st['peak_rss_bytes'] / 2**20:.0f} MiB")
    runs = []  # every seed's policies, each seed's runs beside its own results
    for sd, o in zip(seeds, outs):
        where = cfg.out if len(outs) == 1 else Path(cfg.out) / f"seed-{sd}"
        runs += log_simulation(o, where, group=cfg.name, mode=cfg.wandb, seed=None if len(outs) == 1 else sd)
    if runs:
        typer.echo(f"W&B: {len(runs)} runs logged ({len(outs)} seed(s)) under {Path(cfg.out)}")
    typer.echo(f"results: {Path(cfg.out).resolve()} ({', '.join(sorted(p.name for p in paths.values()))})")
