"""A cluster that cannot place the app is refused at deploy, naming what is missing."""

import pytest
import ray

from tanbr_ray.cluster.app import AppArgs, start_router
from tanbr_ray.cluster.placement import check_cluster


@pytest.fixture(scope="module")
def bare():
    """One machine with no tanbr resources (what `ray start` gives without --resources)."""
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, resources={"tanbr_control": 1})
    yield
    ray.shutdown()


def test_a_cluster_without_the_roles_resources_is_refused_with_them_named(bare, fleet, tiny):
    cfg, models, _ = tiny
    with pytest.raises(ValueError) as e:
        start_router(AppArgs(model_source=str(models), router={"storage": "/tmp/unused-router-state"}), fleet, cfg.cache_names(), {})
    msg = str(e.value)
    assert "tanbr_control on 2 machines (leader and standby apart), found on 1" in msg
    assert "tanbr_merger on no machine" in msg and "tanbr_head on no machine" in msg
    assert "edge_board on no machine" in msg and "edge_dc on no machine" in msg
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "tanbr" in a.get("name", "")]
    with pytest.raises(ValueError, match="tanbr_merger on no machine"):
        check_cluster(1, [])  # one decision actor fits; the mergers still have nowhere to go


def test_a_cluster_whose_node_misses_rays_start_up_wait_is_started_again(monkeypatch, fleet):
    """Ray waits a fixed 30 s for a new node; a start that misses it is torn down and started again."""
    from ray import cluster_utils

    from tanbr_ray.cluster import local

    starts, shutdowns = [], []

    class Flaky:
        def __init__(self):
            self.nodes = 0

        def add_node(self, **opts):
            self.nodes += 1
            starts.append(opts)
            if len(starts) == 2:  # the first try's second machine misses the wait
                raise Exception("The current node timed out during startup. This could happen because ...")
            return type("Node", (), {"node_id": f"n{len(starts)}"})()

        def wait_for_nodes(self):
            pass

        def shutdown(self):
            shutdowns.append(self.nodes)

    monkeypatch.setattr(cluster_utils, "Cluster", Flaky)
    c = local._start(fleet, 1, 2**20, "/tmp/tanbr-test-start")
    assert shutdowns == [2] and c.nodes == 2 + len(fleet.classes)  # head, control, one per class
    assert sorted(c.machines.values()) == sorted(["head", "control", *(k.name for k in fleet.classes)])

    class Broken(Flaky):
        def add_node(self, **opts):
            raise Exception("port in use")

    monkeypatch.setattr(cluster_utils, "Cluster", Broken)
    with pytest.raises(Exception, match="port in use"):
        local._start(fleet, 1, 2**20, "/tmp/tanbr-test-start")

