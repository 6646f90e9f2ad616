"""Tiny fixtures: a randomly initialised 2-task MoE whose experts genuinely differ."""

import os

import pytest
import torch

from tanbr_ray.moe.build import attach_tokenizer
from tanbr_ray.moe.config import MoEConfig, TinyBase
from tanbr_ray.moe.merge import FFN_KEYS, ExpertStats
from tanbr_ray.moe.model import TaskMoE
from transformers import BertConfig

TINY = dict(
    name="tiny",
    tiny_base=TinyBase(),
    tasks=["SST-2", "MNLI"],
    train_examples=32,
    batch_size=16,
    max_len_single=16,
    max_len_pair=24,
    head_hidden=16,
    heads_only_examples=32,
    heads_only_epochs=2,
    router_examples=8,
    router_steps=10,
    fisher_examples=8,
    regmean_examples=8,
    adapt_steps=3,
)


@pytest.fixture()
def tiny_cfg():
    return MoEConfig(**TINY)


@pytest.fixture()
def tiny_moe(tiny_cfg):
    """Random weights, experts perturbed apart, a router and heads: exactness needs no training."""
    torch.manual_seed(0)
    bc = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    moe = TaskMoE(bc, tiny_cfg.tasks, None, 16, 0.1)
    with torch.no_grad():
        for p in moe.parameters():
            if p.dim() > 0:
                p.normal_(0, 0.2)
        moe.base["ln_w"].fill_(1.0)
        moe.reset_experts_to_base()
        for k in FFN_KEYS:
            moe.experts[k].add_(torch.randn_like(moe.experts[k]) * 0.3)
    attach_tokenizer(moe, tiny_cfg)
    moe.eval()
    return moe


def random_stats(moe: TaskMoE, seed: int = 0, rows: int = 200) -> ExpertStats:
    """Positive Fishers and genuine Gram matrices (of random inputs) for every expert."""
    g = torch.Generator().manual_seed(seed)
    fisher = {k: torch.rand(v.shape, generator=g) * 1e-3 for k, v in moe.experts.items()}
    M, K = moe.experts["w1"].shape[:2]
    H, I = moe.bert_config.hidden_size, moe.bert_config.intermediate_size
    x1 = torch.randn(M, K, rows, H, generator=g) * torch.rand(M, K, 1, H, generator=g)
    x2 = torch.nn.functional.gelu(torch.randn(M, K, rows, I, generator=g))
    grams = {"g1": x1.transpose(-1, -2) @ x1, "g2": x2.transpose(-1, -2) @ x2}
    return ExpertStats.from_raw(fisher, grams, torch.full((K,), float(rows)))


@pytest.fixture()
def tiny_moe_stats(tiny_moe):
    """The tiny MoE with statistics attached (fisher and regmean operators work)."""
    tiny_moe.set_stats(random_stats(tiny_moe))
    return tiny_moe
