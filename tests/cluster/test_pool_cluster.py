"""A pool of fine-tunes on the cluster: `simulate --backend ray` on a tiny GPT-2 pool gives the local
backend's choices and scores. The mergers fetch the pool from the cluster's storage into their own
machine's cache (they never read this process's), and the edge replicas serve it from the pool's
edge package: backbone and heads without the experts, one merged MLP per layer per version."""

import numpy as np
import pytest

from tanbr_ray.cluster.app import AppArgs
from tanbr_ray.cluster.driver import run_ray_simulation
from tanbr_ray.moe.resolve import open_model
from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.loop import run_simulation
from tests.moe.tiny_pools import make_pool

POLICIES = ["Tanbr", "Random", "Uniform", "Switch-top2"]


@pytest.fixture(scope="module")
def pool(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("clusterpool")
    spec = make_pool(root, "gpt2", tasks=("SST-2", "MNLI"), steps=6)  # the tasks of the fleet fixture
    return spec, open_model(str(spec), root / "models", progress=False, data_dir=data_dir).moe


def test_app_args_name_a_pool_by_its_content_key(pool):
    spec, moe = pool
    assert AppArgs(model=str(spec)).model_names() == [moe.cache_dir.name]  # the YAML, hashed where the app is built
    assert AppArgs(model=moe.cache_dir.name).model_names() == [moe.cache_dir.name]  # or the published name
    with pytest.raises(ValueError, match="neither a preset"):
        AppArgs(model="my-pool")


def test_ray_backend_serves_a_pool_as_the_local_backend_scores_it(pool, fleet, data_dir):
    spec, moe = pool
    # the operator is not in the cache key: as if the YAML said fisher after the build (stored: linear),
    # so the mergers must merge with what the driver's model says, not what their fetched copy recorded
    assert moe.meta["pool_config"]["merge_operator"] == "linear"
    moe.merge_operator = "fisher"
    cfg = SimConfig(model=str(spec), slots=3, slot_seconds=4, pool_per_task=12, fixed_candidates=1, wandb="disabled",
                    seed=0, threads=1, models_dir=str(moe.cache_dir.parent), data_dir=data_dir, policies=POLICIES,
                    bf16=False)
    local = run_simulation(cfg, moe, fleet=fleet, progress=False)
    ray_out = run_ray_simulation(cfg, moe, fleet=fleet, progress=False)
    assert len({tuple(local.series[n].score) for n in ("Tanbr", "Random", "Uniform")}) > 1  # x matters here
    for name in POLICIES:
        a, b = local.series[name], ray_out.series[name]
        assert np.array_equal(a.score, b.score), name
        if a.choices is not None:
            assert np.array_equal(a.choices, b.choices), name
    r = ray_out.summary["ray"]
    assert r["policies_on_cluster"] == ["Tanbr", "Random", "Uniform"] and r["stale_replicas"] == 0
    assert r["pushes"] == 3 * cfg.slots
    # the mergers' machine (both run on the head's `tanbr_merger`) fetched the pool from the cluster's
    # storage into its own cache: one fetches, the other finds that machine's copy (or fetches alongside)
    ms = r["mergers"]
    assert {(m["model"], m["merge_operator"]) for m in ms} == {(moe.cache_dir.name, "fisher")}
    assert "fetched" in {m["model_from"] for m in ms} <= {"fetched", "cache"} and len({m["ray_node"] for m in ms}) == 1
    # a replica holds the shell once plus the merged MLPs of each node it holds: never the experts
    version = sum(t.numel() * t.element_size() for t in moe.merged_state(np.array([0.5, 0.5])).values())
    for st in r["replicas_status"]:
        assert st["resident_bytes"] == moe.resident_bytes("merged") + (len(st["nodes"]) - 1) * version, st
        assert st["resident_bytes"] < moe.resident_bytes("top2")
