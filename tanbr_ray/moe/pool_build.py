"""Build a pool of fine-tunes into a `PoolMoE`, in order: check every checkpoint (before any
computation), merge the shared parts once, stack the MLPs as experts, keep each task's head, train
the token router, compute the experts' merge statistics; then cache it like the built-in model."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from tanbr_ray.moe.build import _loss, fit, sample_x
from tanbr_ray.moe.config import resolve_device
from tanbr_ray.moe.data import NUM_LABELS, PAIR, TaskSplit, bucket_batches, load_task
from tanbr_ray.moe.families import Family, family_of
from tanbr_ray.moe.merge import ExpertStats, merge_experts
from tanbr_ray.moe.pool_config import PoolConfig
from tanbr_ray.moe.pool_model import PoolMoE, _safe
from tanbr_ray.moe.pool_parts import PoolParts, mean_mlp_head
from tanbr_ray.moe.precision import bf16, fp32

log = logging.getLogger(__name__)


def _hub_error(ref: str, what: str, exc: Exception) -> ValueError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = "the hub is switched off here (HF_HUB_OFFLINE=1)" if offline else f"it could not be fetched ({exc})"
    return ValueError(f"{what} {ref!r}: not a local checkpoint folder, and {why}")


def load_configs(cfg: PoolConfig) -> tuple[Family, object, dict[str, object]]:
    """Every checkpoint's config, checked against the base: one family, the same shapes, a head with
    the task's label count. Reads no weights, so a bad pool is refused before anything runs."""
    from transformers import AutoConfig

    def config_of(ref: str, what: str):
        try:
            return AutoConfig.from_pretrained(ref)
        except (OSError, ValueError) as e:
            if Path(ref).is_dir():
                raise ValueError(f"{what} {ref}: unreadable checkpoint config ({e})") from e
            raise _hub_error(ref, what, e) from e

    base = config_of(cfg.base, "base")
    family = family_of(base.model_type, f"base {cfg.base}")
    shape_keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size",
                  "num_local_experts", "num_experts", "moe_intermediate_size")
    if (cfg.kind == "native") != family.native:
        raise ValueError(f"base {cfg.base}: model_type {base.model_type!r} is {'a' if family.native else 'not a'} "
                         f"native MoE; use kind: {'native' if family.native else 'pool'}")
    experts = getattr(base, "num_local_experts", None) or getattr(base, "num_experts", None)
    if family.native and cfg.budget is not None and cfg.budget > experts:
        raise ValueError(f"budget: {cfg.budget} exceeds the MoE's {experts} experts")
    configs = {}
    for e in cfg.experts:
        c = config_of(e.checkpoint, f"checkpoint of {e.task}")
        where = f"checkpoint {e.checkpoint} (task {e.task})"
        family_of(c.model_type, where)
        if c.model_type != base.model_type:
            raise ValueError(f"{where}: model_type {c.model_type!r} differs from the base's {base.model_type!r}")
        for k in shape_keys:
            if getattr(c, k, None) != getattr(base, k, None):
                raise ValueError(f"{where}: {k} = {getattr(c, k, None)} differs from the base's {getattr(base, k, None)}")
        if c.num_labels != NUM_LABELS[e.task]:
            raise ValueError(f"{where}: num_labels = {c.num_labels}, but {e.task} has {NUM_LABELS[e.task]} labels")
        configs[e.task] = c
    return family, base, configs


def load_data(cfg: PoolConfig, data_dir=None) -> dict[str, TaskSplit]:
    """Each task's train split (the statistics and the router read it), refused by task name if absent."""
    out = {}
    for t in cfg.tasks:
        try:
            out[t] = load_task(t, "train", data_dir)
        except (OSError, ValueError) as e:
            raise ValueError(f"task {t}: no training data ({e})") from e
        if len(out[t]) == 0:
            raise ValueError(f"task {t}: its training split is empty")
    return out


def _tokenizer(cfg: PoolConfig):
    from transformers import AutoTokenizer

    ref = cfg.tokenizer or cfg.base
    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise _hub_error(ref, "tokenizer", e) from e
    if tok.pad_token is None:  # GPT-2 / Llama tokenizers: pad with EOS (masked out anyway)
        tok.pad_token = tok.eos_token
    return tok


def load_checkpoints(cfg: PoolConfig, family: Family, progress: bool):
    """(base backbone, {task: classifier model}); shapes of every backbone tensor checked against the base."""
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar over the checkpoints instead of one per file
    hf_logging.set_verbosity_error()  # a pooler the base lacks, a tanbr_head beside the classifier: expected
    base = AutoModel.from_pretrained(cfg.base)
    want = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    clfs = {}
    for e in tqdm(cfg.experts, desc="load fine-tunes", disable=not progress, leave=False):
        clf = AutoModelForSequenceClassification.from_pretrained(e.checkpoint).eval()
        got = {k: tuple(v.shape) for k, v in getattr(clf, family.backbone).state_dict().items()}
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k) and "pooler" not in k)
        if diff:
            raise ValueError(f"checkpoint {e.checkpoint} (task {e.task}): tensor {diff[0]} is "
                             f"{got.get(diff[0])} against the base's {want.get(diff[0])}")
        clfs[e.task] = clf
    return base, clfs


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
        for b in bucket_batches(tok, sp, _max_len(cfg, sp.task), cfg.build.batch_size):
            keep["mask"] = b.attention_mask.bool()
            clf(input_ids=b.input_ids, attention_mask=b.attention_mask)
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


def _max_len(cfg: PoolConfig, task: str) -> int:
    return cfg.max_len_pair if PAIR[task] else cfg.max_len_single


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
        return _assemble_native(cfg, family, base, heads, moe_layers, adapt, parts)
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


@torch.no_grad()
def _assemble_native(cfg: PoolConfig, family: Family, base: nn.Module, heads: dict, moe_layers: list[int],
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
        for m, h in _record(moe, cfg, data[t].head(cfg.build.router_examples, cfg.build.seed + 1), "top1"):
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
    gram_mods = {}
    for wk, g in moe.family.grams.items():
        gram_mods.setdefault(g, moe.mlps[0].template.get_submodule(wk.rsplit(".", 1)[0]))
    n = 0
    for t in tqdm(moe.tasks, desc="fisher + regmean statistics", disable=not progress, leave=False):
        for p in experts.values():
            p.requires_grad_(True)
        try:
            for b in _batches(moe, cfg, data[t].head(cfg.build.fisher_examples, cfg.build.seed)):
                b = b.to(moe.device)
                logits = moe(b.input_ids, b.attention_mask, b.token_type_ids, t, mode=k_mode, adapted=False)
                for k, gr in zip(experts, torch.autograd.grad(_loss(t, logits, b.labels), list(experts.values()))):
                    fisher[k] += gr.pow(2) * len(b.index)
                n += len(b.index)
        finally:
            for p in experts.values():
                p.requires_grad_(False)
        _routed_grams(moe, cfg, data[t], int(k_mode[-1]), gram_mods, grams, tokens)
    for k in fisher:
        fisher[k] /= max(n, 1)
    return ExpertStats.from_raw(fisher, grams, (tokens / len(moe.moe_layers)).clamp(min=1.0))


@torch.no_grad()
def _routed_grams(moe: PoolMoE, cfg: PoolConfig, split: TaskSplit, k: int, gram_mods: dict, grams: dict,
                  tokens: torch.Tensor) -> None:
    """Grams of each expert's MLP linears' inputs on the tokens the router sends it (top-k)."""
    M, K = len(moe.moe_layers), moe.num_experts
    seen: dict[str, torch.Tensor] = {}
    handles = [mod.register_forward_hook(lambda _m, inp, _o, g=g: seen.__setitem__(g, inp[0].float()))
               for g, mod in gram_mods.items()]
    try:
        with fp32(moe.device):
            for m, x in _record(moe, cfg, split.head(cfg.build.regmean_examples, cfg.build.seed), f"top{k}"):
                top = moe.router_logits(m, x).topk(k, dim=-1).indices
                for e in range(K):
                    rows = (top == e).any(-1)
                    if not rows.any():
                        continue
                    torch.func.functional_call(moe.mlps[m].template,
                                               {kk: v[m, e] for kk, v in moe.expert_tensors().items()}, (x[rows],))
                    for g, a in seen.items():
                        if g not in grams:
                            grams[g] = torch.zeros(M, K, a.shape[-1], a.shape[-1], device=a.device)
                        grams[g][m, e] += a.T @ a
                    tokens[e] += int(rows.sum())
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def apply_parts(moe: PoolMoE, parts: PoolParts, where: str) -> None:
    """Load the given parts into the pool, each checked against the shape it replaces."""
    def put(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"parts {where}: {name} shaped {tuple(src.shape)}, the pool's {tuple(dst.shape)}")
        dst.copy_(src)

    if parts.router_w is not None:
        put(moe.router_w, parts.router_w, "router_w")
        put(moe.router_b, parts.router_b, "router_b")
    for heads, given, what in ((moe.dense_heads, parts.dense_heads, "dense_head"),
                               (moe.merge_heads, parts.merge_heads, "merge_head")):
        for t, state in given.items():
            if t not in moe.tasks:
                raise ValueError(f"parts {where}: {what} for task {t!r}, which the pool does not have ({moe.tasks})")
            try:
                heads[t.replace("-", "_")].load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"parts {where}: {what} of {t} does not fit the pool's head ({e})") from e
    for n, v in parts.adapt.items():
        put(moe.adapt[_safe(n)], v, f"adapt/{n}")
    if parts.adapt or parts.merge_heads:
        moe.adapted.fill_(1)
    stats = parts.expert_stats(moe.keys, moe.family.grams, f"parts {where}")
    if stats is not None:
        try:
            moe.set_stats(stats.to(moe.device))
        except ValueError as e:
            raise ValueError(f"parts {where}: {e}") from e


def _batches(moe: PoolMoE, cfg: PoolConfig, split: TaskSplit):
    return bucket_batches(moe.tokenizer, split, _max_len(cfg, split.task), cfg.build.batch_size)


@torch.no_grad()
def _record(moe: PoolMoE, cfg: PoolConfig, split: TaskSplit, mode: str = "oracle") -> list:
    """(moe layer, MLP input of the real tokens) of a split's forward in `mode`."""
    out = []
    for b in _batches(moe, cfg, split):
        b = b.to(moe.device)
        rec: list = []
        moe.pooled_from_first_moe(moe.embed_to_first_moe(b.input_ids, b.attention_mask, b.token_type_ids),
                                  b.attention_mask, split.task, mode, record=rec)
        keep = b.attention_mask.bool()
        out.extend((moe.moe_layers.index(l), h[keep]) for l, h in rec)
    return out


def train_router(moe: PoolMoE, cfg: PoolConfig, data: dict, progress: bool) -> dict:
    """A token router per MoE layer, trained to send each token to its request's task expert (MLP
    inputs recorded under oracle routing); returns the share of training tokens routed so."""
    g = torch.Generator().manual_seed(cfg.build.seed)
    X: dict[int, list] = {m: [] for m in range(len(moe.moe_layers))}
    Y: dict[int, list] = {m: [] for m in range(len(moe.moe_layers))}
    for t in tqdm(moe.tasks, desc="router: collect tokens", disable=not progress, leave=False):
        for m, h in _record(moe, cfg, data[t].head(cfg.build.router_examples, cfg.build.seed + 1)):
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
    tmpl = moe.mlps[0].template
    gram_mods = {}
    for wk, g in moe.family.grams.items():
        gram_mods.setdefault(g, tmpl.get_submodule(wk.rsplit(".", 1)[0]))
    for t in tqdm(moe.tasks, desc="fisher + regmean statistics", disable=not progress, leave=False):
        e = moe.task_index(t)
        P = {k: v[:, e].detach().clone().requires_grad_(True) for k, v in experts.items()}
        n = 0
        for b in _batches(moe, cfg, data[t].head(cfg.build.fisher_examples, cfg.build.seed)):
            b = b.to(moe.device)
            logits = moe(b.input_ids, b.attention_mask, b.token_type_ids, t, mode="merged", state=P, adapted=False)
            for k, gr in zip(P, torch.autograd.grad(_loss(t, logits, b.labels), list(P.values()))):
                fisher[k][:, e] += gr.pow(2) * len(b.index)
            n += len(b.index)
        for k in fisher:
            fisher[k][:, e] /= max(n, 1)
        _expert_grams(moe, cfg, data[t], e, gram_mods, grams, tokens)
    return ExpertStats.from_raw(fisher, grams, tokens)


@torch.no_grad()
def _expert_grams(moe: PoolMoE, cfg: PoolConfig, split: TaskSplit, e: int, gram_mods: dict, grams: dict,
                  tokens: torch.Tensor) -> None:
    """Grams of expert e's MLP linears' inputs on its task's tokens (the template run with its weights)."""
    M, K = len(moe.moe_layers), moe.num_experts
    seen: dict[str, torch.Tensor] = {}
    handles = [mod.register_forward_hook(lambda _m, inp, _o, g=g: seen.__setitem__(g, inp[0].float()))
               for g, mod in gram_mods.items()]
    try:
        with fp32(moe.device):
            for m, x in _record(moe, cfg, split.head(cfg.build.regmean_examples, cfg.build.seed)):
                tmpl = moe.mlps[m].template
                torch.func.functional_call(tmpl, {k: v[m, e] for k, v in moe.expert_tensors().items()}, (x,))
                for g, a in seen.items():
                    if g not in grams:
                        grams[g] = torch.zeros(M, K, a.shape[-1], a.shape[-1], device=a.device)
                    grams[g][m, e] += a.T @ a
                if m == 0:
                    tokens[e] += len(x)
    finally:
        for h in handles:
            h.remove()


def build_pool(cfg: PoolConfig, data_dir=None, progress: bool = True, data: dict | None = None) -> tuple[PoolMoE, dict]:
    """All stages in order; returns the pool MoE and build stats (seconds per stage)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.build.seed)
    family, _, _ = load_configs(cfg)
    data = data if data is not None else load_data(cfg, data_dir)
    tok = _tokenizer(cfg)
    stats: dict = {"family": family.name, "stages": {}}

    def stage(name, fn):
        s = time.perf_counter()
        with bf16(resolve_device(cfg.device), enabled=cfg.build.bf16, cache=False):  # as the built-in build
            out = fn()
        stats["stages"][name] = round(time.perf_counter() - s, 2)
        return out

    parts = PoolParts.load(cfg.parts) if cfg.parts else None
    base, clfs = stage("load", lambda: load_checkpoints(cfg, family, progress))
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
            pools[t] = bucket_batches(moe.tokenizer, data[t], _max_len(cfg, t), cfg.build.batch_size, True,
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
