"""`tanbr bench fidelity`'s parts: traces and the simulator's side without Ray, then a short run of
both modes through real Serve replicas of the tiny model."""

import numpy as np
import pytest

from tanbr_ray.bench.fidelity import FidelityPlan, capacity, level_row, poisson_trace, run_fidelity, simulated
from tanbr_ray.sim.calibration import MODES, Calibration
from tanbr_ray.sim.queueing import QueueConfig


def test_poisson_trace_is_seeded_and_has_its_rate():
    a = poisson_trace(50.0, 60.0, seed=3)
    assert np.array_equal(a, poisson_trace(50.0, 60.0, seed=3)) and not np.array_equal(a, poisson_trace(50.0, 60.0, 4))
    assert abs(len(a) / 60.0 - 50.0) < 3 and np.all(np.diff(a) > 0) and a[-1] < 60.0


def test_the_simulators_side_adds_the_overhead_to_the_queue_model():
    cfg = QueueConfig(max_batch=4, max_wait_ms=20.0)
    batch_ms = [10.0, 12.0, 14.0, 16.0]
    assert capacity(batch_ms) == pytest.approx(250.0)
    lone = simulated(np.array([0.0, 5.0]), batch_ms, overhead_ms=2.0, queue=cfg)  # far apart: each waits 20 ms alone
    assert lone["latency_ms"] == pytest.approx([20 + 10 + 2, 20 + 10 + 2]) and lone["batches"] == lone["served"] == 2
    together = simulated(np.array([0.0, 0.001, 0.002, 0.003]), batch_ms, 0.0, cfg)  # full at 3 ms
    assert together["batches"] == 1 and together["latency_ms"][0] == pytest.approx(3 + 16)
    real = {"latency_ms": np.array([30.0, 40.0]), "errors": [], "send_lag_ms": np.zeros(2), "replica_ms": np.ones(2)}
    row = level_row(0.3, "merged", 10.0, real, lone, [1, 1])
    assert row["rel_err"]["p50"] == pytest.approx((32.0 - 35.0) / 35.0) and row["mean_batch"] == {"real": 1.0, "sim": 1.0}


@pytest.fixture(scope="module")
def serve_running(ray_env, fleet):
    """A local cluster as the other cluster tests start one (loopback, its own node directories)."""
    from ray import serve

    from tanbr_ray.cluster.local import local_cluster

    with local_cluster(fleet):
        serve.start(proxy_location="Disabled")
        yield


def test_a_short_run_calibrates_and_compares_both_modes(tiny, data_dir, serve_running):
    _, _, moe = tiny
    plan = FidelityPlan(seconds=4.0, levels=(0.3,), runs=1, calibration_seconds=5.0)
    out = run_fidelity(moe, QueueConfig(max_batch=4), bf16=False, plan=plan, data_dir=data_dir, progress=lambda s: None)
    cal = Calibration(**out["calibration"])  # a calibration the simulator loads
    assert set(cal.batch_ms) == set(MODES) and cal.source == "serve replica" and cal.threads == 1
    assert cal.overhead_ms > 0 and all(len(v) == 4 for v in cal.batch_ms.values()) and len(cal.spread) == 21
    assert [(r["load"], r["mode"]) for r in out["levels"]] == [(0.3, "merged"), (0.3, "top1")]
    for r in out["levels"]:
        assert r["errors"] == 0 and r["served"] == r["requests"] > 0
        assert 0 < r["real_ms"]["p50"] <= r["real_ms"]["p95"] and 0 < r["sim_ms"]["p50"] <= r["sim_ms"]["p95"]
        assert r["batched_requests"] == r["served"]  # every request went through the replica's batcher
    assert set(out["traces"]) == {("merged", 0.3), ("top1", 0.3)}
    for mode in ("merged", "top1"):  # the served mode's times are the trace's, the rest scale with them
        run = out["calibration_runs"][mode]
        assert run["requests"] > 0 and cal.batch_ms[mode] == run["batch_ms"][mode] and len(run["spread"]) == 21
    top1 = out["calibration_runs"]["top1"]
    assert cal.batch_ms["top2"] == pytest.approx([v * top1["served_over_isolated"] for v in top1["isolated_ms"]["top2"]])


def test_service_times_spread_as_served_and_drawn_seeded():
    from tanbr_ray.bench.fidelity import service_spread
    from tanbr_ray.sim.queueing import spread_service

    records = [(1, 0.008, 0.0), (1, 0.012, 0.0), (2, 0.020, 0.0), (2, 0.030, 0.0)]
    spread = service_spread(records, [10.0, 25.0])
    assert len(spread) == 21 and spread[0] == pytest.approx(0.8) and spread[-1] == pytest.approx(1.2)
    draw = spread_service(lambda b: 0.010 * b, spread, np.random.default_rng(0))
    again = spread_service(lambda b: 0.010 * b, spread, np.random.default_rng(0))
    xs = [draw(2) for _ in range(2000)]
    assert xs[:50] == [again(2) for _ in range(50)] and 0.016 <= min(xs) and max(xs) <= 0.024
    assert np.mean(xs) == pytest.approx(0.020, rel=0.02)
    assert spread_service(lambda b: 1.0, spread, None)(3) == 1.0 and spread_service(lambda b: 1.0, [], np.random.default_rng(0))(3) == 1.0


def test_batch_times_fill_unserved_sizes_from_a_line_through_the_served_ones():
    from tanbr_ray.bench.fidelity import fill_batch_times

    records = [(1, 0.010, 0.0), (1, 0.012, 0.0), (2, 0.014, 0.0), (4, 0.022, 0.0), (4, 0.022, 0.0)]
    ms = fill_batch_times(records, 5)
    assert ms[0] == pytest.approx(11.0) and ms[1] == pytest.approx(14.0) and ms[3] == pytest.approx(22.0)
    assert 14.0 < ms[2] < 22.0 and ms[4] > 22.0  # size 3 between, size 5 beyond, on the fitted line
    with pytest.raises(ValueError, match="too few sizes"):
        fill_batch_times([(3, 0.01)], 4)
