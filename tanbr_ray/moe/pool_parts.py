"""The parts of a pool that belong to no single fine-tune — the token router, the dense-mode and
merged-mode heads, the adapted norms, the experts' merge statistics — in one safetensors file a pool
YAML may name (`parts:`). `tanbr export-pool` writes it; a pool built with it computes none of them.
Also the mean-pooled MLP head a checkpoint may carry beside its standard classifier (`tanbr_head`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from tanbr_ray.fileio import atomic_write
from tanbr_ray.moe.data import NUM_LABELS
from tanbr_ray.moe.merge import ExpertStats
from tanbr_ray.moe.model import Head
from tanbr_ray.moe.pool_model import _safe

FORMAT = "tanbr-pool-parts/1"
HEAD_PREFIX = "tanbr_head."  # a checkpoint's mean-pooled MLP head, beside its standard classifier


@dataclass
class PoolParts:
    """Everything optional: a part that is absent is computed by the pool build."""

    router_w: torch.Tensor | None = None  # [M, K, H]
    router_b: torch.Tensor | None = None
    dense_heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # task -> head state
    merge_heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    adapt: dict[str, torch.Tensor] = field(default_factory=dict)  # backbone parameter -> merged-mode value
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # ExpertStats.tensors() in the pool's names

    def save(self, path: Path) -> None:
        t: dict[str, torch.Tensor] = {}
        if self.router_w is not None:
            t["router_w"], t["router_b"] = self.router_w, self.router_b
        for prefix, heads in (("dense_head", self.dense_heads), ("merge_head", self.merge_heads)):
            for task, state in heads.items():
                t.update({f"{prefix}/{task}/{k}": v for k, v in state.items()})
        t.update({f"adapt/{k}": v for k, v in self.adapt.items()})
        t.update({f"stats/{k}": v for k, v in self.stats.items()})
        t = {k: v.detach().cpu().contiguous().clone() for k, v in t.items()}
        meta = {"format": FORMAT, "adapt_names": json.dumps(sorted(self.adapt))}
        atomic_write(path, lambda p: save_file(t, p, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "PoolParts":
        p = Path(path)
        try:
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
            t = load_file(str(p))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"parts {p}: unreadable safetensors ({e})") from e
        if meta.get("format") != FORMAT:
            raise ValueError(f"parts {p}: not a {FORMAT} file")
        parts = cls(t.get("router_w"), t.get("router_b"))
        for k, v in t.items():
            kind, _, rest = k.partition("/")
            if kind in ("dense_head", "merge_head"):
                task, _, name = rest.partition("/")
                (parts.dense_heads if kind == "dense_head" else parts.merge_heads).setdefault(task, {})[name] = v
            elif kind == "adapt":
                parts.adapt[rest] = v
            elif kind == "stats":
                parts.stats[rest] = v
        return parts

    def expert_stats(self, keys, grams, where: str) -> ExpertStats | None:
        return ExpertStats.from_tensors(self.stats, where, keys, grams) if self.stats else None


def mean_mlp_head(checkpoint: str, config, hidden: int) -> nn.ModuleDict | None:
    """The checkpoint's mean-pooled MLP head when its config declares one (`tanbr_head`), else None."""
    spec = getattr(config, "tanbr_head", None)
    if spec is None:
        return None
    files = sorted(Path(checkpoint).glob("*.safetensors"))
    state = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            state.update({k[len(HEAD_PREFIX):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(HEAD_PREFIX)})
    head = Head(hidden, int(spec["inner"]), int(config.num_labels), 0.0)
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {checkpoint}: its config declares tanbr_head, but the tensors do not fit ({e})") from e
    return nn.ModuleDict({"mean_mlp": head.eval()})


def empty_mean_mlp_head(hidden: int, inner: int, task: str) -> nn.ModuleDict:
    return nn.ModuleDict({"mean_mlp": Head(hidden, inner, NUM_LABELS[task], 0.0).eval()})


@torch.no_grad()
def apply_parts(moe, parts: PoolParts, where: str) -> None:
    """Load the given parts into the pool, each checked against the shape it replaces."""
    def put(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"parts {where}: {name} shaped {tuple(src.shape)}, the pool's {tuple(dst.shape)}")
        dst.copy_(src)

    if (parts.router_w is None) != (parts.router_b is None):
        raise ValueError(f"parts {where}: router_w and router_b come together")
    unknown = sorted(set(parts.adapt) - set(moe.adapt_names()))
    if unknown:
        raise ValueError(f"parts {where}: adapted parameters {unknown[:3]} are not the pool's ({moe.adapt_names()[:3]}…)")
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
