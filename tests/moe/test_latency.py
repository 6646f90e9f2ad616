"""Round-robin latency timing: every function is timed, warm-up calls are not, ratios survive drift."""

import time

from tanbr_ray.moe.infer import interleaved_latency


def test_interleaved_latency_times_each_fn_round_robin():
    order = []

    def make(name, seconds):
        def fn():
            order.append(name)
            time.sleep(seconds)
        return fn

    stats = interleaved_latency({"fast": make("fast", 0.002), "slow": make("slow", 0.008)}, runs=5, warmup=1)
    out = {k: v["p50"] for k, v in stats.items()}
    assert all(v["runs"] == 5 and v["p50"] <= v["p95"] for v in stats.values())
    assert order == ["fast", "slow"] * 6  # warm-up round, then 5 timed rounds, alternating
    assert 2.0 <= out["fast"] < out["slow"] and out["slow"] >= 8.0
    assert 2.0 < out["slow"] / out["fast"] < 4.5
