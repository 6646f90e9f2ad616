"""The parts of a pool that are not experts or heads (embeddings, attention, norms), merged once: a
tensor every fine-tune holds identically is kept; the rest by RegMean on each fine-tune's own task
inputs, or a plain average."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from tanbr_ray.moe.data import TaskSplit, bucket_batches
from tanbr_ray.moe.families import Family
from tanbr_ray.moe.pool_config import PoolConfig
from tanbr_ray.moe.pool_load import max_len


def _mlp_names(family: Family, backbone: nn.Module, moe_layers: list[int]) -> set[str]:
    """State-dict names (in the backbone) of the MLP parameters of the MoE layers."""
    layers = family.layer_list(backbone)
    ids = {id(p) for l in moe_layers for p in family.block_params(layers[l])}
    return {n for n, p in backbone.named_parameters() if id(p) in ids}


def _linear_inputs(module: nn.Module, names: set[str]) -> dict[str, nn.Module]:
    """The Linear / Conv1D modules among `names` (weights whose input Gram RegMean needs)."""
    out = {}
    for n, mod in module.named_modules():
        if f"{n}.weight" in names and (isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"):
            out[f"{n}.weight"] = mod
    return out


@torch.no_grad()
def _shared_grams(clf, family: Family, split: TaskSplit, tok, cfg: PoolConfig, names: set[str]) -> dict:
    """Input Grams (real tokens) of the shared linears `names` in one fine-tune, on its own task."""
    bb = getattr(clf, family.backbone)
    mods = _linear_inputs(bb, names)
    grams: dict[str, torch.Tensor] = {}
    keep = {"mask": None}

    def hook(name):
        def fn(mod, inputs, _out):
            x = inputs[0].float()
            x = x[keep["mask"]] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        sp = split.head(cfg.build.regmean_examples, cfg.build.seed)
        for b in bucket_batches(tok, sp, max_len(cfg, sp.task), cfg.build.batch_size):
            keep["mask"] = b.attention_mask.bool()
            types = family.token_types and getattr(clf.config, "type_vocab_size", 1) > 1
            clf(input_ids=b.input_ids, attention_mask=b.attention_mask,
                **({"token_type_ids": b.token_type_ids} if types else {}))  # a pair's segments, as it was tuned
    finally:
        for h in handles:
            h.remove()
    return grams


def merge_shared(cfg: PoolConfig, family: Family, base: nn.Module, clfs: dict, data: dict, tok,
                 moe_layers: list[int], progress: bool) -> dict:
    """Everything but the experts' MLPs and the heads, merged once into `base`: a tensor the
    fine-tunes share is kept as is; the rest by RegMean (linear weights, on each fine-tune's task) or
    a plain average. Returns what was merged how."""
    skip = _mlp_names(family, base, moe_layers)
    states = {t: getattr(c, family.backbone).state_dict() for t, c in clfs.items()}
    own = base.state_dict()
    differ = sorted(n for n in own if n not in skip and "pooler" not in n
                    and any(not torch.equal(s[n], states[cfg.tasks[0]][n]) for s in states.values()))
    linear = set(_linear_inputs(base, set(differ))) if cfg.shared_merge == "regmean" else set()
    grams = {t: _shared_grams(clfs[t], family, data[t], tok, cfg, linear)
             for t in tqdm(cfg.tasks if linear else [], desc="shared RegMean Grams", disable=not progress, leave=False)}
    merged = {}
    for n in differ:
        stack = torch.stack([states[t][n].float() for t in cfg.tasks])
        if n in linear:
            merged[n] = _regmean_one(stack, [grams[t][n] for t in cfg.tasks], cfg.regmean_alpha,
                                     transposed=type(dict(base.named_modules())[n.rsplit(".", 1)[0]]).__name__ == "Conv1D")
        else:
            merged[n] = stack.mean(0)
    for n in own:
        if n not in skip and "pooler" not in n:
            own[n] = merged.get(n, states[cfg.tasks[0]][n])
    base.load_state_dict(own)
    return {"kept": len([n for n in own if n not in skip and "pooler" not in n]) - len(differ),
            "regmean": len(linear), "averaged": len(differ) - len(linear)}


@torch.no_grad()
def _regmean_one(W: torch.Tensor, grams: list[torch.Tensor], alpha: float, transposed: bool) -> torch.Tensor:
    """RegMean of K weights [K, out, in] (or [K, in, out] for Conv1D) given their inputs' Grams."""
    Wt = W if transposed else W.transpose(-1, -2)  # [K, in, out]
    G = torch.stack(grams)
    d = torch.diagonal(G, dim1=-2, dim2=-1).clone()
    G = G * alpha
    torch.diagonal(G, dim1=-2, dim2=-1).copy_(d)
    lhs = G.sum(0)
    lhs.diagonal().add_(1e-6 * lhs.diagonal().mean())
    out = torch.linalg.solve(lhs, torch.einsum("kij,kjo->io", G, Wt))
    return out if transposed else out.T

