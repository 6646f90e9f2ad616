"""The edge replicas' batcher runs the simulator's batching rule (no Ray: a fake model that sleeps)."""

import asyncio
import time

import numpy as np
import pytest

from tanbr_ray.cluster.batcher import DynamicBatcher, RequestExpired
from tanbr_ray.sim.queueing import QueueConfig, simulate_queue


def service_s(b: int) -> float:
    return 0.050 + 0.005 * b


async def _drive(arrivals_ms: list[float], cfg: QueueConfig):
    """Submit one item per arrival (ms from a common start); returns (submit times, batcher, results)."""
    async def run_batch(items):
        await asyncio.sleep(service_s(len(items)))
        return [i * 10 for i in items]

    batcher = DynamicBatcher(run_batch, cfg)
    t0 = time.monotonic() + 0.05
    submitted = [0.0] * len(arrivals_ms)

    async def one(i, a):
        await asyncio.sleep(max(0.0, t0 + a / 1e3 - time.monotonic()))
        submitted[i] = time.monotonic() - t0
        return await batcher.submit(i)

    results = await asyncio.gather(*(one(i, a) for i, a in enumerate(arrivals_ms)), return_exceptions=True)
    return np.asarray(submitted), batcher, results, t0


def test_a_deterministic_train_gets_the_simulators_batches():
    """A lone request (closes on the wait), a full batch, a queue that builds while the node is busy
    (closes at once when it frees), a partial queue (closes at once: its oldest already waited), a lone one."""
    cfg = QueueConfig(max_batch=4, max_wait_ms=30.0)
    arrivals = [0, 100, 101, 102, 103, 110, 112, 114, 150, 200, 202, 400]
    submitted, batcher, results, t0 = asyncio.run(_drive(arrivals, cfg))
    assert results == [i * 10 for i in range(len(arrivals))]
    q = simulate_queue(submitted, service_s, cfg)
    # the simulator's batches, recovered from its finish times: a batch shares one finish time
    finish = submitted + q.latency_s
    sim_sizes = [int(np.sum(np.isclose(finish, f))) for f in dict.fromkeys(np.round(finish, 9))]
    sim_starts = [f - service_s(b) for f, b in zip(dict.fromkeys(np.round(finish, 9)), sim_sizes)]
    live = list(batcher.batches)
    assert [b.size for b in live] == sim_sizes == [1, 4, 4, 2, 1]
    starts = [b.start - t0 for b in live]
    assert np.allclose(starts, sim_starts, atol=0.015), (starts, sim_starts)  # the timer's resolution, a busy host


def test_expired_requests_are_refused_and_a_failing_batch_fails_only_its_own():
    cfg = QueueConfig(max_batch=2, max_wait_ms=0.0, timeout_s=0.05)
    calls = []

    async def run_batch(items):
        calls.append(list(items))
        if "bad" in items:
            raise RuntimeError("model failed")
        await asyncio.sleep(0.12)
        return [x.upper() for x in items]

    async def main():
        b = DynamicBatcher(run_batch, cfg)
        first = asyncio.ensure_future(b.submit("a"))
        await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(b.submit(x)) for x in ("b", "c", "d")]  # wait 0.11 s > timeout behind "a"
        out = await asyncio.gather(first, *queued, return_exceptions=True)
        bad = await asyncio.gather(b.submit("bad"), return_exceptions=True)
        after = await b.submit("e")
        return out, bad, after

    out, bad, after = asyncio.run(main())
    assert out[0] == "A"
    assert all(isinstance(r, RequestExpired) for r in out[1:]) and "timeout_s 0.05" in str(out[1])
    assert isinstance(bad[0], RuntimeError) and after == "E"  # the batcher serves on after a failed batch
    assert calls == [["a"], ["bad"], ["e"]]


@pytest.mark.parametrize("field,value", [("max_batch", 0), ("max_batch", -3), ("max_wait_ms", -1.0), ("timeout_s", 0)])
def test_bad_queue_settings_name_the_field(field, value):
    from tanbr_ray.cluster.app import AppArgs
    from tanbr_ray.sim.config import load_config

    with pytest.raises(ValueError, match=f"queue.{field}"):
        load_config("quick", [f"queue.{field}={value}"])
    with pytest.raises(ValueError, match=f"queue.{field}"):
        AppArgs(scenario="quick", queue={field: value})


def test_served_app_batches_with_the_scenarios_queue():
    from tanbr_ray.cluster.app import AppArgs

    assert AppArgs(scenario="quick").queue.model_dump() == {"max_batch": 16, "max_wait_ms": 20.0, "timeout_s": 30.0}
    assert AppArgs(scenario="quick", queue={"max_batch": 8}).queue.max_batch == 8
