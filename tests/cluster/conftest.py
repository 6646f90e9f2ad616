"""A tiny MoE whose experts clearly differ (so x changes predictions), cached where the mergers
load it, and a 3-node fleet; Ray runs with auth disabled and its own ports."""

import os

import pytest
import torch

from tanbr_ray.moe import MoEConfig, load_or_build
from tanbr_ray.moe.build import load_or_build_info
from tanbr_ray.moe.config import TinyBase
from tanbr_ray.moe.merge import FFN_KEYS
from tanbr_ray.moe.store import save_moe
from tanbr_ray.sim.fleet import Fleet

TINY = dict(name="tiny-cluster", tiny_base=TinyBase(), tasks=["SST-2", "MNLI"], train_examples=32, batch_size=16,
            max_len_single=16, max_len_pair=24, head_hidden=16, heads_only_examples=32, heads_only_epochs=2,
            router_examples=8, router_steps=10, fisher_examples=8, regmean_examples=8, adapt_steps=3)
FLEET = dict(classes=[
    dict(name="board", count=2, slowdown=4, memory_x_dense=1.001, bandwidth_mbps=50, rtt_ms=20, budget=1, rate=1.0,
         replica_cpus=0.5),
    dict(name="dc", count=1, slowdown=1, memory_x_dense=8, bandwidth_mbps=1000, rtt_ms=3, budget=2, rate=2.0,
         mix={"SST-2": 0.8, "MNLI": 0.2}, replica_cpus=0.5),
])


@pytest.fixture(scope="session")
def data_dir():
    d = os.environ.get("TANBR_DATA_DIR")
    assert d, "set TANBR_DATA_DIR to the GLUE copy (e.g. ../shared/data/glue)"
    return d


@pytest.fixture(scope="session", autouse=True)
def ray_env():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, data_dir):
    """(config, models dir, model): experts pushed apart after the tiny build, then re-cached."""
    cfg, d = MoEConfig(**TINY), tmp_path_factory.mktemp("models")
    built = load_or_build_info(cfg, models_dir=d, progress=False, data_dir=data_dir)
    moe = built.moe
    torch.manual_seed(1)
    with torch.no_grad():
        for k in FFN_KEYS:
            moe.experts[k].add_(torch.randn_like(moe.experts[k]) * 0.5)
    save_moe(moe, cfg, d / cfg.cache_dirname(), built.build_info)
    return cfg, d, load_or_build(cfg, models_dir=d, progress=False)


@pytest.fixture(scope="session")
def fleet():
    return Fleet(**FLEET)


@pytest.fixture(scope="session")
def published(tiny, tmp_path_factory):
    """The tiny model published to a storage location (what `tanbr build-moe --publish` does): the
    cluster's nodes fetch it from there into caches of their own."""
    from tanbr_ray.moe.publish import publish

    cfg, d, _ = tiny
    storage = str(tmp_path_factory.mktemp("storage"))
    publish(d / cfg.cache_dirname(), storage)
    return storage
