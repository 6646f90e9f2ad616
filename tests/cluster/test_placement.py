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
        start_router(AppArgs(model_source=str(models), router={"storage": "/tmp/unused-router-state"}), fleet, cfg)
    msg = str(e.value)
    assert "tanbr_control on 2 machines (leader and standby apart), found on 1" in msg
    assert "tanbr_merger on no machine" in msg and "tanbr_head on no machine" in msg
    assert "edge_board on no machine" in msg and "edge_dc on no machine" in msg
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if "tanbr" in a.get("name", "")]
    with pytest.raises(ValueError, match="tanbr_merger on no machine"):
        check_cluster(1, [])  # one decision actor fits; the mergers still have nowhere to go


def test_a_head_that_misses_rays_start_up_wait_is_started_again():
    from tanbr_ray.cluster.local import _start_head

    calls = []

    class Flaky:
        def __init__(self, initialize_head, head_node_args):
            calls.append(head_node_args)
            if len(calls) == 1:
                raise Exception("The current node timed out during startup. This could happen because ...")

    assert isinstance(_start_head(Flaky, {"num_cpus": 1}), Flaky) and len(calls) == 2

    class Broken:
        def __init__(self, initialize_head, head_node_args):
            raise Exception("port in use")

    with pytest.raises(Exception, match="port in use"):
        _start_head(Broken, {})
