"""Merging is exact, the eval cache equals the full forward, bad x / tasks are refused."""

import numpy as np
import pytest
import torch

from tanbr_ray.moe.data import TaskSplit
from tanbr_ray.moe.infer import make_batches, predict, prepare
from tanbr_ray.moe.merge import FFN_KEYS, fisher_merge, regmean_merge, validate_x


def _splits():
    sst = TaskSplit("SST-2", ["a fine film", "dull and long, too long", "great", "bad acting throughout the movie"], None, np.array([1, 0, 1, 0]))
    mnli = TaskSplit(
        "MNLI",
        ["A man eats.", "Two dogs run in a field.", "It rains."],
        ["Someone eats.", "Cats sleep.", "The ground is wet."],
        np.array([0, 2, 1]),
    )
    return {"SST-2": sst, "MNLI": mnli}


@pytest.mark.parametrize(
    "x, msg",
    [
        ([1.0], "length 2"),
        ([0.5, 0.5, 0.0], "length 2"),
        ([1.5, -0.5], "≥ 0"),
        ([0.6, 0.6], "sum to 1"),
        ([float("nan"), 1.0], "NaN"),
        ("ab", "numeric"),
    ],
)
def test_bad_x_is_refused(tiny_moe, x, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_moe.merged_state(x)


def test_budget_limits_non_zeros():
    assert validate_x([0.5, 0.5, 0.0], 3, budget=2).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="budget B=1"):
        validate_x([0.5, 0.5], 2, budget=1)
    validate_x([0.5, 0.5 + 5e-7], 2)  # within 1e-6
    with pytest.raises(ValueError, match="sum to 1"):
        validate_x([0.5, 0.5 + 5e-6], 2)


def test_unknown_task_is_refused(tiny_moe):
    ids = torch.tensor([[101, 2000, 102]])
    with pytest.raises(ValueError, match="unknown task 'QNLI' for this MoE"):
        tiny_moe(ids, torch.ones_like(ids), torch.zeros_like(ids), "QNLI")
    with pytest.raises(ValueError, match="unknown task 'NOPE'"):
        tiny_moe(ids, torch.ones_like(ids), torch.zeros_like(ids), "NOPE")


def test_merged_weights_are_the_weighted_parameters(tiny_moe):
    x = np.array([0.3, 0.7])
    st = tiny_moe.merged_state(x)
    for k in FFN_KEYS:
        want = 0.3 * tiny_moe.experts[k][:, 0] + 0.7 * tiny_moe.experts[k][:, 1]
        assert torch.allclose(st[k], want, atol=1e-6)
    one = tiny_moe.merged_state([0.0, 1.0])
    for k in FFN_KEYS:
        assert torch.equal(one[k], tiny_moe.experts[k][:, 1])


def test_one_hot_merge_reproduces_the_expert(tiny_moe):
    for b in make_batches(tiny_moe, _splits()):
        e = tiny_moe.task_index(b.task)
        x = np.eye(2)[e]
        with torch.no_grad():
            oracle = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="oracle")
            merged = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="merged", x=x, adapted=False)
            dense = tiny_moe.dense_model(x=x, adapted=False)(b.input_ids, b.attention_mask, b.token_type_ids, b.task)
            other = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="merged", x=1 - x, adapted=False)
        assert torch.allclose(oracle, merged, atol=1e-5)
        assert torch.allclose(oracle, dense, atol=1e-5)
        assert not torch.allclose(oracle, other, atol=1e-3)  # the experts really differ


def test_top1_routed_to_a_single_expert_equals_that_expert(tiny_moe):
    b = make_batches(tiny_moe, _splits())[0]
    with torch.no_grad():
        tiny_moe.router_w.zero_()
        tiny_moe.router_b.copy_(torch.tensor([[0.0, 9.0]] * len(tiny_moe.moe_layers)))
        top1 = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="top1")
        merged = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="merged", x=[0, 1], adapted=False)
        top2 = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="top2")
    assert torch.allclose(top1, merged, atol=1e-5)
    assert not torch.allclose(top2, top1, atol=1e-4)


@pytest.mark.parametrize("mode", ["dense", "oracle", "top1", "top2", "merged"])
def test_cache_equals_full_forward(tiny_moe, mode):
    with torch.no_grad():
        tiny_moe.adapted.fill_(1)  # adapted merged mode: overridden LayerNorms must sit above the cache
        tiny_moe.merge_attn_ln_w.mul_(1.3)
    splits = _splits()
    x = [0.25, 0.75] if mode == "merged" else None
    cache = prepare(tiny_moe, splits, batch_size=2)
    cached = predict(tiny_moe, cache, mode, x=x)
    for b in make_batches(tiny_moe, splits, batch_size=3):
        with torch.no_grad():
            full = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode=mode, x=x)
            h = tiny_moe.embed_to_first_moe(b.input_ids, b.attention_mask, b.token_type_ids)
            part = tiny_moe.forward_from_first_moe(h, b.attention_mask, b.task, mode, x=x)
        assert torch.allclose(full, part, atol=1e-5)
        assert np.array_equal(cached[b.task][b.index], full.argmax(-1).numpy())


def test_adapted_dense_model_equals_adapted_merged_forward(tiny_moe):
    with torch.no_grad():
        tiny_moe.adapted.fill_(1)
        tiny_moe.merge_attn_ln_w.mul_(0.7)
        for p in tiny_moe.merge_heads.parameters():
            p.add_(0.1)
    b = make_batches(tiny_moe, _splits())[1]
    with torch.no_grad():
        a = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="merged", x=[0.4, 0.6])
        d = tiny_moe.dense_model(x=[0.4, 0.6])(b.input_ids, b.attention_mask, b.token_type_ids, b.task)
        plain = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="merged", x=[0.4, 0.6], adapted=False)
    assert torch.allclose(a, d, atol=1e-5)
    assert not torch.allclose(a, plain, atol=1e-3)


def test_merged_model_holds_one_ffn_per_layer(tiny_moe):
    dm = tiny_moe.dense_model(x=[0.5, 0.5])
    assert dm.resident_bytes() == tiny_moe.resident_bytes("merged")
    assert tiny_moe.resident_bytes("merged") < tiny_moe.resident_bytes("oracle") < tiny_moe.resident_bytes("top2")
    ffn_bytes = sum(tiny_moe.experts[k].numel() * 4 for k in FFN_KEYS)
    assert tiny_moe.resident_bytes("oracle") - tiny_moe.resident_bytes("merged") == ffn_bytes // 2


def test_static_merges():
    torch.manual_seed(1)
    ex = {k: torch.randn(2, 3, 4, 5) for k in ("w1", "w2")} | {k: torch.randn(2, 3, 4) for k in ("b1", "b2", "ln_w", "ln_b")}
    equal_f = {k: torch.ones_like(v) for k, v in ex.items()}
    f = fisher_merge(ex, equal_f)
    assert torch.allclose(f["w1"], ex["w1"].mean(1), atol=1e-5)
    only0 = {k: torch.zeros_like(v) for k, v in ex.items()}
    for v in only0.values():
        v[:, 0] = 1.0
    assert torch.allclose(fisher_merge(ex, only0)["w2"], ex["w2"][:, 0], atol=1e-5)
    # RegMean with identical Gram matrices is the simple average; it solves the joint least squares
    eye = {"g1": torch.eye(5).expand(2, 3, 5, 5).clone(), "g2": torch.eye(5).expand(2, 3, 5, 5).clone()}
    r = regmean_merge(ex, eye, alpha=1.0)
    assert torch.allclose(r["w1"], ex["w1"].mean(1), atol=1e-5)
    X = torch.randn(3, 50, 5)
    G = torch.einsum("kni,knj->kij", X, X)
    r = regmean_merge(ex, {"g1": G.expand(2, 3, 5, 5).clone(), "g2": G.expand(2, 3, 5, 5).clone()}, alpha=1.0)
    W = r["w1"][0]
    Xc, Y = X.reshape(-1, 5), torch.cat([X[k] @ ex["w1"][0, k].T for k in range(3)])
    lstsq = torch.linalg.lstsq(Xc, Y).solution.T
    assert torch.allclose(W, lstsq, atol=1e-3)
