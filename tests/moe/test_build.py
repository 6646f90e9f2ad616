"""A tiny real build on the shared GLUE copy (2 tasks, a few steps), its cache, and the bench on it."""

import json

import numpy as np
import pytest

from tanbr_ray.bench.model import BENCH_MODES, format_table, run_bench
from tanbr_ray.moe.build import load_or_build
from tanbr_ray.moe.data import load_task


@pytest.fixture(scope="module")
def built(tmp_path_factory, data_dir):
    from tests.moe.conftest import TINY
    from tanbr_ray.moe.config import MoEConfig

    cfg = MoEConfig(**TINY)
    d = tmp_path_factory.mktemp("models")
    return cfg, d, load_or_build(cfg, d, progress=False, data_dir=data_dir)


def test_data_loader_and_missing_source(data_dir, tmp_path, monkeypatch):
    sp = load_task("MNLI", "dev", data_dir)
    assert len(sp) == 1000 and sp.text_b is not None and set(np.unique(sp.labels)) == {0, 1, 2}
    with pytest.raises(ValueError, match="TANBR_DATA_DIR"):
        load_task("SST-2", "train", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown task"):
        load_task("SQuAD", "dev", data_dir)


def test_build_stages_and_cache_reuse(built):
    cfg, d, moe = built
    info = moe.build_info
    assert {"expert_SST-2", "expert_MNLI", "router", "static_merges", "adaptation"} <= set(info["stages"])
    assert moe.adapted.item() == 1 and set(moe.static_merges) == {"fisher", "regmean"}
    cache_dir = d / cfg.cache_dirname()
    mtime = (cache_dir / "model.safetensors").stat().st_mtime_ns
    again = load_or_build(cfg, d, progress=False)
    assert (cache_dir / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    for k, v in moe.state_dict().items():
        assert (v == again.state_dict()[k]).all(), k
    (cache_dir / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_or_build(cfg, d, progress=False)  # a corrupt cache is refused, not silently rebuilt


def test_bench_model_schema(built, data_dir, tmp_path):
    _, _, moe = built
    res = run_bench(moe, data_dir, eval_examples=16, landscape_size=12, landscape_examples=16, no_adapt_size=4, screen_examples=4, finalists=2, runs=2, warmup=1, seq_len=16, progress=False)
    json.loads(json.dumps(res, default=float))
    assert set(res["modes"]) == set(BENCH_MODES)
    for m in BENCH_MODES:
        v = res["modes"][m]
        assert set(v["latency_ms_p50"]) == {"1", "8", "32"} and all(t > 0 for t in v["latency_ms_p50"].values())
        assert all(0 <= s <= 1 for s in v["scores"].values()) and isinstance(v["bytes"], int)
    assert res["modes"]["merged"]["bytes"] < res["modes"]["top2"]["bytes"]
    assert len(res["landscape"]) == 2  # 2 tasks: uniform and one task at 0.7
    for e in res["landscape"]:
        assert len(e["best_x"]) == 2 and abs(sum(e["psi"].values()) - 1) < 1e-9
        assert {"best", "uniform", "psi_merge", "oracle"} <= set(e)
    lm = res["landscape_meta"]
    assert lm["num_x"] >= 12 and lm["num_finalists"] < lm["num_x"] and res["build_seconds"] > 0
    assert "merge landscape" in format_table(res)
