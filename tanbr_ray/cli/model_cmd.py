"""`tanbr build-moe` and `tanbr bench model`: build/cache the task-expert MoE and benchmark it."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer

from tanbr_ray.cli.app import app, bench_app
from tanbr_ray.cli.output import write_json


def _setup(threads: int | None, data_dir: Path | None):
    import torch

    if threads:
        torch.set_num_threads(threads)
    if data_dir is not None:
        os.environ["TANBR_DATA_DIR"] = str(data_dir)


def _config(quick: bool, config: Path | None):
    from tanbr_ray.moe.config import load_config, quick_config, default_config

    if config is not None:
        return load_config(config)
    return quick_config() if quick else default_config()


MODEL_HELP = "default | quick | path/to/pool.yaml (a pool of fine-tunes, or kind: native for a MoE checkpoint)"


def _built(model: str | None, quick: bool, config: Path | None, models_dir, progress: bool, data_dir=None,
           rebuild: bool = False, isolate: bool = False):
    """The model a command runs on: --model (any model), else --config / --quick (the built-in MoE)."""
    from tanbr_ray.moe.build import load_or_build_info
    from tanbr_ray.moe.config import default_models_dir
    from tanbr_ray.moe.resolve import open_model

    if model is not None:
        if quick or config is not None:
            raise typer.BadParameter("--model names the model; drop --quick / --config")
        try:
            return open_model(model, models_dir, progress=progress, data_dir=data_dir, rebuild=rebuild, isolate=isolate)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from exc
    return load_or_build_info(_config(quick, config), models_dir or default_models_dir(), progress=progress,
                              data_dir=data_dir, rebuild=rebuild, isolate=isolate)


@app.command("build-moe")
def build_moe_cmd(
    quick: bool = typer.Option(False, "--quick", help="small 4-task MoE (short sequences): under 5 min on 2 CPU cores"),
    models_dir: Path = typer.Option(None, "--models-dir", help="default $TANBR_MODELS_DIR or ~/.cache/tanbr_ray/models"),
    data_dir: Path = typer.Option(None, "--data-dir", help="GLUE copy (<TASK>/{train,dev}.jsonl); default $TANBR_DATA_DIR, else the hub"),
    config: Path = typer.Option(None, "--config", help="YAML/JSON MoEConfig instead of the default/quick preset"),
    model: str = typer.Option(None, "--model", help=MODEL_HELP),
    rebuild: bool = typer.Option(False, "--rebuild", help="build even if a valid cache exists"),
    threads: int = typer.Option(None, "--threads", min=1, help="torch CPU threads (1 is faster when the cores are shared)"),
    publish: str = typer.Option(None, "--publish", help="also upload it to this storage location (a path every "
                                "machine mounts, or s3://... / gs://...): mergers and Tune trials on other machines "
                                "fetch it from there (pass it as model_source) instead of building it"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Build a model (the default task-expert MoE, or --model's) or reuse its cache; print where it lives."""
    _setup(threads, data_dir)
    t0 = time.perf_counter()
    built = _built(model, quick, config, models_dir, progress, data_dir, rebuild)
    took = time.perf_counter() - t0
    moe, info = built.moe, built.build_info
    typer.echo(f"MoE {built.cache_dir.name}: tasks {moe.tasks}, {moe.num_experts} experts in layers {moe.moe_layers}"
               + ("" if moe.expert_map == "task" else f"; task -> expert by {moe.expert_map}: {moe.expert_of}"))
    typer.echo(f"cache: {built.cache_dir}")
    typer.echo(f"build time (recorded): {info.get('build_seconds', float('nan')):.1f}s; this run: {took:.1f}s")
    if info.get("stages"):
        typer.echo("stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in info["stages"].items()))
    if publish:
        from tanbr_ray.moe.publish import publish as publish_model

        try:
            where = publish_model(built.cache_dir, publish)
        except (ValueError, OSError) as exc:
            raise typer.BadParameter(f"--publish: {exc}") from exc
        typer.echo(f"published: {where} (in a deploy file's args: model: {built.cache_dir.name}, "
                   f"model_source: {publish})")


@bench_app.command("model")
def bench_model_cmd(
    quick: bool = typer.Option(False, "--quick", help="benchmark the quick MoE"),
    models_dir: Path = typer.Option(None, "--models-dir"),
    data_dir: Path = typer.Option(None, "--data-dir", help="evaluate on this copy of the GLUE layout"),
    config: Path = typer.Option(None, "--config"),
    model: str = typer.Option(None, "--model", help=MODEL_HELP),
    json_path: Path = typer.Option(None, "--json", help="write the full result as JSON"),
    eval_examples: int = typer.Option(None, "--eval-examples", min=1, help="dev examples per task for mode scores (default all)"),
    mixes: int = typer.Option(6, "--mixes", min=1, help="node mixes drawn from Dirichlet(0.3) over the tasks"),
    landscape_examples: int = typer.Option(300, "--landscape-examples", min=4, help="dev examples per task (halved: choose / score)"),
    random_candidates: int = typer.Option(100, "--random-candidates", min=0, help="random feasible x in the wider search"),
    screen_examples: int = typer.Option(40, "--screen-examples", min=1, help="selection-half examples per task that screen the random x"),
    finalists: int = typer.Option(2, "--finalists", min=0, help="best screened random x per mix scored on both halves"),
    budget: int = typer.Option(3, "--budget", min=1, help="non-zeros in x (the fleet's nodes use 2-4)"),
    layer_split: bool = typer.Option(False, "--layer-split", help="also try one ψ power per half of the MoE layers (4x4 pairs a mix)"),
    bf16: bool = typer.Option(False, "--bf16/--fp32", help="score under bfloat16 autocast (~2x faster on CPU); latency stays fp32"),
    runs: int = typer.Option(20, "--runs", min=1, help="timed runs per latency point (after warm-up)"),
    threads: int = typer.Option(None, "--threads", min=1),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Latency, bytes and scores per mode; each expert; merge cost; the landscape per operator."""
    from tanbr_ray.bench.model import format_table, run_bench

    _setup(threads, data_dir)
    built = _built(model, quick, config, models_dir, progress, data_dir, isolate=True)
    res = run_bench(
        built.moe,
        data_dir=data_dir,
        build_info=built.build_info,
        eval_examples=eval_examples,
        mixes=mixes,
        landscape_examples=landscape_examples,
        random_candidates=random_candidates,
        screen_examples=screen_examples,
        finalists=finalists,
        budget=budget,
        layer_split=layer_split,
        bf16=bf16,
        runs=runs,
        progress=progress,
    )
    typer.echo(format_table(res))
    if json_path is not None:
        write_json(json_path, res)


@bench_app.command("merge")
def bench_merge_cmd(
    quick: bool = typer.Option(False, "--quick", help="benchmark the quick MoE"),
    models_dir: Path = typer.Option(None, "--models-dir"),
    config: Path = typer.Option(None, "--config"),
    model: str = typer.Option(None, "--model", help=MODEL_HELP),
    json_path: Path = typer.Option(None, "--json", help="write merge_ms_p50 / prepare_ms as JSON"),
    runs: int = typer.Option(20, "--runs", min=1, help="merges timed per operator (x drawn over all experts)"),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(None, "--threads", min=1),
):
    """Merge cost per operator alone (the same timing as `bench model`, in seconds instead of minutes)."""
    import torch

    from tanbr_ray.bench.model import merge_timing
    from tanbr_ray.moe.merge import OPERATORS

    _setup(threads, None)
    built = _built(model, quick, config, models_dir, True)
    ops = [op for op in OPERATORS if op == "linear" or built.moe.stats is not None]
    merge_ms, prep_ms = merge_timing(built.moe, ops, runs, seed)
    typer.echo(f"{'operator':10s} {'merge ms p50':>13s} {'one-off set-up ms':>18s}")
    for op in ops:
        typer.echo(f"{op:10s} {merge_ms[op]:13.1f} {prep_ms.get(op, 0.0):18.1f}")
    if json_path is not None:
        write_json(json_path, {"merge_ms_p50": merge_ms, "prepare_ms": prep_ms, "runs": runs,
                               "num_experts": built.moe.num_experts, "threads": torch.get_num_threads()})
