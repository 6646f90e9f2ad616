"""A native MoE checkpoint as the model: its own experts and router per sparse layer, tasks mapped to
experts by measured router usage, merge statistics under the model's own routing."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from tanbr_ray.moe.build import _loss
from tanbr_ray.moe.data import TaskSplit
from tanbr_ray.moe.families import Family
from tanbr_ray.moe.merge import ExpertStats
from tanbr_ray.moe.pool_config import PoolConfig
from tanbr_ray.moe.pool_load import batches, record_inputs
from tanbr_ray.moe.pool_model import PoolMoE, _safe
from tanbr_ray.moe.pool_parts import PoolParts, apply_parts
from tanbr_ray.moe.precision import fp32


@torch.no_grad()
def assemble_native(cfg: PoolConfig, family: Family, base: nn.Module, heads: dict, moe_layers: list[int],
                     adapt: list[str], parts: PoolParts | None) -> PoolMoE:
    """A native MoE: its own experts and router (the base checkpoint's) in every MoE layer, each task's
    head; the dense mode's MLP is the experts' uniform average. `expert_of` is measured later."""
    layers = family.layer_list(base)
    read = [family.native_experts(layers[l]) for l in moe_layers]
    K, top_k, renorm = len(read[0][0]), read[0][2], read[0][3]
    stacked = {k: torch.stack([torch.stack([ex[e][k].detach() for e in range(K)]) for ex, *_ in read])
               for k in read[0][0][0]}
    router = torch.stack([r[1].detach() for r in read]).clone()
    moe = PoolMoE(family, base, cfg.tasks, heads, moe_layers, cfg.budget, None, adapt, num_experts=K,
                  expert_of={t: 0 for t in cfg.tasks}, expert_map="router usage")
    moe.native_top_k, moe.renormalize = top_k, renorm
    for k in moe.keys:
        moe.experts[_safe(k)].copy_(stacked[k])
        for m, mlp in enumerate(moe.mlps):
            mlp.template.get_parameter(k).copy_(stacked[k][m].mean(0))
    moe.router_w.copy_(router)
    if parts is not None:
        apply_parts(moe, parts, cfg.parts)
    return moe


@torch.no_grad()
def measure_expert_map(moe: PoolMoE, cfg: PoolConfig, data: dict) -> dict:
    """Each task's share of tokens the model's own router sends to each expert first (all MoE layers):
    the task's expert is its most used one."""
    shares = {}
    for t in moe.tasks:
        counts = torch.zeros(moe.num_experts)
        for m, h in record_inputs(moe, cfg, data[t].head(cfg.build.router_examples, cfg.build.seed + 1), "top1"):
            counts += torch.bincount(moe.router_logits(m, h).argmax(-1).cpu(), minlength=moe.num_experts).float()
        shares[t] = (counts / counts.sum().clamp(min=1)).tolist()
    moe.expert_of = {t: int(np.argmax(v)) for t, v in shares.items()}
    return {"expert_of": moe.expert_of, "shares": shares}


def native_stats(moe: PoolMoE, cfg: PoolConfig, data: dict, progress: bool) -> ExpertStats:
    """A native MoE's experts belong to no task: each one's Fisher under the model's own routing, and
    its Grams on the tokens that routing sends it, over every task's data."""
    k_mode = f"top{min(getattr(moe, 'native_top_k', 2), 2)}"
    experts = moe.expert_tensors()
    fisher = {k: torch.zeros_like(v) for k, v in experts.items()}
    grams: dict[str, torch.Tensor] = {}
    tokens = torch.zeros(moe.num_experts)
    n = 0
    for t in tqdm(moe.tasks, desc="fisher + regmean statistics", disable=not progress, leave=False):
        for p in experts.values():
            p.requires_grad_(True)
        try:
            for b in batches(moe, cfg, data[t].head(cfg.build.fisher_examples, cfg.build.seed)):
                b = b.to(moe.device)
                logits = moe(b.input_ids, b.attention_mask, b.token_type_ids, t, mode=k_mode, adapted=False)
                for k, gr in zip(experts, torch.autograd.grad(_loss(t, logits, b.labels), list(experts.values()))):
                    fisher[k] += gr.pow(2) * len(b.index)
                n += len(b.index)
        finally:
            for p in experts.values():
                p.requires_grad_(False)
        _routed_grams(moe, cfg, data[t], int(k_mode[-1]), grams, tokens)
    for k in fisher:
        fisher[k] /= max(n, 1)
    return ExpertStats.from_raw(fisher, grams, (tokens / len(moe.moe_layers)).clamp(min=1.0))


@torch.no_grad()
def _routed_grams(moe: PoolMoE, cfg: PoolConfig, split: TaskSplit, k: int, grams: dict, tokens: torch.Tensor) -> None:
    """Grams of each expert's MLP linears' inputs on the tokens the router sends it (top-k)."""
    M, K = len(moe.moe_layers), moe.num_experts
    with fp32(moe.device):
        for m, x in record_inputs(moe, cfg, split.head(cfg.build.regmean_examples, cfg.build.seed), f"top{k}"):
            top = moe.router_logits(m, x).topk(k, dim=-1).indices
            for e in range(K):
                rows = (top == e).any(-1)
                if not rows.any():
                    continue
                params = {kk: v[m, e] for kk, v in moe.expert_tensors().items()}
                for g, a in moe.gram_inputs(m, params, x[rows]).items():
                    if g not in grams:
                        grams[g] = torch.zeros(M, K, a.shape[-1], a.shape[-1], device=a.device)
                    grams[g][m, e] += a.T @ a
                tokens[e] += int(rows.sum())
