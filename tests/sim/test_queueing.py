"""Queueing on hand-computable cases: batching, waits, overload, drops, backlog."""

import numpy as np
import pytest

from tanbr_ray.sim.queueing import QueueConfig, interpolate_service, simulate_queue


def test_deterministic_train_gives_the_known_waits():
    # service 0.5 s a batch; batches of at most 2; the oldest waits at most 50 ms for company
    cfg = QueueConfig(max_batch=2, max_wait_ms=50, timeout_s=10)
    r = simulate_queue(np.array([0.0, 0.1, 0.2]), lambda b: 0.5, cfg)
    # batch 1 closes at 0.05 with request 0 alone (request 1 comes at 0.1), done at 0.55;
    # requests 1 and 2 queued meanwhile and go together at 0.55, done at 1.05
    assert r.latency_s == pytest.approx([0.55, 0.95, 0.85])
    assert r.batches == 2 and not r.dropped.any()
    assert r.backlog_end == 3  # at the last arrival (0.2 s) none has finished
    assert simulate_queue(np.array([0.0, 0.1, 0.2]), lambda b: 0.5, cfg, end_s=1.0).backlog_end == 2


def test_a_full_batch_starts_without_waiting():
    cfg = QueueConfig(max_batch=3, max_wait_ms=1000, timeout_s=10)
    r = simulate_queue(np.array([0.0, 0.01, 0.02, 5.0]), lambda b: 0.1 * b, cfg)
    assert r.latency_s[:3] == pytest.approx([0.32, 0.31, 0.30])  # closes at 0.02 (full), 3 × 0.1 s
    assert r.latency_s[3] == pytest.approx(1.0 + 0.1)  # alone: waits the full second


def test_overload_drops_past_the_timeout_and_leaves_a_backlog():
    cfg = QueueConfig(max_batch=1, max_wait_ms=0, timeout_s=2.0)
    arrivals = np.arange(20) * 0.1  # 10 requests/s into a node that serves 1 a second
    r = simulate_queue(arrivals, lambda b: 1.0, cfg, end_s=2.0)
    assert r.dropped.sum() > 10 and r.served + int(r.dropped.sum()) == 20
    served = r.latency_s[~r.dropped]
    assert np.all(served <= 2.0 + 1.0 + 1e-9)  # no one waits past the timeout
    assert np.isnan(r.latency_s[r.dropped]).all() and r.backlog_end >= 1


def test_service_interpolation_and_bad_input():
    s = interpolate_service([1, 4, 16], [10.0, 25.0, 85.0])
    assert s(1) == pytest.approx(0.010) and s(2) == pytest.approx(0.015) and s(32) == pytest.approx(0.165)
    with pytest.raises(ValueError, match="ascending"):
        interpolate_service([4, 1], [1.0, 2.0])
    with pytest.raises(ValueError, match="ascending"):
        simulate_queue(np.array([1.0, 0.5]), lambda b: 0.1, QueueConfig())
    with pytest.raises(ValueError, match="max_batch"):
        QueueConfig(max_batch=0)
