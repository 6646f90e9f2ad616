"""`simulate --backend ray` gives the same scores and choices as the local backend (tiny scenario),
with every push acknowledged by every replica."""

import numpy as np

from tanbr_ray.cluster.driver import run_ray_simulation
from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.loop import run_simulation

POLICIES = ["Tanbr", "Random", "Uniform", "Switch-top2"]


def test_ray_backend_equals_local(tiny, fleet, data_dir):
    _, models, moe = tiny
    # fp32: the local backend scores from cached activations, the replicas run the whole forward,
    # and only in fp32 do the two round alike (bf16 replicas: tests/moe/test_edge.py)
    cfg = SimConfig(slots=3, slot_seconds=4, pool_per_task=12, fixed_candidates=1, wandb="disabled", seed=0,
                    threads=1, models_dir=str(models), data_dir=data_dir, policies=POLICIES, bf16=False)
    local = run_simulation(cfg, moe, fleet=fleet, progress=False)
    ray_out = run_ray_simulation(cfg, moe, fleet=fleet, progress=False)

    # x matters for this model: different merges really score differently (Random's seed-0 draws
    # sit near (½, ½) on the 2-expert node and tie Uniform on these few requests; Tanbr does not)
    assert len({tuple(local.series[n].score) for n in ("Tanbr", "Random", "Uniform")}) > 1
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
    # a replica holds the shell once plus each held node's merged FFNs: what the simulator charges a node
    version = sum(t.numel() * t.element_size() for t in moe.merged_state(np.array([0.5, 0.5])).values())
    for st in r["replicas_status"]:
        assert st["resident_bytes"] == moe.resident_bytes("merged") + (len(st["nodes"]) - 1) * version, st
    # latency on the cluster is measured end to end, not the local cost model
    assert ray_out.summary["policies"]["Tanbr"]["latency_ms_p50"] != local.summary["policies"]["Tanbr"]["latency_ms_p50"]


def test_ray_backend_equals_local_at_32_nodes_on_4_replicas(tiny, data_dir):
    """The packaged 32-node fleet multiplexed onto 4 replica processes (2 board, 1 gateway, 1
    microdc): the same choices and scores as the local backend, every node held by a replica of its
    class."""
    from tanbr_ray.sim.fleet import load_fleet

    _, models, moe = tiny
    fleet = load_fleet("32")
    cfg = SimConfig(slots=2, slot_seconds=8, pool_per_task=12, fixed_candidates=1, wandb="disabled", seed=0,
                    threads=1, models_dir=str(models), data_dir=data_dir, policies=["Tanbr"], scored_per_slot=4,
                    bf16=False)
    local = run_simulation(cfg, moe, fleet=fleet, progress=False)
    ray_out = run_ray_simulation(cfg, moe, fleet=fleet, progress=False, replicas=4)
    a, b = local.series["Tanbr"], ray_out.series["Tanbr"]
    assert a.choices.shape == (2, 32, 2)
    assert np.array_equal(a.choices, b.choices) and np.array_equal(a.score, b.score)
    r = ray_out.summary["ray"]
    assert r["replica_plan"] == {"board": {"replicas": 2, "nodes_per_replica": 7},
                                 "gateway": {"replicas": 1, "nodes_per_replica": 11},
                                 "microdc": {"replicas": 1, "nodes_per_replica": 7}}
    status = r["replicas_status"]
    assert len(status) == 4 and r["replicas"] == 4 and r["stale_replicas"] == 0
    held = [node for s in status for node in s["nodes"]]
    assert set(held) == set(ray_out.nodes)  # every node on a replica of its class, none evicted
    for s in status:
        assert all(ray_out.node_classes[node] == s["class"] for node in s["nodes"])
        assert s["peak_rss_bytes"] > s["resident_bytes"] > 0


def test_replica_plan_shares_replicas_by_node_count():
    import pytest

    from tanbr_ray.cluster.app import replica_plan
    from tanbr_ray.sim.fleet import load_fleet

    assert replica_plan(load_fleet("default"), None) == {"board": (4, 1), "gateway": (3, 1), "microdc": (2, 1)}
    assert replica_plan(load_fleet("128"), 8) == {"board": (3, 19), "gateway": (3, 15), "microdc": (2, 14)}
    assert replica_plan(load_fleet("8"), 100) == {"board": (3, 1), "gateway": (3, 1), "microdc": (2, 1)}
    with pytest.raises(ValueError, match="each class needs at least one"):
        replica_plan(load_fleet("32"), 2)
