"""`tanbr export-pool` and `tanbr bench pool`: the built-in MoE as a pool of fine-tunes, and the proof
that a pool built back from it predicts what the built-in model predicts."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from tanbr_ray.cli.app import app, bench_app
from tanbr_ray.cli.output import write_json


@app.command("export-pool")
def export_pool_cmd(
    out: Path = typer.Argument(..., help="folder to write (must not exist, or be empty)"),
    model: str = typer.Option("default", "--model", help="the built-in preset to export: default | quick"),
    models_dir: Path = typer.Option(None, "--models-dir"),
    data_dir: Path = typer.Option(None, "--data-dir", help="GLUE copy, should the model need building first"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Write a built-in MoE as K BertForSequenceClassification checkpoints + base + parts + pool.yaml."""
    from tanbr_ray.moe.export import export_pool
    from tanbr_ray.moe.resolve import PRESETS, open_model

    if model not in PRESETS:
        raise typer.BadParameter(f"--model: export-pool writes a built-in preset {list(PRESETS)}, not {model!r}")
    built = open_model(model, models_dir, progress=progress, data_dir=data_dir, isolate=True)
    moe = built.moe
    t0 = time.perf_counter()
    try:
        path = export_pool(moe, moe.tokenizer, out, moe.identity["key"], (moe.max_len_single, moe.max_len_pair),
                           progress=progress)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"exported {moe.identity['key']} ({len(moe.tasks)} checkpoints) in {time.perf_counter() - t0:.1f} s")
    typer.echo(f"pool: {path}  (tanbr simulate model={path})")


@bench_app.command("pool")
def bench_pool_cmd(
    out: Path = typer.Option(..., "--out", help="folder the export is written to (must not exist, or be empty)"),
    model: str = typer.Option("default", "--model", help="the built-in preset: default | quick"),
    models_dir: Path = typer.Option(None, "--models-dir"),
    data_dir: Path = typer.Option(None, "--data-dir"),
    rows: int = typer.Option(64, "--rows", min=1, help="dev rows per task compared"),
    json_path: Path = typer.Option(None, "--json", help="write the result (with provenance) as JSON"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Export a built-in MoE, build it back with its parts and from the checkpoints alone, compare."""
    from tanbr_ray.bench.roundtrip import format_roundtrip, run_roundtrip
    from tanbr_ray.moe.resolve import PRESETS, open_model

    if model not in PRESETS:
        raise typer.BadParameter(f"--model: a built-in preset {list(PRESETS)}, not {model!r}")
    built = open_model(model, models_dir, progress=progress, data_dir=data_dir, isolate=True)
    res = run_roundtrip(built, out, models_dir, data_dir, rows, progress=progress)
    typer.echo(format_roundtrip(res))
    if json_path is not None:
        write_json(json_path, res)


@app.command("merge")
def merge_cmd(
    out: Path = typer.Argument(..., help="folder to write (must not exist, or be empty)"),
    x: str = typer.Option(..., "--x", help="merging weights, comma-separated, one per expert (feasible: ≥ 0, sum 1, "
                          "at most the model's budget non-zero)"),
    model: str = typer.Option("default", "--model", help="default | quick | path/to/pool.yaml"),
    operator: str = typer.Option(None, "--operator", help="linear | fisher | regmean (default: the model's)"),
    models_dir: Path = typer.Option(None, "--models-dir"),
    data_dir: Path = typer.Option(None, "--data-dir"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Write the model merged at x as one checkpoint per task that from_pretrained loads."""
    from tanbr_ray.moe.merged_checkpoint import write_merged
    from tanbr_ray.moe.resolve import open_model

    try:
        weights = [float(v) for v in x.split(",")]
        built = open_model(model, models_dir, progress=progress, data_dir=data_dir, isolate=True)
        paths = write_merged(built.moe, weights, operator, out)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"merged {built.moe.identity['key']} at x = {weights}: {len(paths)} checkpoints in {out}")
