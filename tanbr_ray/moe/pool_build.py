"""Build a pool of fine-tunes (or a native MoE) into a `PoolMoE`, in order: check every checkpoint and
each task's data before anything runs (`pool_load`), merge the shared parts once (`pool_shared`),
stack the MLPs as experts and keep each task's head, train the token router, compute the experts'
merge statistics, run the merge-aware adaptation (each unless the pool's parts file holds it); the
cache is `pool_store`'s."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tanbr_ray.moe.build import _loss, fit, sample_x
from tanbr_ray.moe.config import resolve_device
from tanbr_ray.moe.data import TaskSplit, bucket_batches
from tanbr_ray.moe.families import Family
from tanbr_ray.moe.merge import ExpertStats, merge_experts
from tanbr_ray.moe.pool_config import PoolConfig
from tanbr_ray.moe.pool_load import (batches, load_checkpoints, load_configs, load_data, load_tokenizer, max_len,
                                     record_inputs)
from tanbr_ray.moe.pool_model import PoolMoE
from tanbr_ray.moe.pool_native import assemble_native, measure_expert_map, native_stats
from tanbr_ray.moe.pool_parts import PoolParts, apply_parts, mean_mlp_head
from tanbr_ray.moe.pool_shared import merge_shared
from tanbr_ray.moe.precision import bf16, fp32

log = logging.getLogger(__name__)


def check_moe_layers(cfg: PoolConfig, family: Family, base: nn.Module) -> None:
    """`moe_layers`, when given, must name distinct layers the model has (a native MoE's sparse ones)."""
    if cfg.moe_layers is None:
        return
    L = len(family.layer_list(base))
    ok = set(family.sparse_layers(base)) if family.native else set(range(L))
    bad = sorted(set(cfg.moe_layers) - ok)
    if bad or len(set(cfg.moe_layers)) != len(cfg.moe_layers) or not cfg.moe_layers:
        raise ValueError(f"moe_layers: {cfg.moe_layers} must be distinct layers among {sorted(ok)}"
                         + (" (the model's sparse layers)" if family.native else ""))


def default_adapt_names(family: Family, backbone: nn.Module, moe_layers: list[int]) -> list[str]:
    """What merge-aware adaptation trains besides the merged-mode heads: the norms outside the MLP
    blocks of the layers above the first MoE layer (they see the merged MLPs' outputs)."""
    layers = family.layer_list(backbone)
    mlp = {id(p) for l in moe_layers for p in family.block_params(layers[l])}
    above = {id(p) for l in range(min(moe_layers) + 1, len(layers)) for p in layers[l].parameters()}
    return [n for mod_name, mod in backbone.named_modules() if "norm" in type(mod).__name__.lower()
            for n, p in ((f"{mod_name}.{k}", v) for k, v in mod.named_parameters(recurse=False))
            if id(p) in above and id(p) not in mlp]


def assemble(cfg: PoolConfig, family: Family, base: nn.Module, clfs: dict, parts: PoolParts | None) -> PoolMoE:
    """The PoolMoE: base (shared parts merged) with experts = each fine-tune's MLPs, heads kept (a
    checkpoint's mean-pooled MLP head when it carries one), and the parts given."""
    hidden = base.config.hidden_size
    own = {e.task: mean_mlp_head(e.checkpoint, clfs[e.task].config, hidden) for e in cfg.experts}
    if len({v is None for v in own.values()}) > 1:
        raise ValueError("experts: some checkpoints carry a tanbr_head and some do not; one head kind per pool")
    mean = next(iter(own.values())) is not None
    heads = {t: own[t] if mean else family.head_modules(c) for t, c in clfs.items()}
    if hasattr(base, "pooler"):
        base.pooler = None  # BERT's pooler is each fine-tune's own (in its head)
    if cfg.moe_layers is not None:
        moe_layers = cfg.moe_layers
    else:
        moe_layers = family.sparse_layers(base) if family.native else list(range(len(family.layer_list(base))))
    if parts is not None and (parts.adapt or parts.merge_heads):
        adapt = sorted(parts.adapt)
    else:
        adapt = default_adapt_names(family, base, moe_layers) if cfg.build.adapt_steps > 0 else []
    if family.native:
        return assemble_native(cfg, family, base, heads, moe_layers, adapt, parts)
    moe = PoolMoE(family, base, cfg.tasks, heads, cfg.moe_layers, cfg.budget, "mean" if mean else None, adapt)
    with torch.no_grad():
        for e, t in enumerate(cfg.tasks):
            layers = family.layer_list(getattr(clfs[t], family.backbone))
            for m, l in enumerate(moe.moe_layers):
                src = dict(family.get_mlp(layers[l]).named_parameters())
                for k in moe.keys:
                    moe.experts[k.replace(".", "__")][m, e].copy_(src[k])
    if parts is not None:
        apply_parts(moe, parts, cfg.parts)
    return moe


def train_router(moe: PoolMoE, cfg: PoolConfig, data: dict, progress: bool) -> dict:
    """A token router per MoE layer, trained to send each token to its request's task expert (MLP
    inputs recorded under oracle routing); returns the share of training tokens routed so."""
    g = torch.Generator().manual_seed(cfg.build.seed)
    X: dict[int, list] = {m: [] for m in range(len(moe.moe_layers))}
    Y: dict[int, list] = {m: [] for m in range(len(moe.moe_layers))}
    for t in tqdm(moe.tasks, desc="router: collect tokens", disable=not progress, leave=False):
        for m, h in record_inputs(moe, cfg, data[t].head(cfg.build.router_examples, cfg.build.seed + 1)):
            X[m].append(h.float())
            Y[m].append(torch.full((len(h),), moe.task_index(t), dtype=torch.long))
    share = []
    for m in range(len(moe.moe_layers)):
        x, y = torch.cat(X[m]), torch.cat(Y[m]).to(moe.device)
        w = torch.zeros(moe.num_experts, x.shape[1], device=x.device, requires_grad=True)
        b = torch.zeros(moe.num_experts, device=x.device, requires_grad=True)
        counts = torch.bincount(y, minlength=moe.num_experts).float()
        weight = (counts.sum() / counts.clamp(min=1)) / moe.num_experts
        batches = [torch.randint(0, len(y), (min(len(y), cfg.build.router_batch),), generator=g).to(x.device)
                   for _ in range(cfg.build.router_steps)]
        fit([w, b], batches, lambda idx: F.cross_entropy(F.linear(x[idx], w, b), y[idx], weight=weight),
            cfg.build.router_lr, weight_decay=1e-4, desc=f"router layer {moe.moe_layers[m]}", progress=progress)
        with torch.no_grad():
            moe.router_w[m].copy_(w)
            moe.router_b[m].copy_(b)
            share.append(float((F.linear(x, w, b).argmax(-1) == y).float().mean()))
    return {"routed_to_task_expert": share}


def expert_stats(moe: PoolMoE, cfg: PoolConfig, data: dict, progress: bool) -> ExpertStats:
    """Per expert on its own task: the diagonal (empirical) Fisher of every MLP parameter, and the
    input Gram of every MLP linear (RegMean)."""
    experts = moe.expert_tensors()
    fisher = {k: torch.zeros_like(v) for k, v in experts.items()}
    grams: dict[str, torch.Tensor] = {}
    tokens = torch.zeros(moe.num_experts)
    for t in tqdm(moe.tasks, desc="fisher + regmean statistics", disable=not progress, leave=False):
        e = moe.task_index(t)
        P = {k: v[:, e].detach().clone().requires_grad_(True) for k, v in experts.items()}
        n = 0
        for b in batches(moe, cfg, data[t].head(cfg.build.fisher_examples, cfg.build.seed)):
            b = b.to(moe.device)
            logits = moe(b.input_ids, b.attention_mask, b.token_type_ids, t, mode="merged", state=P, adapted=False)
            for k, gr in zip(P, torch.autograd.grad(_loss(t, logits, b.labels), list(P.values()))):
                fisher[k][:, e] += gr.pow(2) * len(b.index)
            n += len(b.index)
        for k in fisher:
            fisher[k][:, e] /= max(n, 1)
        _expert_grams(moe, cfg, data[t], e, grams, tokens)
    return ExpertStats.from_raw(fisher, grams, tokens)


@torch.no_grad()
def _expert_grams(moe: PoolMoE, cfg: PoolConfig, split: TaskSplit, e: int, grams: dict, tokens: torch.Tensor) -> None:
    """Grams of expert e's MLP linears' inputs on its task's tokens (each layer's template run with its weights)."""
    M, K = len(moe.moe_layers), moe.num_experts
    with fp32(moe.device):
        for m, x in record_inputs(moe, cfg, split.head(cfg.build.regmean_examples, cfg.build.seed)):
            for g, a in moe.gram_inputs(m, {k: v[m, e] for k, v in moe.expert_tensors().items()}, x).items():
                if g not in grams:
                    grams[g] = torch.zeros(M, K, a.shape[-1], a.shape[-1], device=a.device)
                grams[g][m, e] += a.T @ a
            if m == 0:
                tokens[e] += len(x)


def adapt_merged(moe: PoolMoE, cfg: PoolConfig, data: dict, progress: bool) -> float:
    """Merge-aware adaptation, as the built-in build does it: the merged-mode heads (from the
    experts' heads) and the adapted norms trained on the task mixture while the MLPs are merged
    linearly at random feasible x, so any merge the router picks stays usable."""
    with torch.no_grad():
        for t in moe.tasks:
            k = t.replace("-", "_")
            moe.merge_heads[k].load_state_dict(moe.heads[k].state_dict())
    params = list(moe.adapt.values()) + list(moe.merge_heads.parameters())
    for p in params:
        p.requires_grad_(True)
    rng = np.random.default_rng(cfg.build.seed + 17)
    experts = {k: v.detach() for k, v in moe.expert_tensors().items()}
    pools: dict[str, list] = {t: [] for t in moe.tasks}

    def next_batch(step: int):
        t = moe.tasks[step % len(moe.tasks)]
        if not pools[t]:
            pools[t] = bucket_batches(moe.tokenizer, data[t], max_len(cfg, t), cfg.build.batch_size, True,
                                      int(rng.integers(1 << 30)))[:64]
        return pools[t].pop().to(moe.device), sample_x(rng, moe.num_experts, moe.budget)

    def loss_of(item):
        b, x = item
        state = merge_experts(experts, x)
        logits = moe(b.input_ids, b.attention_mask, b.token_type_ids, b.task, mode="merged", state=state, adapted=True)
        return _loss(b.task, logits, b.labels)

    res = fit(params, [next_batch(s) for s in range(cfg.build.adapt_steps)], loss_of, cfg.build.adapt_lr,
              desc="merge-aware adaptation", progress=progress)
    for p in params:
        p.requires_grad_(False)
    moe.adapted.fill_(1)
    return res.loss


def build_pool(cfg: PoolConfig, data_dir=None, progress: bool = True, data: dict | None = None) -> tuple[PoolMoE, dict]:
    """All stages in order; returns the pool MoE and build stats (seconds per stage)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.build.seed)
    family, _, _ = load_configs(cfg)
    data = data if data is not None else load_data(cfg, data_dir)
    tok = load_tokenizer(cfg)
    stats: dict = {"family": family.name, "stages": {}}

    def stage(name, fn):
        s = time.perf_counter()
        with bf16(resolve_device(cfg.device), enabled=cfg.build.bf16, cache=False):  # as the built-in build
            out = fn()
        stats["stages"][name] = round(time.perf_counter() - s, 2)
        return out

    parts = PoolParts.load(cfg.parts) if cfg.parts else None
    base, clfs = stage("load", lambda: load_checkpoints(cfg, family, progress))
    check_moe_layers(cfg, family, base)
    if cfg.moe_layers is not None:
        moe_layers = cfg.moe_layers
    else:
        moe_layers = family.sparse_layers(base) if family.native else list(range(len(family.layer_list(base))))
    stats["shared"] = stage("shared_merge", lambda: merge_shared(cfg, family, base, clfs, data, tok, moe_layers, progress))
    moe = stage("assemble", lambda: assemble(cfg, family, base, clfs, parts))
    del clfs
    moe.tokenizer, moe.max_len_single, moe.max_len_pair = tok, cfg.max_len_single, cfg.max_len_pair
    moe.merge_operator, moe.regmean_alpha = cfg.merge_operator, cfg.regmean_alpha
    moe.to(resolve_device(cfg.device)).eval()
    if moe.stats is not None:  # from the parts file, read on the host
        moe.set_stats(moe.stats.to(moe.device))
    given = parts or PoolParts()
    stats["from_parts"] = sorted(k for k, v in {"router": given.router_w is not None, "statistics": bool(given.stats),
                                                "adaptation": bool(given.adapt or given.merge_heads),
                                                "dense_heads": bool(given.dense_heads)}.items() if v)
    if family.native:
        stats["expert_map"] = stage("expert_map", lambda: measure_expert_map(moe, cfg, data))
    elif given.router_w is None:
        stats["router"] = stage("router", lambda: train_router(moe, cfg, data, progress))
    if not given.stats:
        collect = native_stats if family.native else expert_stats
        moe.set_stats(stage("expert_stats", lambda: collect(moe, cfg, data, progress)))
    if not (given.adapt or given.merge_heads) and len(moe.adapt) and cfg.build.adapt_steps > 0:
        stats["adapt_loss"] = stage("adaptation", lambda: adapt_merged(moe, cfg, data, progress))
    stats["build_seconds"] = round(time.perf_counter() - t0, 2)
    log.info("pool %s built in %.1fs", cfg.name, stats["build_seconds"])
    return moe, stats

