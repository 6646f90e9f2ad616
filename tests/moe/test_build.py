"""A tiny real build on the shared GLUE copy (2 tasks, a few steps), its cache, and the bench on it."""

import json

import numpy as np
import pytest

from tanbr_ray.bench.model import BENCH_MODES, format_table, run_bench
from tanbr_ray.moe.build import load_or_build, load_or_build_info
from tanbr_ray.moe.data import load_task


@pytest.fixture(scope="module")
def built(tmp_path_factory, data_dir):
    from tests.moe.conftest import TINY
    from tanbr_ray.moe.config import MoEConfig

    cfg = MoEConfig(**TINY)
    d = tmp_path_factory.mktemp("models")
    return cfg, d, load_or_build_info(cfg, d, progress=False, data_dir=data_dir)


def test_data_loader_and_missing_source(data_dir, tmp_path, monkeypatch):
    sp = load_task("MNLI", "dev", data_dir)
    assert len(sp) == 1000 and sp.text_b is not None and set(np.unique(sp.labels)) == {0, 1, 2}
    with pytest.raises(ValueError, match="TANBR_DATA_DIR"):
        load_task("SST-2", "train", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown task"):
        load_task("SQuAD", "dev", data_dir)


def test_build_stages_and_cache_reuse(built):
    cfg, d, b = built
    moe, info = b.moe, b.build_info
    assert {"expert_SST-2", "expert_MNLI", "router", "expert_stats", "adaptation"} <= set(info["stages"])
    assert moe.adapted.item() == 1 and moe.stats is not None
    for task, e in info["experts"].items():  # every tiny expert learned something on its own rows
        assert e["probe_loss_after"] < e["probe_loss_before"], (task, e)
        assert len(e["held_out"]) == e["epochs"]
    cache_dir = d / cfg.cache_dirname()
    assert b.cache_dir == cache_dir
    mtime = (cache_dir / "model.safetensors").stat().st_mtime_ns
    again = load_or_build(cfg, d, progress=False)
    assert (cache_dir / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    for k, v in moe.state_dict().items():
        assert (v == again.state_dict()[k]).all(), k
    (cache_dir / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_or_build(cfg, d, progress=False)  # a corrupt cache is refused, not silently rebuilt


def test_bench_model_schema(built, data_dir, tmp_path):
    _, _, b = built
    res = run_bench(b.moe, data_dir, build_info=b.build_info, eval_examples=16, mixes=2, landscape_examples=16,
                    random_candidates=4, screen_examples=4, finalists=1, budget=2, runs=2, warmup=1, seq_len=16, progress=False)
    json.loads(json.dumps(res, default=float))
    assert set(res["modes"]) == set(BENCH_MODES)
    for m in BENCH_MODES:
        v = res["modes"][m]
        assert set(v["latency_ms_p50"]) == {"1", "8", "32"} and all(t > 0 for t in v["latency_ms_p50"].values())
        assert all(0 <= s <= 1 for s in v["scores"].values()) and isinstance(v["bytes"], int)
    assert res["modes"]["merged"]["bytes"] < res["modes"]["top2"]["bytes"] == res["modes"]["soft"]["bytes"]
    assert set(res["experts"]) == {"SST-2", "MNLI"}
    for e in res["experts"].values():
        assert {"metric", "accuracy", "majority"} <= set(e) and 0 <= e["majority"] <= 1
    assert set(res["landscape_by_operator"]) == {"linear", "fisher", "regmean"}
    for v in res["landscape_by_operator"].values():
        assert set(v["mean"]) == {"best_psi_family", "best_search", "psi", "psi2", "uniform"} and len(v["mixes"]) == 2
        for m in v["mixes"]:
            assert m["best_search_on_selection_half"] >= 0 and abs(sum(m["psi"].values()) - 1) < 1e-9
    assert set(res["landscape_reference"]) >= {"static_regmean", "static_fisher", "switch_top1", "oracle"}
    assert set(res["merge_ms_p50"]) == {"linear", "fisher", "regmean"} and res["build_seconds"] > 0
    assert len(res["router"]["routed_to_task_expert"]) == len(b.moe.moe_layers)
    # the same uniform linear merge scored two ways: the landscape's per-task table and the mode table agree in kind
    assert all(0 <= v <= 1 for v in res["landscape_by_operator"]["linear"]["uniform_per_task"].values())
    assert "merge landscape" in format_table(res)


def test_transfer_init_copies_the_expert_and_maps_the_labels():
    import torch
    from transformers import BertConfig

    from tanbr_ray.moe.build import transfer_init
    from tanbr_ray.moe.merge import FFN_KEYS
    from tanbr_ray.moe.model import TaskMoE

    torch.manual_seed(0)
    bc = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    moe = TaskMoE(bc, ["MNLI", "RTE"], None, 8, 0.0)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_()
    transfer_init(moe, "RTE", "MNLI", [[0], [1, 2]])
    for k in FFN_KEYS:
        assert torch.equal(moe.experts[k][:, 1], moe.experts[k][:, 0])
    rte, mnli = moe.heads["RTE"], moe.heads["MNLI"]
    assert torch.equal(rte.fc.weight, mnli.fc.weight)
    assert torch.allclose(rte.out.weight[1], mnli.out.weight[1:].mean(0))
    h = torch.randn(5, 16)
    with torch.no_grad():
        p_rte = torch.softmax(rte.eval()(h), -1)[:, 0]
        z = mnli.eval()(h)
    # with the two non-entailment logits equal, RTE's entailment probability is MNLI's exactly
    z_eq = torch.stack([z[:, 0], z[:, 1:].mean(1), z[:, 1:].mean(1)], 1)
    assert torch.allclose(p_rte, torch.softmax(z_eq, -1)[:, 0], atol=1e-5)


@pytest.mark.parametrize("bf16", [False, True])
def test_fit_learns_under_the_builds_autocast(bf16):
    """A whole build stage runs in one autocast region: with autocast's cast cache on, every forward
    would reuse the first bf16 copy of the trained weights and the loss would not move."""
    import torch
    import torch.nn.functional as F

    from tanbr_ray.moe.build import build_autocast, fit
    from tanbr_ray.moe.config import MoEConfig

    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 16, generator=g)
    y = (X[:, 0] > 0).long()
    w = torch.zeros(2, 16, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    batches = [torch.randint(0, 256, (64,), generator=g) for _ in range(60)]
    loss_of = lambda idx: F.cross_entropy(F.linear(X[idx], w, b).float(), y[idx])  # noqa: E731
    with build_autocast(MoEConfig(bf16=bf16), torch.device("cpu")):
        res = fit([w, b], batches, loss_of, 0.05, warmup_frac=0.0, progress=False)
        final = float(loss_of(torch.arange(256)).detach())
    assert res.steps == 60 and final < 0.3 < np.log(2)  # learned: ln 2 is where it started


def test_isolated_build_frees_its_memory_and_equals_the_in_process_one(built, data_dir, tmp_path):
    """`isolate=True` (the main job's build) runs in a child process and loads what it cached: the
    same weights as an in-process build; a failing build raises and caches nothing."""
    cfg, _, b = built
    iso = load_or_build_info(cfg, tmp_path / "models", progress=False, data_dir=data_dir, isolate=True)
    assert iso.cache_dir == tmp_path / "models" / cfg.cache_dirname()
    assert iso.moe.identity["weights_sha256"] == b.moe.identity["weights_sha256"]
    assert iso.build_info["stages"].keys() == b.build_info["stages"].keys()
    with pytest.raises(RuntimeError, match="failed"):
        load_or_build_info(cfg, tmp_path / "other", progress=False, data_dir=tmp_path / "no-glue", isolate=True)
    assert not (tmp_path / "other" / cfg.cache_dirname()).exists()
