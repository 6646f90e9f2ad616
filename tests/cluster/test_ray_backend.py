"""`simulate --backend ray` gives the same scores and choices as the local backend (tiny scenario),
with every push acknowledged by every replica."""

import numpy as np

from tanbr_ray.cluster.driver import run_ray_simulation
from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.loop import run_simulation

POLICIES = ["Tanbr", "Random", "Uniform", "Switch-top2"]


def test_ray_backend_equals_local(tiny, fleet, data_dir):
    cfg_moe, models, moe = tiny
    cfg = SimConfig(slots=3, slot_seconds=4, pool_per_task=12, fixed_candidates=1, wandb="disabled", seed=0,
                    threads=1, models_dir=str(models), data_dir=data_dir, policies=POLICIES)
    local = run_simulation(cfg, moe, fleet=fleet, progress=False)
    ray_out = run_ray_simulation(cfg, cfg_moe, moe, fleet=fleet, progress=False)

    # x matters for this model: different merges really score differently
    assert not np.array_equal(local.series["Random"].score, local.series["Uniform"].score)
    for name in POLICIES:
        a, b = local.series[name], ray_out.series[name]
        assert np.array_equal(a.score, b.score), name
        assert (a.choices is None) == (b.choices is None)
        if a.choices is not None:
            assert np.array_equal(a.choices, b.choices), name
        assert local.summary["policies"][name]["scores"] == ray_out.summary["policies"][name]["scores"]
    r = ray_out.summary["ray"]
    assert r["policies_on_cluster"] == ["Tanbr", "Random", "Uniform"]
    assert r["pushes"] == 3 * cfg.slots and r["replicas"] == 3
    assert r["stale_replicas"] == 0 and r["push_seconds_max"] < 30
    # latency on the cluster is measured end to end, not the local cost model
    assert ray_out.summary["policies"]["Tanbr"]["latency_ms_p50"] != local.summary["policies"]["Tanbr"]["latency_ms_p50"]


def test_ray_backend_refuses_bf16_before_starting_anything(tiny):
    import pytest
    import ray

    with pytest.raises(ValueError, match="bf16"):
        run_ray_simulation(SimConfig(bf16=True, wandb="disabled"), tiny[0], tiny[2])
    assert not ray.is_initialized()
