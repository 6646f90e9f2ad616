"""`tanbr bench fidelity`: how close the simulator's latencies come to a real replica's on this host.

Per serving mode (merged, top-1): a Serve replica (`cluster.mode_replica`, the edge replicas'
batcher and serving code) first calibrates: it times its own batches of 1..max_batch dev requests in
isolation, then serves a calibration trace (Poisson, its rate stepping from 20 to 95 % of capacity)
whose batches give the service time per size as served, and whose round trips give the per-request
overhead outside the replica. Then one seeded Poisson trace per load level (a share of the capacity,
max_batch requests per full-batch time) goes through the replica, open loop, and the same trace
through the simulator's queue (`sim.queueing`) on the calibrated times at slowdown 1. Calibration and
validation use different rows and different traces. The calibration is stored where `tanbr simulate`
finds it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from dataclasses import dataclass

import numpy as np

from tanbr_ray.sim.calibration import ITEMS_SEED, Calibration, calibration_items, host_identity
from tanbr_ray.sim.queueing import QueueConfig, interpolate_service, simulate_queue, spread_service

LEVELS = (0.3, 0.6, 0.9)
MODES = ("merged", "top1")
TRACE_SEED = 7  # the validation traces (the calibration's rows use sim.calibration.ITEMS_SEED)
TRACE_ROWS_SEED = ITEMS_SEED + 1
CAL_TRACE_SEED = 1000  # the calibration trace: another seed than every validation trace
PCTS = (50, 95, 99)


@dataclass(frozen=True)
class FidelityPlan:
    seconds: float = 120.0  # per load level and mode
    levels: tuple[float, ...] = LEVELS
    modes: tuple[str, ...] = MODES
    runs: int = 5  # timed runs per batch size in the isolated timing
    calibration_seconds: float = 60.0  # the calibration trace (its own seed and rows)
    threads: int = 1  # torch threads of the replica (an edge replica's default)


def poisson_trace(rate: float, seconds: float, seed: int) -> np.ndarray:
    """Arrival times (s) of a Poisson process of `rate` per second over `seconds`."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, int(rate * seconds * 1.5) + 10)
    t = np.cumsum(gaps)
    return t[t < seconds]


def pcts(ms: np.ndarray) -> dict[str, float]:
    v = ms[np.isfinite(ms)]
    return {f"p{p}": float(np.percentile(v, p)) if len(v) else float("nan") for p in PCTS}


def simulated(arrivals: np.ndarray, batch_ms: list[float], overhead_ms: float, queue: QueueConfig,
              spread=(), seed: int = 0) -> dict:
    """The simulator's view of one trace: latency (ms) per request and its batches (service times
    drawn around the calibrated ones by `spread`, as `sim.costs` draws them)."""
    service = interpolate_service(list(range(1, len(batch_ms) + 1)), batch_ms)
    q = simulate_queue(arrivals, spread_service(service, spread, np.random.default_rng(seed)), queue)
    return {"latency_ms": q.latency_s * 1e3 + overhead_ms, "batches": q.batches, "served": q.served}


def capacity(batch_ms: list[float]) -> float:
    """Requests per second a replica serves in full batches back to back."""
    return len(batch_ms) / (batch_ms[-1] / 1e3)


def level_row(load: float, mode: str, rate: float, real: dict, sim: dict, batch_sizes: list[int]) -> dict:
    r, s = pcts(real["latency_ms"]), pcts(sim["latency_ms"])
    served = int(np.isfinite(real["latency_ms"]).sum())
    return {"load": load, "mode": mode, "rate_per_s": rate, "requests": len(real["latency_ms"]), "served": served,
            "errors": len(real["errors"]), "error_samples": real["errors"][:3],
            "real_ms": r, "sim_ms": s, "rel_err": {k: (s[k] - r[k]) / r[k] for k in r},
            "mean_batch": {"real": float(np.mean(batch_sizes)) if batch_sizes else None,
                           "sim": sim["served"] / max(sim["batches"], 1)},
            "batched_requests": int(sum(batch_sizes)),
            "send_lag_ms_p99": float(np.percentile(real["send_lag_ms"], 99)),
            "replica_ms_p50": float(np.nanmedian(real["replica_ms"]))}


def fill_batch_times(records: list[tuple[int, float]], max_batch: int) -> list[float]:
    """ms per batch size 1..max_batch from served batches: each size's median where it was served,
    a least-squares line through those medians (weighted by count) where it was not."""
    by = {}
    for size, s, *_ in records:
        by.setdefault(int(size), []).append(s * 1e3)
    seen = sorted(b for b in by if b <= max_batch)
    if len(seen) < 2:
        raise ValueError(f"the calibration trace served batches of {seen} only: too few sizes to fit")
    med = {b: float(np.median(by[b])) for b in seen}
    slope, icpt = np.polyfit(seen, [med[b] for b in seen], 1, w=[np.sqrt(len(by[b])) for b in seen])
    return [med.get(b, max(icpt + slope * b, 1e-3)) for b in range(1, max_batch + 1)]


def service_spread(records: list[tuple], batch_ms: list[float]) -> list[float]:
    """Quantiles (0, 5, …, 100 %) of each served batch's time over its size's calibrated time."""
    ratios = [s * 1e3 / batch_ms[size - 1] for size, s, *_ in records if 1 <= size <= len(batch_ms)]
    return [float(q) for q in np.quantile(ratios, np.linspace(0.0, 1.0, 21))] if ratios else []


def calibration_trace(rate_full: float, seconds: float, seed: int) -> np.ndarray:
    """A Poisson trace whose rate steps through 20 … 95 % of capacity, so every batch size is served."""
    steps = (0.2, 0.4, 0.6, 0.8, 0.95)
    part = seconds / len(steps)
    return np.concatenate([k * part + poisson_trace(f * rate_full, part, seed + k) for k, f in enumerate(steps)])


def _calibrate(handle, mode: str, queue: QueueConfig, plan: "FidelityPlan", cal_items: list) -> dict:
    """Isolated batch times (every mode the replica holds), then the served mode's times and the
    per-request overhead as a calibration trace shows them: batches timed while requests keep arriving
    (the replica's event loop and Ray's share the host with the forward), and round trips outside the
    replica. The other modes of the replica scale by the served mode's ratio of served to isolated."""
    from tanbr_ray.cluster.mode_replica import replay

    iso = handle.calibrate.remote(cal_items, queue.max_batch, plan.runs).result(timeout_s=3600)
    rate_full = capacity(iso["batch_ms"][mode])
    arrivals = calibration_trace(rate_full, plan.calibration_seconds, CAL_TRACE_SEED)
    rng = np.random.default_rng(CAL_TRACE_SEED)
    handle.take_batches.remote().result()
    real = asyncio.run(replay(handle, arrivals, [cal_items[i] for i in rng.integers(len(cal_items), size=len(arrivals))]))
    records = handle.take_batches.remote().result()
    served = fill_batch_times(records, queue.max_batch)
    ratio = float(np.median(np.asarray(served) / np.asarray(iso["batch_ms"][mode])))
    batch_ms = {m: (served if m == mode else [v * ratio for v in ms]) for m, ms in iso["batch_ms"].items()}
    ok = np.isfinite(real["latency_ms"])
    overhead = float(np.median(real["latency_ms"][ok] - real["replica_ms"][ok]))
    return {"batch_ms": batch_ms, "isolated_ms": iso["batch_ms"], "served_over_isolated": ratio,
            "spread": service_spread(records, served),
            "overhead_ms": overhead, "threads": iso["threads"], "requests": len(arrivals)}


def run_fidelity(moe, queue: QueueConfig, bf16: bool, plan: FidelityPlan, data_dir=None, progress=print) -> dict:
    """Calibrate and replay every mode on a Serve replica; needs Serve running (`serve.start`)."""
    from ray import serve

    from tanbr_ray.cluster.mode_replica import deploy_mode, replay
    from tanbr_ray.moe.edge import edge_package
    from tanbr_ray.moe.store import model_identity

    cal_items = calibration_items(moe.tasks, data_dir)
    rows_items = calibration_items(moe.tasks, data_dir, per_task=100, seed=TRACE_ROWS_SEED)
    batch_ms, cals, levels, traces = {}, {}, [], {}
    uniform = np.full(moe.num_experts, 1.0 / moe.num_experts)
    for mode in plan.modes:
        model = (edge_package(moe), moe.merged_state(uniform)) if mode == "merged" else moe
        handle = deploy_mode(model, mode, queue.model_dump(), plan.threads, bf16)
        cals[mode] = _calibrate(handle, mode, queue, plan, cal_items)
        batch_ms.update(cals[mode]["batch_ms"])
        rate_full = capacity(batch_ms[mode])
        progress(f"{mode}: batch 1 {batch_ms[mode][0]:.1f} ms, batch {queue.max_batch} {batch_ms[mode][-1]:.1f} ms "
                 f"as served ({cals[mode]['served_over_isolated']:.2f}× isolated; capacity {rate_full:.0f} "
                 f"requests/s), overhead {cals[mode]['overhead_ms']:.1f} ms per request")
        for k, load in enumerate(plan.levels):
            arrivals = poisson_trace(load * rate_full, plan.seconds, TRACE_SEED + k)
            rng = np.random.default_rng(TRACE_SEED + k)
            items = [rows_items[i] for i in rng.integers(len(rows_items), size=len(arrivals))]
            handle.take_batches.remote().result()
            t0 = time.perf_counter()
            real = asyncio.run(replay(handle, arrivals, items))
            sizes = [b for b, *_ in handle.take_batches.remote().result()]
            sim = simulated(arrivals, batch_ms[mode], cals[mode]["overhead_ms"], queue, cals[mode]["spread"], TRACE_SEED + k)
            levels.append(level_row(load, mode, load * rate_full, real, sim, sizes))
            traces[(mode, load)] = (real["latency_ms"], sim["latency_ms"])
            r = levels[-1]
            progress(f"  load {load:.0%}: {len(arrivals)} requests in {time.perf_counter() - t0:.0f} s; p50 real "
                     f"{r['real_ms']['p50']:.1f} sim {r['sim_ms']['p50']:.1f} ms, p95 real {r['real_ms']['p95']:.1f} "
                     f"sim {r['sim_ms']['p95']:.1f} ms")
        serve.delete(f"fidelity-{mode}")
    calibration = Calibration(host=host_identity(), bf16=bf16, model_sha256=model_identity(moe)["weights_sha256"],
                              max_batch=queue.max_batch, batch_ms=batch_ms,
                              overhead_ms=float(np.mean([c["overhead_ms"] for c in cals.values()])),
                              spread=[float(q) for q in np.mean([c["spread"] for c in cals.values()], axis=0)],
                              source="serve replica", threads=cals[plan.modes[0]]["threads"], runs=plan.runs,
                              date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    return {"levels": levels, "calibration": calibration.model_dump(), "calibration_runs": cals,
            "queue": queue.model_dump(), "plan": plan.__dict__, "traces": traces}


def plot_cdfs(traces: dict, path) -> None:
    """Latency CDFs per mode: the replica (solid) and the simulator (dashed), one colour per load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({m for m, _ in traces}, key=list(MODES).index)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for k, load in enumerate(sorted(ld for m, ld in traces if m == mode)):
            real, sim = traces[(mode, load)]
            for ms, style, who in ((real, "-", "replica"), (sim, "--", "simulator")):
                v = np.sort(ms[np.isfinite(ms)])
                ax.plot(v, np.arange(1, len(v) + 1) / max(len(v), 1), style, color=f"C{k}",
                        label=f"{load:.0%} load, {who}")
        ax.set_xscale("log")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("share of requests")
        ax.set_title(f"{mode}: replica vs simulator")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
