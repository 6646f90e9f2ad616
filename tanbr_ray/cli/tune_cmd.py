"""`tanbr tune CONFIG`: a Ray Tune sweep of Tanbr's settings, with a trial table, plots and W&B."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tanbr_ray.cli.app import app
from tanbr_ray.cli.output import print_table


@app.command("tune", context_settings={"help_option_names": ["-h", "--help"]})
def tune_cmd(
    config: Path = typer.Argument(..., help="Sweep YAML, e.g. tune_configs/rho.yaml."),
    overrides: Optional[List[str]] = typer.Argument(
        None, help="Dotted overrides: the sweep file's keys (num_samples=4 scheduler=fifo) or, any other, the "
        "simulation every trial runs (slots=10 tanbr.tree.nu=0.02; sim.<key> forces it)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results directory (default: the YAML's `out`)."),
    wandb: Optional[str] = typer.Option(None, "--wandb", help="online | offline | disabled (default: offline "
                                                               "unless a W&B key is configured)."),
) -> None:
    """Sweep rho, slot length, tree thresholds (any simulation setting) with Ray Tune; ASHA stops bad trials."""
    from tanbr_ray.tune.config import load_tune_config
    from tanbr_ray.tune.sweep import ranked, run_sweep

    try:
        spec, sim_raw = load_tune_config(config, list(overrides or []))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    res = run_sweep(spec, sim_raw, config_dir=config.resolve().parent, out=out, wandb=wandb)
    keys = list(spec.search_space) + (["seed"] if spec.seeds else [])
    header = ["trial", *keys, spec.metric, "slots", "status", "final score"]
    rows = []
    for r in ranked(res.rows, spec):
        status = "done" if r["completed"] else ("error" if r["error"] else "stopped")
        final = r.get("final/score")
        rows.append([r["trial_id"], *[_fmt(r[k]) for k in keys], _fmt(r[spec.metric]), r["slots_run"], status,
                     _fmt(final)])
    print_table(f"tune {spec.name}: {len(res.rows)} trials in {res.wall_seconds:.0f} s "
                f"({spec.scheduler}, {spec.metric} {spec.mode})", header, rows)
    if spec.seeds and res.settings:
        print_table(f"settings over {len(spec.seeds)} seeds, best first (95 % Student-t intervals; 'yes' = the seeds "
                    f"cannot tell it from the best; paired = minus the best on the same seeds)",
                    [*spec.search_space, "seeds", f"mean {spec.metric}", "95 % interval", "overlaps best",
                     "paired vs best [95 %]"],
                    [[*(_fmt(st[k]) for k in spec.search_space), str(st["seeds"]), f"{st['mean']:.4f}",
                      _interval(st["ci95"]), {True: "yes", False: "no", None: "–"}[st["overlaps_best"]],
                      _paired_cell(st["vs_best_paired"])] for st in res.settings])
    if res.best is not None:
        best = ", ".join(f"{k}={_fmt(res.best[k])}" for k in spec.search_space)
        over = f", mean of {res.best['replicates']} seeds" if res.best.get("replicates") else ""
        typer.echo(f"best: {best} ({spec.metric}={res.best[spec.metric]:.4f}{over})")
    if res.wandb_runs:
        wdir = res.out_dir / "wandb"
        typer.echo(f"W&B: {res.wandb_runs} runs under {wdir} (upload: wandb sync {wdir})")
    typer.echo(f"results: {res.out_dir} ({', '.join(sorted(p.name for p in res.files.values()))})")
    if not any(r["completed"] for r in res.rows):
        raise typer.Exit(1)


def _interval(ci) -> str:
    return "–" if ci is None else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def _paired_cell(p: dict | None) -> str:
    return "–" if p is None else f"{p['mean']:+.4f} {_interval(p['ci95'])}"


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
