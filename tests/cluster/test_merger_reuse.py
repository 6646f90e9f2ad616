"""Mergers are detached and found by name: a deploy under the same router name that names another
model, or another merge operator, is refused instead of silently served by the running ones."""

import pytest
import ray

from tanbr_ray.cluster.lifecycle import end_router
from tanbr_ray.cluster.merger import start_mergers


@pytest.fixture
def merger_machine():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, resources={"tanbr_merger": 1},
             namespace="tanbr")
    yield
    end_router("swap-test", 0, 1)
    ray.shutdown()


def test_running_mergers_that_hold_another_model_are_refused_not_reused(tiny, merger_machine):
    cfg, models, _ = tiny
    meta = start_mergers("swap-test", 1, cfg.cache_names(), {}, None, 1, 8, str(models))
    assert meta.name == cfg.cache_dirname()
    assert start_mergers("swap-test", 1, cfg.cache_names(), {}, None, 1, 8, str(models)).name == meta.name  # reused
    with pytest.raises(ValueError, match=r"merger swap-test-merger-0 already runs .*tiny-cluster.*not "
                                         r"pool-mine-0123456789ab.*another router_name"):
        start_mergers("swap-test", 1, ["pool-mine-0123456789ab"], {}, None, 1, 8, str(models))
    with pytest.raises(ValueError, match="already runs"):  # the same model merging another way (built: linear)
        start_mergers("swap-test", 1, cfg.cache_names(), {"merge_operator": "fisher"}, None, 1, 8, str(models))
