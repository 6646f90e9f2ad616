"""`tanbr bench fleet`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tanbr_ray.cli.app import bench_app
from tanbr_ray.cli.output import print_table, write_json


@bench_app.command("fleet")
def bench_fleet(
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted overrides of the simulation config."),
    fleets: str = typer.Option("8,32,128", help="Comma-separated packaged fleet names (8, 32, 128, default) "
                                                "or fleet YAML paths."),
    slots: int = typer.Option(4, min=2, help="Slots simulated per fleet (the first is left out of the means)."),
    quick: bool = typer.Option(False, "--quick", help="The quick MoE instead of the default one."),
    grow: int = typer.Option(1000, min=1, help="Rounds the timed Tanbr is grown for, node by node."),
    calls: int = typer.Option(20, min=1, help="Timed select_many / update_many calls per K."),
    json_path: Optional[Path] = typer.Option(Path("results/bench_fleet.json"), "--json", help="Write results JSON."),
    plot_path: Optional[Path] = typer.Option(Path("results/bench_fleet.png"), "--plot", help="Write the PNG."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Slot cost against fleet size (decide / merge / score / rest) and batched decision timing."""
    from tanbr_ray.bench import fleet as bench
    from tanbr_ray.moe import default_config, quick_config
    from tanbr_ray.moe.build import load_or_build_info
    from tanbr_ray.sim.fleet import load_fleet

    names = [f.strip() for f in fleets.split(",") if f.strip()]
    try:
        for f in names:
            load_fleet(f)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    moe_cfg = quick_config() if quick else default_config()
    built = load_or_build_info(moe_cfg, None, progress=progress)
    extra = list(overrides or []) + (["model=quick"] if quick else [])
    try:
        out = bench.run(built.moe, names, slots, grow, calls, extra, progress)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    out["model"] = moe_cfg.name
    print_table(f"Slot cost, local backend, Tanbr, {slots} slots (means over slots 2..{slots})",
                bench.TABLE_HEADER, bench.table(out))
    typer.echo(f"cost log-log slope {out['cost_slope']:.3f} over {out['nodes']} nodes; decide share at "
               f"{max(out['nodes'])} nodes {out['decide_share_at_max']:.4f}")
    for t in out["decision_timing"]:
        typer.echo(f"K={t['num_experts']} B={t['budget']}, tree grown {t['grown_rounds']} rounds "
                   f"({t['candidates']} candidates): select_many({t['nodes']}) {t['select_many_ms_p50']:.2f} ms, "
                   f"update_many({t['nodes']}) {t['update_many_ms_p50']:.2f} ms, select() p50 "
                   f"{t['select_ms_p50']:.3f} ms, p99 {t['select_ms_p99']:.3f} ms")
    print_table("Targets", ["target", "measured", "limit", ""], bench.targets(out))
    if json_path:
        write_json(json_path, out)
    if plot_path:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        bench.plot(out, str(plot_path))
        typer.echo(f"wrote {plot_path}")
