"""`tanbr serve`: the edge service (decision actors, mergers, one Serve deployment per node class, HTTP ingress)
on a local multi-node Ray cluster — the same app `serve deploy deployments/*.yaml` runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from tanbr_ray.cli.app import app, bench_app
from tanbr_ray.cli.output import print_table, write_json


@app.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
def serve_cmd(
    config: Optional[Path] = typer.Argument(None, help="A serve deploy file, e.g. deployments/tanbr_quick.yaml "
                                                       "(default: built-in args, model from --model)."),
    model: Optional[str] = typer.Option(None, "--model", help="default | quick | path/to/pool.yaml | a published "
                                        "model's cache name (overrides the file's)."),
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (default 127.0.0.1: loopback only)."),
    port: Optional[int] = typer.Option(None, "--port", help="HTTP port (default 8000)."),
    slot_seconds: Optional[float] = typer.Option(None, "--slot-seconds", help="Live slot length."),
    duration: float = typer.Option(0.0, "--duration", help="Stop after this many seconds (0: until Ctrl-C)."),
) -> None:
    """Serve merged models over HTTP: POST /v1/infer, GET /healthz, GET /v1/state."""
    from tanbr_ray.cluster.app import AppArgs
    from tanbr_ray.cluster.service import args_from_deploy_file, local_service

    try:
        args, http = args_from_deploy_file(config) if config else (AppArgs(), {})
        update = {k: v for k, v in {"model": model, "slot_seconds": slot_seconds}.items() if v is not None}
        args = AppArgs(**{**args.model_dump(), **update})
        home = None
        if args.model_source is None:  # built here on first use; the nodes fetch it from the cluster storage
            typer.echo(f"model: {args.model} (built on first use, then reused from the models cache)")
            home = args.open_model(progress=True).cache_dir
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    host, port = host or http.get("host", "127.0.0.1"), port or http.get("port", 8000)
    with local_service(args, host, port, model_dir=home) as url:
        typer.echo(f"serving on {url}: POST /v1/infer, GET /healthz, GET /v1/state (Ctrl-C stops)")
        try:
            t0 = time.monotonic()
            while duration <= 0 or time.monotonic() - t0 < duration:
                time.sleep(0.5)
        except KeyboardInterrupt:
            typer.echo("stopping")


@bench_app.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
def bench_serve(
    model: str = typer.Option("quick", "--model", help="default | quick | path/to/pool.yaml."),
    requests: int = typer.Option(1000, "--requests", min=1, max=100_000, help="Requests in the load test."),
    concurrency: int = typer.Option(16, "--concurrency", min=1, max=256),
    pushes: int = typer.Option(20, "--pushes", min=0, max=1000, help="Timed full weight pushes afterwards."),
    port: int = typer.Option(8765, "--port", help="Loopback port for the service."),
    json_path: Optional[Path] = typer.Option(Path("results/bench_serve.json"), "--json"),
) -> None:
    """Loopback HTTP load (p50/p99, errors) and weight-push times on the default fleet."""
    import asyncio
    import os

    from tanbr_ray.bench import serve as bench
    from tanbr_ray.cluster.app import AppArgs
    from tanbr_ray.cluster.service import local_service

    # a slot never closes on its own during the bench: pushes are timed one by one, under no load
    args = AppArgs(scenario=_scenario(model), model=model, slot_seconds=0, api={"rate_limit_per_s": 1e6, "rate_burst": 1_000_000})
    built = args.open_model(progress=True)
    home = built.cache_dir
    bodies = bench.request_bodies(list(built.moe.tasks), requests, os.environ.get("TANBR_DATA_DIR"))
    del built  # the nodes fetch it; this process need not hold it
    t0 = time.perf_counter()
    with local_service(args, "127.0.0.1", port, model_dir=home) as url:
        from tanbr_ray.cluster.decision_client import DecisionClient

        DecisionClient(args.router_name, args.router.decision_actors()).call("close_slot")  # every node gets a model
        setup = time.perf_counter() - t0
        typer.echo(f"service up in {setup:.1f} s on {url}; {requests} requests at concurrency {concurrency}")
        asyncio.run(bench.load(url, bodies[: min(64, requests)], concurrency))  # warm-up: models loaded
        out = {"load": asyncio.run(bench.load(url, bodies, concurrency)), "setup_seconds": setup, "model": model}
        out["push"] = bench.timed_pushes(pushes, args.router_name, args.router.decision_actors()) if pushes else {}
    ld, pu = out["load"], out["push"]
    typer.echo(f"load: {ld['requests']} requests, concurrency {ld['concurrency']}: {ld['errors']} errors, "
               f"p50 {ld['latency_ms_p50']:.1f} ms, p99 {ld['latency_ms_p99']:.1f} ms, "
               f"{ld['requests_per_second']:.1f} requests/s")
    if pu:
        typer.echo(f"push: {pu['pushes']} full pushes to {pu['replicas']} replicas: p50 {pu['push_seconds_p50']:.3f} s, "
                   f"p95 {pu['push_seconds_p95']:.3f} s, max {pu['push_seconds_max']:.3f} s, "
                   f"{pu['stale_replicas']} stale, {pu['push_retries']} retries")
    if json_path:
        write_json(json_path, out)


@bench_app.command("reliability", context_settings={"help_option_names": ["-h", "--help"]})
def bench_reliability(
    model: str = typer.Option("quick", "--model", help="default | quick | path/to/pool.yaml."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, max=64),
    gap: float = typer.Option(6.0, "--gap", min=1.0, max=120.0, help="Quiet seconds around each fault."),
    pair_gap: float = typer.Option(20.0, "--pair-gap", min=1.0, max=300.0,
                                   help="Seconds between killing the leader and then its successor."),
    slot_seconds: float = typer.Option(3.0, "--slot-seconds", min=0.5, max=60.0),
    port: int = typer.Option(8766, "--port", help="Loopback port for the service."),
    json_path: Optional[Path] = typer.Option(Path("results/bench_reliability.json"), "--json"),
    plot_path: Optional[Path] = typer.Option(Path("results/bench_reliability.png"), "--plot"),
) -> None:
    """Leader, merger, leader+standby, replica and corrupt-checkpoint faults under HTTP load;
    malformed requests and configs."""
    import os
    import tempfile

    from tanbr_ray.bench import reliability as rb
    from tanbr_ray.bench import serve as bench
    from tanbr_ray.cluster.app import AppArgs
    from tanbr_ray.cluster.names import LOOPBACK
    from tanbr_ray.cluster.service import local_service

    tmp = Path(tempfile.mkdtemp(prefix="tanbr-reliability-"))
    args = AppArgs(scenario=_scenario(model), model=model, slot_seconds=slot_seconds,
                   router={"policy": "Tanbr", "storage": str(tmp / "checkpoints"), "sample_per_slot": 8,
                           "standby": True, "mergers": 2},
                   api={"rate_limit_per_s": 1e6, "rate_burst": 1_000_000})
    built = args.open_model(progress=True)
    home = built.cache_dir
    bodies = bench.request_bodies(list(built.moe.tasks), 400, os.environ.get("TANBR_DATA_DIR"))
    del built  # the nodes fetch it; this process need not hold it
    t0 = time.perf_counter()
    with local_service(args, LOOPBACK, port, model_dir=home) as url:
        typer.echo(f"service up in {time.perf_counter() - t0:.1f} s on {url}; load at concurrency {concurrency}, "
                   f"a fault every ~{gap:.0f} s")
        load = rb.LoadThread(url, bodies, concurrency)
        load.start()
        try:
            raw = rb.run_faults(url, args.router_name, args.router.decision_actors(), args.router.storage,
                                load, gap, pair_gap)
        finally:
            load.stop.set()
            load.join()
        rows = rb.summarize_faults(load, raw, slot_seconds)
        faults_raw = [f for f in raw if "name" in f]
        ticks = list({(t["term"], t["slot"]): t for f in faults_raw for t in f["ticks"]}.values())
        takeovers = list({t["at"]: t for f in faults_raw for t in f["takeovers"]}.values())
        out = {"faults": rows, "malformed": rb.malformed(url, tmp / "configs"), "load": rb.load_summary(load, raw),
               "weights_lateness_all_slots": rb.weights_lateness(ticks),
               "takeovers": sorted(takeovers, key=lambda t: t["at"]),
               "final_state": raw[-1].get("final_state"), "model": model, "slot_seconds": slot_seconds,
               "concurrency": concurrency, "window_s": rb.WINDOW_S}
    if plot_path:
        rb.plot_timeline(load, raw, plot_path)
    fmt = lambda v: "–" if v != v else f"{v:.2f}"  # noqa: E731 - nan prints as a dash
    print_table("Faults under load", ["fault", "kill → next decision s", "kill → first served s", "slots lost",
                                      "errors in window", "errors outside", "weights late max s", "requests in window"],
                [[r["name"], fmt(r["kill_to_next_decision_s"]), fmt(r["kill_to_first_served_s"]), str(r["slots_lost"]),
                  str(r["errors_in_window"]), str(r["errors_outside_window"]), fmt(r["weights_late_max_s"]),
                  str(r["requests_in_window"])] for r in rows])
    ld, mf, wl = out["load"], out["malformed"], out["weights_lateness_all_slots"]
    typer.echo(f"load: {ld['requests']} requests at concurrency {ld['concurrency']}: p50 {ld['latency_ms_p50']:.1f} ms, "
               f"p99 {ld['latency_ms_p99']:.1f} ms, {ld['errors']} errors ({ld['errors_outside_fault_windows']} "
               f"outside fault windows); weights late over {wl['slots']} slots: p50 {wl['p50_s']:.2f} s, "
               f"max {wl['max_s']:.2f} s")
    typer.echo(f"malformed: {mf['4xx']}/{mf['sent']} requests refused with 4xx, {mf['5xx']} 5xx, "
               f"good request answered after {mf['good_request_after_each']}/{mf['sent']}; "
               f"{mf['configs_refused']}/{mf['configs']} malformed configs refused with a ValueError")
    if json_path:
        write_json(json_path, out)
        typer.echo(f"wrote {json_path}")
    if plot_path:
        typer.echo(f"wrote {plot_path}")


def _scenario(model: str) -> str:
    """The router a bench serves: the preset's own scenario, or the default one over a pool."""
    from tanbr_ray.moe.resolve import PRESETS

    return model if model in PRESETS else "default"
