"""`tanbr bench regret`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tanbr_ray.cli.app import bench_app
from tanbr_ray.cli.output import print_table, write_json
from tanbr_ray.router import registry


@bench_app.command("regret")
def bench_regret(
    rounds: int = typer.Option(2000, min=10, help="Rounds T per run."),
    seeds: int = typer.Option(5, min=1, help="Seeds per policy."),
    env: str = typer.Option("stationary", help="Task-mix schedule: stationary, drifting, switching."),
    policies: Optional[str] = typer.Option(None, help="Comma-separated policy names; default every policy that "
                                           "picks x (the registry's)."),
    experts: int = typer.Option(8, min=2, help="K experts."),
    tasks: int = typer.Option(8, min=1, help="V task types."),
    budget: int = typer.Option(8, min=1, help="B: non-zero merging weights allowed."),
    timing_experts: str = typer.Option("8,192", help="K values for the separate select() timing."),
    json_path: Optional[Path] = typer.Option(Path("results/bench_regret.json"), "--json", help="Write results JSON."),
    plot_path: Optional[Path] = typer.Option(Path("results/bench_regret.png"), "--plot", help="Write the PNG."),
) -> None:
    """Cumulative regret of router policies on a synthetic landscape with a known optimum."""
    from tanbr_ray.bench import regret

    names = None if policies is None else [p.strip() for p in policies.split(",") if p.strip()]
    try:
        out, curves = regret.run(rounds=rounds, seeds=seeds, schedule=env, policies=names,
                                 num_experts=experts, num_tasks=tasks, budget=budget)
        timing_ks = [int(k) for k in timing_experts.split(",") if k.strip()]
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    out["select_timing"] = [regret.select_timing(k, min(budget, k), calls=1000) for k in timing_ks]
    print_table(f"Regret at T={rounds}, {seeds} seeds, {out['env']}", regret.TABLE_HEADER, regret.table(out))
    if "Tanbr" in out["policies"]:
        tan = out["policies"]["Tanbr"]["regret_mean"]
        ratios = {n: tan / r["regret_mean"] for n, r in out["policies"].items()
                  if n != "Tanbr" and registry.POLICIES[n].kind != "reward argmax" and r["regret_mean"] > 0}
        out["tanbr_ratio"] = ratios
        typer.echo("Tanbr regret / other: " + ", ".join(f"{n} {v:.2f}" for n, v in ratios.items()))
    for t in out["select_timing"]:
        typer.echo(f"select() at K={t['num_experts']}, B={t['budget']} (tree grown {t['calls']} rounds): "
                   f"p50 {t['select_ms_p50']:.3f} ms, p99 {t['select_ms_p99']:.3f} ms")
    if json_path:
        write_json(json_path, out)
    if plot_path:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        regret.plot(out, curves, str(plot_path))
        typer.echo(f"wrote {plot_path}")
