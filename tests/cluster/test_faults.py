"""Fault injection on the cluster (tiny scenario, one local multi-node cluster for the module): the
run completes through a decision-leader kill (the standby takes over), a merger kill, a kill of the
standby that had taken over, a replica kill and a corrupt newest checkpoint; the router's choices
equal an uninterrupted run's except for exactly the slots a fault destroyed."""

import numpy as np
import pytest

from tanbr_ray.cluster.driver import run_ray_simulation
from tanbr_ray.cluster.faults import Fault
from tanbr_ray.cluster.local import local_cluster
from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.loop import run_simulation

SLOTS = 4


@pytest.fixture(scope="module")
def cluster(fleet):
    with local_cluster(fleet) as c:
        yield c


@pytest.fixture(scope="module")
def cfg(tiny, data_dir):
    _, models, _ = tiny
    return SimConfig(slots=SLOTS, slot_seconds=4, pool_per_task=12, fixed_candidates=1, wandb="disabled", seed=0,
                     threads=1, models_dir=str(models), data_dir=data_dir, policies=["Tanbr"],
                     bf16=False)  # compared with the local backend: fp32 (see test_ray_backend.py)


@pytest.fixture(scope="module")
def uninterrupted(tiny, fleet, cfg):
    return run_simulation(cfg, tiny[2], fleet=fleet, progress=False)


def test_leader_merger_standby_and_replica_kills_lose_nothing(cluster, tiny, published, fleet, cfg, uninterrupted,
                                                              tmp_path):
    faults = [Fault("Tanbr", 1, "kill_leader"),  # mid-slot: decided, served after the takeover
              Fault("Tanbr", 2, "kill_merger"), Fault("Tanbr", 2, "kill_replica", target="board"),
              Fault("Tanbr", 2, "kill_leader", phase="end")]  # the standby that took over, after its update
    out = run_ray_simulation(cfg, tiny[2], fleet=fleet, progress=False, storage=str(tmp_path),
                             faults=faults, model_source=published)
    r = out.summary["ray"]
    first, merger, replica, second = r["faults"]
    for kill in (first, second):
        assert kill["restored_from"] and kill["refused_checkpoints"] == []
        assert kill["new_leader"] != kill["killed"] and kill["term_after"] > kill["term_before"]
        assert kill["recovery_seconds"] < 30
    # the standby took over, then the restarted first leader took over from it
    assert second["killed"] == first["new_leader"] and second["new_leader"] == first["killed"]
    assert first["updated_slot_after"] == first["updated_slot_before"] == 0  # nothing lost, nothing repeated
    assert first["decided_slot_after"] == first["decided_slot_before"] == 1
    assert second["updated_slot_after"] == second["updated_slot_before"] == 2
    assert merger["killed"].endswith("-merger-0")
    assert replica["killed"].startswith("SERVE_REPLICA::tanbr#edge_board#")
    assert r["final_router_state"]["slot"] == SLOTS and r["stale_replicas"] == 0
    assert [t["term"] for t in r["takeovers"]][-1] == r["final_router_state"]["term"]
    a, b = uninterrupted.series["Tanbr"], out.series["Tanbr"]
    assert np.array_equal(a.score, b.score) and np.array_equal(a.choices, b.choices)


def test_corrupt_newest_checkpoint_costs_exactly_one_slot(cluster, tiny, published, fleet, cfg, tmp_path):
    faults = [Fault("Tanbr", 1, "corrupt_checkpoint", phase="end")]
    out = run_ray_simulation(cfg, tiny[2], fleet=fleet, progress=False, storage=str(tmp_path),
                             faults=faults, model_source=published)
    f = out.summary["ray"]["faults"][0]
    assert f["corrupted"] in f["refused_checkpoints"][0]  # refused, naming the file
    assert f["updated_slot_before"] == 1 and f["updated_slot_after"] == 0  # slot 1's update was lost
    assert out.summary["ray"]["final_router_state"]["slot"] == SLOTS - 1
    assert out.summary["requests"] > 0 and np.all(np.isfinite(out.series["Tanbr"].score))


def test_losing_the_leaders_machine_loses_nothing(cluster, tiny, published, fleet, cfg, uninterrupted, tmp_path):
    """Last in this module (the cluster has one control machine fewer after it): the leader's machine
    goes (raylet killed, its directory removed); the standby on the other machine restores the state
    from storage and the run's choices equal an uninterrupted run's."""
    faults = [Fault("Tanbr", 1, "lose_leader_machine")]
    out = run_ray_simulation(cfg, tiny[2], fleet=fleet, progress=False, storage=str(tmp_path),
                             faults=faults, model_source=published)
    f = out.summary["ray"]["faults"][0]
    assert f["machine"] == "control" and f["new_leader"] != f["killed"]
    assert f["recovery_seconds"] < 10 and f["restored_from"] and not f["refused_checkpoints"]
    assert f["updated_slot_after"] == f["updated_slot_before"]  # no slot lost
    assert not (cluster.node_dirs["control"] and __import__("os").path.exists(cluster.node_dirs["control"]))
    a, b = uninterrupted.series["Tanbr"], out.series["Tanbr"]
    assert np.array_equal(a.score, b.score) and np.array_equal(a.choices, b.choices)
