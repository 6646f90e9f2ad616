"""Merging is exact, the eval cache equals the full forward, bad x / tasks are refused."""

import numpy as np
import pytest
import torch

from tanbr_ray.moe.data import TaskSplit
from tanbr_ray.moe.infer import make_batches, predict, prepare
from tanbr_ray.moe.merge import FFN_KEYS, OPERATORS, ExpertStats, validate_x

from .conftest import random_stats


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


@pytest.mark.parametrize("mode", ["dense", "oracle", "top1", "top2", "soft", "merged"])
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


def _reference_regmean(moe, x, alpha):
    """RegMean written out in float64 from the raw Grams, as in Jin et al.'s code."""
    st, w = moe.stats, torch.as_tensor(x, dtype=torch.float64)
    out = {}
    for wk, g in (("w1", "g1"), ("w2", "g2")):
        G = st.grams[g].double() * st.tokens.double().view(1, -1, 1, 1)
        d = torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1))
        G = alpha * G + (1 - alpha) * d
        lhs = torch.einsum("k,mkij->mij", w, G)
        rhs = torch.einsum("k,mkij,mkoj->mio", w, G, moe.experts[wk].double())
        out[wk] = torch.linalg.solve(lhs, rhs).transpose(-1, -2)
    return out


@pytest.mark.parametrize("op", OPERATORS)
def test_every_operator_gives_the_expert_at_a_vertex(tiny_moe_stats, op):
    for e in range(2):
        st = tiny_moe_stats.merged_state(np.eye(2)[e], op)
        for k in FFN_KEYS:
            assert torch.equal(st[k], tiny_moe_stats.experts[k][:, e]), (op, k)


def test_uniform_x_gives_the_static_fisher_and_regmean(tiny_moe_stats):
    moe = tiny_moe_stats
    u = np.array([0.5, 0.5])
    f = moe.merged_state(u, "fisher")
    for k in FFN_KEYS:
        F = moe.stats.fisher[k].float() + 1e-12
        assert torch.allclose(f[k], (F * moe.experts[k]).sum(1) / F.sum(1), atol=1e-6), k
        assert torch.equal(moe.static_state("fisher")[k], f[k])
    r = moe.merged_state(u, "regmean")
    ref = _reference_regmean(moe, u, moe.regmean_alpha)
    for k in ("w1", "w2"):
        assert torch.allclose(r[k].double(), ref[k], atol=1e-4, rtol=1e-3), k
        assert torch.equal(moe.static_state("regmean")[k], r[k])
    for k in ("b1", "b2", "ln_w", "ln_b"):  # biases and LayerNorms are x-averaged
        assert torch.allclose(r[k], moe.experts[k].mean(1), atol=1e-6)
    lin = moe.merged_state(u, "linear")
    assert not torch.allclose(r["w1"], lin["w1"], atol=1e-3)  # the Grams matter


def test_operators_weight_the_experts_by_x(tiny_moe_stats):
    moe = tiny_moe_stats
    x = np.array([0.3, 0.7])
    f = moe.merged_state(x, "fisher")
    F = moe.stats.fisher["w2"].float() + 1e-12
    want = (0.3 * F[:, 0] * moe.experts["w2"][:, 0] + 0.7 * F[:, 1] * moe.experts["w2"][:, 1]) / (0.3 * F[:, 0] + 0.7 * F[:, 1])
    assert torch.allclose(f["w2"], want, atol=1e-6)
    r = moe.merged_state(x, "regmean")
    ref = _reference_regmean(moe, x, moe.regmean_alpha)
    assert torch.allclose(r["w2"].double(), ref["w2"], atol=1e-4, rtol=1e-3)
    assert torch.allclose(r["b1"], 0.3 * moe.experts["b1"][:, 0] + 0.7 * moe.experts["b1"][:, 1], atol=1e-6)


@pytest.mark.parametrize("op", OPERATORS)
def test_merges_stay_fp32_under_bf16_autocast(tiny_moe_stats, op):
    """A build stage or bf16 scoring may merge inside autocast; the merge itself must not drop to bf16."""
    x = np.array([0.3, 0.7])
    want = tiny_moe_stats.merged_state(x, op)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tiny_moe_stats.merged_state(x, op)
    for k in want:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want[k]), (op, k)


def test_regmean_solves_the_joint_least_squares(tiny_moe):
    """With every expert seeing the same inputs X, RegMean (α = 1) is the least-squares fit of all
    experts' outputs on X."""
    moe = tiny_moe
    M, K = moe.experts["w1"].shape[:2]
    g = torch.Generator().manual_seed(3)
    X = torch.randn(300, moe.bert_config.hidden_size, generator=g)
    A = torch.randn(300, moe.bert_config.intermediate_size, generator=g)
    grams = {"g1": (X.T @ X).expand(M, K, -1, -1).clone(), "g2": (A.T @ A).expand(M, K, -1, -1).clone()}
    fisher = {k: torch.ones_like(v) for k, v in moe.experts.items()}
    moe.set_stats(ExpertStats.from_raw(fisher, grams, torch.full((K,), 300.0)))
    moe.regmean_alpha = 1.0
    W = moe.merged_state([0.5, 0.5], "regmean")["w1"][0]
    Y = torch.cat([X @ moe.experts["w1"][0, k].T for k in range(K)])
    lstsq = torch.linalg.lstsq(X.repeat(K, 1), Y).solution.T
    assert torch.allclose(W, lstsq, atol=2e-2)  # Grams are stored in fp16


def test_operator_errors_are_clear(tiny_moe, tiny_moe_stats):
    with pytest.raises(ValueError, match="merge operator: unknown 'avg'"):
        tiny_moe_stats.merged_state([0.5, 0.5], "avg")
    tiny_moe.set_stats(None)
    with pytest.raises(ValueError, match="needs the experts' statistics"):
        tiny_moe.merged_state([0.5, 0.5], "regmean")
    assert torch.equal(tiny_moe.merged_state([0.0, 1.0], "regmean")["w1"], tiny_moe.experts["w1"][:, 1])
    with pytest.raises(ValueError, match="fisher.w1 shaped"):
        bad = random_stats(tiny_moe)
        bad.fisher["w1"] = bad.fisher["w1"][:, :1]
        tiny_moe.set_stats(bad)


def test_soft_mode_with_one_hot_router_equals_the_oracle(tiny_moe):
    b = make_batches(tiny_moe, _splits())[0]
    e = tiny_moe.task_index(b.task)
    with torch.no_grad():
        tiny_moe.router_w.zero_()
        tiny_moe.router_b.zero_()
        tiny_moe.router_b[:, e] = 40.0
        soft = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="soft")
        oracle = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="oracle")
        tiny_moe.router_b.zero_()
        even = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="soft")
        merged = tiny_moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="merged", x=[0.5, 0.5], adapted=False)
    assert torch.allclose(soft, oracle, atol=1e-5)
    assert torch.allclose(even, merged, atol=1e-5)  # equal probabilities: the uniform linear merge
    assert tiny_moe.resident_bytes("soft") == tiny_moe.resident_bytes("top1")


def test_soft_weights_average_only_real_tokens(tiny_moe):
    h = torch.randn(2, 5, tiny_moe.bert_config.hidden_size)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    p = tiny_moe.soft_weights(0, h, mask)
    want = torch.softmax(tiny_moe.router_logits(0, h[0, :3]), -1).mean(0)
    assert torch.allclose(p[0], want, atol=1e-6) and torch.allclose(p.sum(-1), torch.ones(2))
