"""`tanbr bench fidelity`: the simulator's latency against a real Serve replica's, on this host."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from tanbr_ray.cli.app import bench_app
from tanbr_ray.cli.output import print_table, write_json


@bench_app.command("fidelity", context_settings={"help_option_names": ["-h", "--help"]})
def bench_fidelity(
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted scenario overrides (queue.max_wait_ms=10)."),
    scenario: str = typer.Option("default", "--scenario", help="default | quick | a simulation YAML: the model, "
                                 "precision and queue settings to measure."),
    quick: bool = typer.Option(False, "--quick", help="30 s per load level instead of 120."),
    seconds: Optional[float] = typer.Option(None, "--seconds", min=5.0, max=3600.0, help="Trace length per load level."),
    json_path: Optional[Path] = typer.Option(Path("results/bench_fidelity.json"), "--json"),
    plot_path: Optional[Path] = typer.Option(Path("results/bench_fidelity.png"), "--plot"),
) -> None:
    """Calibrate a replica's service times, replay seeded Poisson traces at 30/60/90 % of its capacity
    through it and through the simulator's queue, and compare p50/p95/p99 (merged and top-1)."""
    import ray
    from ray import serve

    from tanbr_ray.bench.fidelity import FidelityPlan, plot_cdfs, run_fidelity
    from tanbr_ray.fileio import atomic_write_json
    from tanbr_ray.moe.resolve import open_model
    from tanbr_ray.moe.store import model_identity
    from tanbr_ray.sim.calibration import calibration_path
    from tanbr_ray.sim.config import load_config

    try:
        cfg = load_config(scenario, overrides or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    plan = FidelityPlan(seconds=seconds or (30.0 if quick else 120.0), runs=3 if quick else 5,
                        calibration_seconds=20.0 if quick else 60.0)
    try:
        built = open_model(cfg.model, cfg.models_dir, progress=True, data_dir=cfg.data_dir, isolate=True)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    minutes = len(plan.modes) * (len(plan.levels) * plan.seconds + plan.calibration_seconds) / 60
    typer.echo(f"model {built.cache_dir.name}, {'bf16' if cfg.bf16 else 'fp32'}, queue {cfg.queue.max_batch} requests / "
               f"{cfg.queue.max_wait_ms:g} ms; traces take {minutes:.0f} min plus calibration; keep the host otherwise idle")
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        out = run_fidelity(built.moe, cfg.queue, cfg.bf16, plan, cfg.data_dir, progress=typer.echo)
    finally:
        serve.shutdown()
        ray.shutdown()
    traces = out.pop("traces")
    path = calibration_path(built.cache_dir, cfg.bf16)
    atomic_write_json(path, out["calibration"])
    typer.echo(f"calibration stored in {path} (`tanbr simulate` with calibration: auto uses it)")
    out.update(model=model_identity(built.moe), scenario=scenario, wall_seconds=time.perf_counter() - t0)
    _table(out["levels"])
    if plot_path:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot_cdfs(traces, plot_path)
        typer.echo(f"wrote {plot_path}")
    if json_path:
        write_json(json_path, out)


def _table(levels: list[dict]) -> None:
    def cell(r: dict, p: str) -> str:
        return f"{r['real_ms'][p]:.1f} / {r['sim_ms'][p]:.1f} ({r['rel_err'][p]:+.0%})"

    print_table("replica vs simulator: real / simulated ms (relative error of the simulator)",
                ["load", "mode", "requests", "errors", "p50", "p95", "p99", "mean batch real / sim"],
                [[f"{r['load']:.0%}", r["mode"], r["requests"], r["errors"], cell(r, "p50"), cell(r, "p95"),
                  cell(r, "p99"), f"{r['mean_batch']['real'] or 0:.1f} / {r['mean_batch']['sim']:.1f}"]
                 for r in levels])
