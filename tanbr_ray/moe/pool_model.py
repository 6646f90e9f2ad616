"""A pool of task fine-tunes as one MoE (BTX-style): the fine-tunes' shared parts merged once into one
transformer, the MLP block of every MoE layer holding K experts (fine-tune k's MLP), each task's own
classification head. It serves the same modes as the built-in `TaskMoE` (`MODE_SPECS`): dense (the
base checkpoint's MLPs), oracle (the request's expert), top1/top2 and soft (a token router the pool
build trains), merged (one MLP per layer from x under a merge operator, or a static merge).

Each MoE layer's MLP module is replaced by an `ExpertMLP` that keeps the original module as its
template and runs it functionally (`torch.func.functional_call`) with the parameters the mode picks,
so any MLP layout of a known family (`families.py`) is served by one code path.
"""

from __future__ import annotations

import contextvars
import copy
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from tanbr_ray.moe.data import check_task
from tanbr_ray.moe.families import Family
from tanbr_ray.moe.merge import ExpertMerging, ExpertStats, Merger
from tanbr_ray.moe.model import mean_pool, mode_spec


@dataclass
class MLPPlan:
    """What every ExpertMLP of one forward pass runs."""

    kind: str  # base | state | routed | soft
    state: Mapping[str, torch.Tensor] | None = None  # [M, ...] per MLP parameter (kind state)
    k: int = 0  # routed: experts per token
    mask: torch.Tensor | None = None  # [B, T] (kind soft: each example's tokens)
    record: list | None = None  # collects (moe layer index, MLP input)


_PLAN: contextvars.ContextVar[MLPPlan] = contextvars.ContextVar("tanbr_pool_plan")


def _safe(key: str) -> str:
    return key.replace(".", "__")


class ExpertMLP(nn.Module):
    """Stands in a layer for its MLP block: runs the template with the parameters of the current plan."""

    def __init__(self, template: nn.Module, m: int, owner: "PoolMoE", shared: nn.ModuleDict | None = None):
        super().__init__()
        self.template, self.m, self.shared = template, m, shared
        self.__dict__["_owner"] = owner  # not a submodule (the owner holds this module)

    def forward(self, h: torch.Tensor, *_ignored) -> torch.Tensor:
        out = self._owner.run_mlp(self.m, self.template, h)
        if self.shared is not None:  # an always-on shared expert (Qwen2-MoE), the same in every mode
            out = out + torch.sigmoid(self.shared["gate"](h)) * self.shared["expert"](h)
        return out


def install_expert_mlps(family: Family, backbone: nn.Module, moe_layers: list[int], owner) -> list[ExpertMLP]:
    """Put an ExpertMLP in place of each MoE layer's MLP block (its template: the block as it was)."""
    layers, mlps = family.layer_list(backbone), []
    for m, l in enumerate(moe_layers):
        shared = family.shared_of(layers[l]) if family.shared_of else None
        mlp = ExpertMLP(family.get_mlp(layers[l]), m, owner, shared)
        family.set_mlp(layers[l], mlp)
        mlps.append(mlp)
    return mlps


def trunk(family: Family, backbone: nn.Module, ids, attention_mask, types, params=None) -> torch.Tensor:
    """The backbone's last hidden states; `params` (name -> tensor) stand in for some of its parameters."""
    kwargs = {"input_ids": ids, "attention_mask": attention_mask}
    if family.token_types and getattr(backbone.config, "type_vocab_size", 1) > 1:
        kwargs["token_type_ids"] = types
    if family.decoder:
        kwargs["use_cache"] = False
    if params:
        return functional_call(backbone, params, (), kwargs, strict=False).last_hidden_state
    return backbone(**kwargs).last_hidden_state


def features(family: Family, pooling: str, hidden: torch.Tensor, attention_mask) -> torch.Tensor:
    """What a head reads: the family's token (first, or last real one) or the mean of the real tokens."""
    return mean_pool(hidden, attention_mask) if pooling == "mean" else family.pick(hidden, attention_mask)


def read_head(family: Family, head: nn.ModuleDict, feats: torch.Tensor) -> torch.Tensor:
    return head["mean_mlp"](feats) if "mean_mlp" in head else family.head(head, feats)


class PoolMoE(ExpertMerging, nn.Module):
    """A pool of fine-tunes merged into one MoE; the interface of `tanbr_ray.moe.interface`."""

    def __init__(self, family: Family, backbone: nn.Module, tasks: list[str], heads: Mapping[str, nn.ModuleDict],
                 moe_layers: list[int] | None = None, budget: int | None = None, pooling: str | None = None,
                 adapt_names: list[str] | None = None, num_experts: int | None = None,
                 expert_of: Mapping[str, int] | None = None, expert_map: str = "task"):
        """`heads`: each task's head modules (the family's, or {"mean_mlp": Head} read over mean-pooled
        tokens); `pooling`: first | last | mean (default: the family's token); `adapt_names`: backbone
        parameters with a merged-mode value of their own (merge-aware adaptation). A native MoE has
        `num_experts` of its own, which serve no task: `expert_of` maps each task to the expert its
        tokens use most (`expert_map` says how the map was made)."""
        super().__init__()
        for t in tasks:
            check_task(t)
        self.family, self.backbone = family, backbone
        self.tasks, self.num_experts = list(tasks), int(num_experts or len(tasks))
        self.expert_of = dict(expert_of) if expert_of else {t: i for i, t in enumerate(tasks)}
        self.expert_map = expert_map  # "task": expert k was fine-tuned on task k; else how expert_of was measured
        self.renormalize = True  # token top-k: weights renormalised over the chosen experts
        layers = family.layer_list(backbone)
        self.moe_layers = list(range(len(layers))) if moe_layers is None else list(moe_layers)
        if not self.moe_layers or min(self.moe_layers) < 0 or max(self.moe_layers) >= len(layers):
            raise ValueError(f"moe_layers: {self.moe_layers} outside 0..{len(layers) - 1}")
        self.budget = budget or self.num_experts
        if self.budget > self.num_experts:
            raise ValueError(f"budget: {self.budget} exceeds the number of experts {self.num_experts}")
        self.mlps = install_expert_mlps(family, backbone, self.moe_layers, self)
        template = self.mlps[0].template
        self.keys = [n for n, _ in template.named_parameters()]
        M, K, H = len(self.moe_layers), self.num_experts, backbone.config.hidden_size
        self.experts = nn.ParameterDict({_safe(k): nn.Parameter(torch.zeros(M, K, *p.shape), requires_grad=False)
                                         for k, p in template.named_parameters()})
        self.router_w = nn.Parameter(torch.zeros(M, K, H), requires_grad=False)
        self.router_b = nn.Parameter(torch.zeros(M, K), requires_grad=False)
        self.pooling = pooling or family.token
        self.heads = nn.ModuleDict({t.replace("-", "_"): heads[t] for t in tasks})  # with the experts
        self.dense_heads = copy.deepcopy(self.heads)  # dense mode (default: the experts' heads)
        self.merge_heads = copy.deepcopy(self.heads)  # merged mode once adapted
        named = dict(backbone.named_parameters())
        unknown = sorted(set(adapt_names or []) - set(named))
        if unknown:
            raise ValueError(f"adapted parameters {unknown[:3]} are not parameters of this {family.name} model")
        self.adapt = nn.ParameterDict({_safe(n): nn.Parameter(named[n].detach().clone()) for n in adapt_names or []})
        self.register_buffer("adapted", torch.zeros((), dtype=torch.uint8))
        self.stats: ExpertStats | None = None
        self.static_merges: dict[str, dict[str, torch.Tensor]] = {}
        self.merge_operator, self.regmean_alpha = "linear", 0.9
        self._merger: Merger | None = None
        self.tokenizer = None
        self.max_len_single, self.max_len_pair = 64, 128
        for p in self.parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------------------- experts, merging
    @property
    def device(self) -> torch.device:
        return self.router_w.device

    @property
    def expert_labels(self) -> list[str]:
        if self.expert_map == "task":
            return [f"expert:{t}" for t in self.tasks]
        return [f"expert {e}" for e in range(self.num_experts)]

    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """The stacked experts [M, K, ...] by the MLP's own parameter names."""
        return {k: self.experts[_safe(k)] for k in self.keys}

    def expert_state(self, e: int) -> dict[str, torch.Tensor]:
        return {k: v[:, e] for k, v in self.expert_tensors().items()}

    def merge_layout(self) -> tuple[Mapping[str, str], frozenset]:
        return self.family.grams, self.family.transposed

    def base_state(self) -> dict[str, torch.Tensor]:
        return {k: torch.stack([dict(mlp.template.named_parameters())[k] for mlp in self.mlps]) for k in self.keys}

    # ----------------------------------------------------------------------------- the MLPs per mode
    def adapt_names(self) -> list[str]:
        return [k.replace("__", ".") for k in self.adapt]

    def _plan(self, mode: str, task: str, x=None, state=None, mask=None, record=None) -> MLPPlan:
        spec = mode_spec(mode)
        if spec.ffn == "merged":
            if (x is None) == (state is None):
                raise ValueError("merged mode needs exactly one of x (weight vector) or state (merged weights)")
            return MLPPlan("state", self.merged_state(x) if state is None else state, record=record)
        if spec.ffn == "task":
            return MLPPlan("state", self.expert_state(self.task_index(task)), record=record)
        if spec.ffn == "routed":
            return MLPPlan("routed", k=spec.k, record=record)
        if spec.ffn == "soft":
            return MLPPlan("soft", mask=mask, record=record)
        return MLPPlan("base", record=record)

    def run_mlp(self, m: int, template: nn.Module, h: torch.Tensor) -> torch.Tensor:
        plan = _PLAN.get()
        if plan.record is not None:
            plan.record.append((self.moe_layers[m], h))
        if plan.kind == "base":
            return template(h)
        if plan.kind == "state":
            return functional_call(template, {k: plan.state[k][m] for k in self.keys}, (h,))
        if plan.kind == "routed":
            return self._routed(m, template, h, plan.k)
        return self._soft(m, template, h, plan.mask)

    def gram_inputs(self, m: int, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The input of each linear RegMean solves (by Gram name) when layer m's MLP runs with `params` on
        tokens x: hooks on that layer's own template, removed before returning."""
        tmpl, seen, handles = self.mlps[m].template, {}, []
        for wk, g in self.family.grams.items():
            if g not in {h[0] for h in handles}:
                mod = tmpl.get_submodule(wk.rsplit(".", 1)[0])
                handles.append((g, mod.register_forward_hook(
                    lambda _m, inp, _o, g=g: seen.__setitem__(g, inp[0].float()))))
        try:
            functional_call(tmpl, dict(params), (x,))
        finally:
            for _, h in handles:
                h.remove()
        return seen

    def router_logits(self, m: int, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.router_w[m], self.router_b[m])

    def _routed(self, m: int, template: nn.Module, h: torch.Tensor, k: int) -> torch.Tensor:
        """Token-level top-k over the experts, gate weights renormalised (Switch / Mixtral style)."""
        shape = h.shape
        hf = h.reshape(-1, shape[-1])
        p = torch.softmax(self.router_logits(m, hf).float(), dim=-1)
        topv, topi = p.topk(k, dim=-1)
        if self.renormalize:  # Mixtral renormalises the chosen experts' weights; Qwen2-MoE by config
            topv = topv / topv.sum(-1, keepdim=True)
        topv = topv.to(h.dtype)
        out = torch.zeros_like(hf)
        experts = self.expert_tensors()
        for e in range(self.num_experts):
            sel = topi == e
            rows = sel.any(-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            w = (topv * sel).sum(-1)[rows]
            y = functional_call(template, {kk: experts[kk][m, e] for kk in self.keys}, (hf[rows],))
            out.index_add_(0, rows, (w[:, None] * y).to(out.dtype))
        return out.reshape(shape)

    def _soft(self, m: int, template: nn.Module, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """SMEAR-style: each example's MLP is Σ_k p_k W_k, p the router's probabilities averaged over
        its real tokens."""
        p = torch.softmax(self.router_logits(m, h).float(), dim=-1)
        w = mask.to(p.dtype).unsqueeze(-1)
        p = (p * w).sum(1) / w.sum(1).clamp(min=1.0)
        params = {k: torch.einsum("bk,k...->b...", p.to(v.dtype), v[m]) for k, v in self.expert_tensors().items()}
        return vmap(lambda ps, x: functional_call(template, ps, (x,)))(params, h)

    # ----------------------------------------------------------------------------- forward
    def embed_to_first_moe(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        """What the eval cache keeps per example: its tokens (ids and type ids). A pool's layers are
        the checkpoint's own modules, so its forward starts from the tokens."""
        return torch.stack([input_ids, token_type_ids], -1)


    def pooled_from_first_moe(self, h, attention_mask, task, mode="oracle", x=None, state=None, adapted=None,
                              record=None):
        """The features each task head reads (the first or last real token's hidden state, or the mean
        of the real tokens') for cached tokens; returns (features, whether merge-aware adaptation ran)."""
        self.task_index(task)
        use = mode_spec(mode).ffn == "merged" and (bool(self.adapted.item()) if adapted is None else bool(adapted))
        own = {k.replace("__", "."): v for k, v in self.adapt.items()} if use and len(self.adapt) else None
        token = _PLAN.set(self._plan(mode, task, x, state, attention_mask, record))
        try:
            hidden = trunk(self.family, self.backbone, h[..., 0], attention_mask, h[..., 1], own)
        finally:
            _PLAN.reset(token)
        return features(self.family, self.pooling, hidden, attention_mask), use

    def head_for(self, mode: str, task: str, use_adapt: bool):
        heads = self.merge_heads if use_adapt else self.dense_heads if mode_spec(mode).heads == "dense" else self.heads
        return lambda feats: read_head(self.family, heads[task.replace("-", "_")], feats)

    def forward_from_first_moe(self, h, attention_mask, task, mode="oracle", x=None, state=None, adapted=None):
        pooled, use = self.pooled_from_first_moe(h, attention_mask, task, mode, x, state, adapted)
        return self.head_for(mode, task, use)(pooled)

    def forward(self, input_ids, attention_mask, token_type_ids, task, mode="oracle", x=None, state=None, adapted=None):
        h = self.embed_to_first_moe(input_ids, attention_mask, token_type_ids)
        return self.forward_from_first_moe(h, attention_mask, task, mode, x, state, adapted)

    def prepare(self, splits, batch_size: int = 32, progress: bool = False):
        from tanbr_ray.moe.infer import prepare

        return prepare(self, splits, batch_size, progress)

    # ----------------------------------------------------------------------------- dense models, bytes
    def dense_model(self, x=None, state=None, adapted=None) -> "PoolDense":
        """The dense model a node would serve: merged MLPs (x or state), or the base MLPs."""
        if x is None and state is None:
            return PoolDense(self, "dense", None)
        return PoolDense(self, "merged", self.merged_state(x) if state is None else state)

    def edge_parts(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """(the shell class, its config, its tensors): backbone and heads of merged serving, no experts."""
        from tanbr_ray.moe.pool_edge import PoolShell, pool_shell_parts

        return (f"{PoolShell.__module__}:{PoolShell.__qualname__}", *pool_shell_parts(self))

    def _bytes(self, tensors) -> int:
        return int(sum(t.numel() * t.element_size() for t in tensors))

    def resident_bytes(self, mode: str) -> int:
        """Parameter bytes a node must hold to serve the mode (the heads of every task included)."""
        mlp_ids = {id(p) for mlp in self.mlps for p in mlp.template.parameters()}
        shared = [p for p in self.backbone.parameters() if id(p) not in mlp_ids] + list(self.heads.parameters())
        spec = mode_spec(mode)
        if spec.ffn in ("base", "merged"):
            return self._bytes(shared) + self._bytes(p for mlp in self.mlps for p in mlp.template.parameters())
        held = self._bytes(shared) + self._bytes(self.experts.values())
        return held + (self._bytes([self.router_w, self.router_b]) if spec.ffn in ("routed", "soft") else 0)


class PoolDense:
    """A pool served with one MLP per layer (merged weights, or the base's): a forward (ids, mask,
    types, task) -> logits, as a node holding only that model runs it."""

    def __init__(self, moe: PoolMoE, mode: str, state):
        self.moe, self.mode, self.state = moe, mode, state

    def __call__(self, input_ids, attention_mask, token_type_ids, task: str) -> torch.Tensor:
        return self.moe(input_ids, attention_mask, token_type_ids, task, mode=self.mode, state=self.state)

    def resident_bytes(self) -> int:
        return self.moe.resident_bytes(self.mode)
