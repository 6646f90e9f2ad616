"""Merge operators: K experts' FFN blocks + a weight vector x → one FFN per MoE layer.

One interface, `Merger(experts, stats)(x, op)`, behind a registry of operators (`OPERATORS`):

- ``linear``  — Σ_k x_k W_k (the paper's merge; needs no statistics);
- ``fisher``  — per parameter Σ_k x_k F_k W_k / Σ_k x_k F_k, F_k expert k's diagonal Fisher on its task
  (Matena & Raffel, with x as the per-model coefficients);
- ``regmean`` — per FFN linear (Σ_k x_k G_k)⁻¹ Σ_k x_k G_k W_kᵀ, G_k the input Gram matrix of expert k
  on its task (raw token sums, off-diagonals shrunk by α); biases and LayerNorms are x-averaged
  (Jin et al., the per-model-coefficient form of their code).

At x uniform, fisher and regmean are the static merges of the literature; at x = e_k every operator
returns expert k exactly. A regmean merge precomputes G_k W_kᵀ and fp32 Grams once per Merger
(5.2 s, ~0.5 GB for the default MoE), then costs one matrix-vector product and one Cholesky solve per
layer and linear (`tanbr bench merge`, 8 experts: 408 ms p50; the naive einsum was 11 s, converting
the fp16 Grams at every merge 0.83 s).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tanbr_ray.moe.data import check_task
from tanbr_ray.moe.precision import fp32
from tanbr_ray.simplex import check_x

FFN_KEYS = ("w1", "b1", "w2", "b2", "ln_w", "ln_b")
OPERATORS = ("linear", "fisher", "regmean")
# each FFN linear and the Gram of its input: w1 reads the layer input, w2 the GELU activations
GRAM_OF = {"w1": "g1", "w2": "g2"}
FISHER_EPS = 1e-12


def validate_x(x, num_experts: int, budget: int | None = None, tol: float = 1e-6) -> np.ndarray:
    """Check a merging weight vector (the shared feasibility check of `tanbr_ray.simplex`)."""
    return check_x(x, num_experts, budget, tol)


def check_operator(op: str) -> str:
    if op not in OPERATORS:
        raise ValueError(f"merge operator: unknown {op!r}; known: {list(OPERATORS)}")
    return op


@dataclass
class ExpertStats:
    """Per-expert statistics for the x-weighted operators, in their storage precision.

    fisher[k]: diagonal Fisher of every FFN parameter, [layers, K, ...] (bf16: Fisher values are tiny,
    so fp16 would underflow). grams[g]: token-averaged input Gram matrices [layers, K, n, n] (fp16) and
    tokens [K]: the tokens each expert's Grams summed, so raw Gram = tokens_k · grams_k (raw sums weight
    experts by their data, as RegMean does; trace-normalised Grams measured a point worse)."""

    fisher: dict[str, torch.Tensor]
    grams: dict[str, torch.Tensor]
    tokens: torch.Tensor

    FISHER_DTYPE = torch.bfloat16
    GRAM_DTYPE = torch.float16

    @classmethod
    def from_raw(cls, fisher: Mapping[str, torch.Tensor], raw_grams: Mapping[str, torch.Tensor], tokens) -> "ExpertStats":
        """Round float32 statistics to the storage precision now, so a merge before saving equals one
        after loading."""
        tok = torch.as_tensor(tokens, dtype=torch.float32).cpu()
        if (tok <= 0).any():
            raise ValueError(f"expert stats: every expert needs tokens > 0, got {tok.tolist()}")
        scale = tok.view(1, -1, 1, 1).to(next(iter(raw_grams.values())).device)
        return cls(
            {k: v.detach().to(cls.FISHER_DTYPE) for k, v in fisher.items()},
            {g: (v.detach() / scale).to(cls.GRAM_DTYPE) for g, v in raw_grams.items()},
            tok,
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"fisher.{k}": v for k, v in self.fisher.items()}
        out.update({f"gram.{g}": v for g, v in self.grams.items()})
        out["tokens"] = self.tokens
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, t: Mapping[str, torch.Tensor], where: str = "stats", keys: Sequence[str] = FFN_KEYS,
                     grams: Mapping[str, str] = GRAM_OF) -> "ExpertStats":
        need = [f"fisher.{k}" for k in keys] + [f"gram.{g}" for g in grams.values()] + ["tokens"]
        missing = [k for k in need if k not in t]
        if missing:
            raise ValueError(f"{where}: missing tensors {missing}")
        return cls({k: t[f"fisher.{k}"] for k in keys}, {g: t[f"gram.{g}"] for g in grams.values()}, t["tokens"].float())

    def check(self, experts: Mapping[str, torch.Tensor], where: str = "stats", grams: Mapping[str, str] = GRAM_OF,
              transposed: frozenset = frozenset()) -> None:
        """Shapes must match the experts they describe (`grams`: each linear's Gram; `transposed`: the
        linears stored [in, out], as GPT-2's Conv1D)."""
        M, K = next(iter(experts.values())).shape[:2]
        for k in experts:
            if tuple(self.fisher[k].shape) != tuple(experts[k].shape):
                raise ValueError(f"{where}: fisher.{k} shaped {tuple(self.fisher[k].shape)}, experts {tuple(experts[k].shape)}")
        for wk, g in grams.items():
            n = experts[wk].shape[-2 if wk in transposed else -1]
            if tuple(self.grams[g].shape) != (M, K, n, n):
                raise ValueError(f"{where}: gram.{g} shaped {tuple(self.grams[g].shape)}, want {(M, K, n, n)}")
        if tuple(self.tokens.shape) != (K,):
            raise ValueError(f"{where}: tokens shaped {tuple(self.tokens.shape)}, want ({K},)")

    def to(self, device) -> "ExpertStats":
        return ExpertStats({k: v.to(device) for k, v in self.fisher.items()},
                           {g: v.to(device) for g, v in self.grams.items()}, self.tokens)


def _linear(experts: Mapping[str, torch.Tensor], x: np.ndarray, nz: np.ndarray, keys) -> dict[str, torch.Tensor]:
    """Σ_k x_k · expert_k, reading only the experts with non-zero weight (a merge is memory-bound)."""
    out = {}
    for k in keys:
        t = experts[k]
        acc = t[:, nz[0]] * float(x[nz[0]])
        for e in nz[1:]:
            acc.add_(t[:, e], alpha=float(x[e]))
        out[k] = acc
    return out


class Merger:
    """The experts of every MoE layer and their statistics; `merger(x, op)` → merged FFN state
    ({key: [layers, ...]}). x must already be feasible (the model's `merged_state` validates it).
    `grams` names each linear weight's input Gram (RegMean solves those; every other key is
    x-averaged); `transposed`: weights stored [in, out] (GPT-2's Conv1D) rather than [out, in]."""

    def __init__(self, experts: Mapping[str, torch.Tensor], stats: ExpertStats | None = None, alpha: float = 0.9,
                 grams: Mapping[str, str] = GRAM_OF, transposed: frozenset = frozenset()):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"regmean_alpha: {alpha} outside [0, 1]")
        self.experts = {k: v.detach() for k, v in experts.items()}
        self.keys = tuple(self.experts)
        self.grams = dict(grams)
        self.transposed = frozenset(transposed)
        self.dev = next(iter(self.experts.values())).device
        self.stats = stats
        self.alpha = float(alpha)
        self._rhs: dict[str, torch.Tensor] | None = None  # G̃_k W_kᵀ per linear, built on first regmean merge
        self._grams: dict[str, torch.Tensor] | None = None  # raw fp32 Grams [M, K, n·n], with _rhs

    @property
    def num_experts(self) -> int:
        return int(next(iter(self.experts.values())).shape[1])

    def __call__(self, x: Sequence[float], op: str = "linear") -> dict[str, torch.Tensor]:
        check_operator(op)
        with fp32(self.dev):
            return self._merge(x, op)

    def _merge(self, x: Sequence[float], op: str) -> dict[str, torch.Tensor]:
        x = np.asarray(x, dtype=np.float64)
        nz = np.flatnonzero(x)
        if len(nz) == 0:
            raise ValueError("merge: x has no non-zero weight")
        if len(nz) == 1:  # every operator returns the expert itself at a vertex
            return {k: v[:, nz[0]].clone() for k, v in self.experts.items()}
        if op == "linear":
            return _linear(self.experts, x, nz, self.keys)
        if self.stats is None:
            raise ValueError(f"merge operator {op!r} needs the experts' statistics (this model has none)")
        return self._fisher(x, nz) if op == "fisher" else self._regmean(x, nz)

    @torch.no_grad()
    def _fisher(self, x: np.ndarray, nz: np.ndarray) -> dict[str, torch.Tensor]:
        w = torch.as_tensor(x[nz], dtype=torch.float32, device=self.dev)
        out = {}
        for k, t in self.experts.items():
            f = self.stats.fisher[k][:, nz].float() + FISHER_EPS
            f = f * w.view(1, -1, *([1] * (t.dim() - 2)))
            out[k] = ((f * t[:, nz]).sum(1) / f.sum(1)).to(t.dtype)
        return out

    def _shrink(self, G: torch.Tensor) -> torch.Tensor:
        """Off-diagonals × α, in place. Linear in G, so shrinking Σ x_k G_k equals Σ x_k shrunk G_k."""
        if self.alpha < 1.0:
            d = torch.diagonal(G, dim1=-2, dim2=-1).clone()
            G.mul_(self.alpha)
            torch.diagonal(G, dim1=-2, dim2=-1).copy_(d)
        return G

    @torch.no_grad()
    def _prepare_regmean(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Once per Merger: raw fp32 Grams flattened [M, K, n·n] (so Σ_k x_k G_k is one matrix-vector
        product per layer: converting the fp16 Grams at every merge was half its cost) and the
        right-hand sides G̃_k W_kᵀ [M, K, in, out]."""
        if self._rhs is None:
            tok = self.stats.tokens.to(self.dev).view(-1, 1, 1)
            grams, rhs = {}, {}
            for wk, g in self.grams.items():
                W = self._out_in(wk)  # [M, K, out, in]
                raw = [self.stats.grams[g][m].float() * tok for m in range(W.shape[0])]
                grams[g] = torch.stack([G.flatten(1) for G in raw])
                rhs[wk] = torch.stack([  # per layer: contiguous [K, in, out] (a batched solve over layers failed in MKL)
                    torch.bmm(self._shrink(G.clone()), W[m].transpose(-1, -2)) for m, G in enumerate(raw)])
            self._grams, self._rhs = grams, rhs
        return self._grams, self._rhs

    @torch.no_grad()
    def _regmean(self, x: np.ndarray, nz: np.ndarray) -> dict[str, torch.Tensor]:
        out = _linear(self.experts, x, nz, [k for k in self.keys if k not in self.grams])
        grams, rhs = self._prepare_regmean()
        w = torch.as_tensor(x, dtype=torch.float32, device=self.dev)  # all K: indexing the experts copied 75 MB a layer
        for wk, g in self.grams.items():
            W = self._out_in(wk)
            n = W.shape[-1]
            merged = torch.empty_like(W[:, 0])
            for m in range(W.shape[0]):
                lhs = self._shrink((w @ grams[g][m]).view(n, n))
                b = torch.einsum("k,kio->io", w, rhs[wk][m])
                lhs.diagonal().add_(1e-6 * lhs.diagonal().mean())  # a ridge for Grams of rank < n
                L, info = torch.linalg.cholesky_ex(lhs)
                if int(info) != 0:
                    raise ValueError(f"regmean: Gram of layer {m} ({wk}) is not positive definite")
                merged[m] = torch.cholesky_solve(b, L).transpose(0, 1)
            out[wk] = merged.transpose(-1, -2).contiguous() if wk in self.transposed else merged
        return {k: out[k] for k in self.keys}

    def _out_in(self, key: str) -> torch.Tensor:
        """A linear's stacked weights as [M, K, out, in]."""
        W = self.experts[key]
        return W.transpose(-1, -2) if key in self.transposed else W


# static merges: each operator at uniform x over all K experts
STATIC_MERGES = {"uniform": "linear", "fisher": "fisher", "regmean": "regmean"}


class ExpertMerging(ABC):
    """What every model does with its experts, one mechanism for all: tasks to expert indices, the
    feasibility of x, the statistics, one `Merger` over the stacked experts (`expert_tensors`, laid out
    as `merge_layout` says), merges by x and the static merges (computed once, then kept). A model sets
    tasks, expert_of, num_experts, budget, stats, merge_operator, regmean_alpha, _merger, static_merges."""

    @abstractmethod
    def expert_tensors(self) -> dict[str, torch.Tensor]:
        """The experts of every MoE layer, {parameter: [layers, K, ...]}."""

    def merge_layout(self) -> tuple[Mapping[str, str], frozenset]:
        """(each linear weight's Gram name, the weights stored [in, out])."""
        return GRAM_OF, frozenset()

    def task_index(self, task: str) -> int:
        check_task(task)
        if task not in self.expert_of:
            raise ValueError(f"unknown task {task!r} for this MoE; its tasks are {self.tasks}")
        return self.expert_of[task]

    def validate_x(self, x) -> np.ndarray:
        return validate_x(x, self.num_experts, self.budget)

    def set_stats(self, stats: ExpertStats | None) -> None:
        """Attach the experts' statistics (Fishers, Grams) that the fisher/regmean operators need."""
        if stats is not None:
            grams, transposed = self.merge_layout()
            stats.check(self.expert_tensors(), grams=grams, transposed=transposed)
        self.stats, self._merger, self.static_merges = stats, None, {}

    @property
    def merger(self) -> Merger:
        if self._merger is None:
            self._merger = Merger(self.expert_tensors(), self.stats, self.regmean_alpha, *self.merge_layout())
        return self._merger

    @torch.no_grad()
    def merged_state(self, x, op: str | None = None) -> dict[str, torch.Tensor]:
        """Merged FFN weights of every MoE layer for weight vector x (validated) under a merge
        operator (default: the model's `merge_operator`)."""
        return self.merger(self.validate_x(x), check_operator(op or self.merge_operator))

    def static_state(self, name: str) -> dict[str, torch.Tensor]:
        """A static merge: 'uniform' (linear average), 'fisher' or 'regmean' — each operator at uniform
        x over all K experts (computed once, then kept)."""
        if name not in STATIC_MERGES:
            raise ValueError(f"no static merge {name!r}; available: {list(STATIC_MERGES)}")
        if name not in self.static_merges:
            uniform = np.full(self.num_experts, 1.0 / self.num_experts)
            self.static_merges[name] = self.merger(uniform, STATIC_MERGES[name])
        return self.static_merges[name]


def merge_experts(experts: Mapping[str, torch.Tensor], x: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_k x_k · expert_k for stacked tensors shaped [layers, K, ...] → [layers, ...] (linear operator)."""
    x = np.asarray(x, dtype=np.float64)
    nz = np.flatnonzero(x)
    if len(nz) == 0:
        raise ValueError("merge: x has no non-zero weight")
    with fp32(next(iter(experts.values())).device):
        return _linear(experts, x, nz, list(experts))
