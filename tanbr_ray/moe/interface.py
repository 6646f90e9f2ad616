"""What the simulator, the benchmarks, Tune and the cluster need from a model — the one interface every
model implements: the built-in `TaskMoE`, a pool of fine-tunes (`PoolMoE`), a native MoE checkpoint.
Nothing above `moe/` names a concrete model class; `resolve.open_model` turns a `model:` value into
one of these.

A model serves single-task batches in the modes of `model.MODE_SPECS` — dense, oracle (the task's
expert), top1/top2 (token routing), soft (per-example merging), merged (one FFN per layer from x
under a merge operator, or a static merge). Scoring is split in two so many merges reuse one pass
over what does not depend on them: `prepare` caches each pool example's mode-independent prefix
(`embed_to_first_moe`), `pooled_from_first_moe` runs the rest in a mode and `head_for` reads the
task's logits from it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class MergeableMoE(Protocol):
    """K experts per MoE layer, merged at x; tasks with heads; bytes and identity for the results."""

    tasks: list[str]  # the heads it serves (GLUE task names: their metrics and label counts)
    num_experts: int  # K
    budget: int  # at most this many non-zeros in x
    expert_of: Mapping[str, int]  # the expert that serves each task best (Tanbr's prior, ψ-merge, comparator)
    expert_map: str  # how expert_of was made: "task" (expert k tuned on task k) or measured router usage
    expert_labels: list[str]  # a name per expert, for results
    merge_operator: str  # the operator x merges by unless a run names another
    tokenizer: object  # a Hugging Face tokenizer
    max_len_single: int
    max_len_pair: int
    identity: Mapping[str, str]  # {"key", "weights_sha256"}: what a result was computed with
    stats: object | None  # the experts' merge statistics (None: only the linear operator)
    moe_layers: list[int]  # the layers whose FFN holds experts
    adapted: object  # truthy when merged mode runs with merge-aware adaptation (a 0-d tensor or a bool)

    @property
    def device(self) -> torch.device: ...

    def task_index(self, task: str) -> int: ...

    def validate_x(self, x) -> np.ndarray: ...

    def merged_state(self, x, op: str | None = None) -> dict[str, torch.Tensor]:
        """The merged FFN of every MoE layer for a feasible x ({parameter: [layers, ...]})."""

    def static_state(self, name: str) -> dict[str, torch.Tensor]:
        """A static merge: uniform | fisher | regmean (each operator at uniform x)."""

    def prepare(self, splits, batch_size: int = 32, progress: bool = False):
        """An `infer.EvalCache` of the examples' mode-independent prefix."""

    def embed_to_first_moe(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor: ...

    def pooled_from_first_moe(self, h, attention_mask, task, mode="oracle", x=None, state=None, adapted=None,
                              record=None) -> tuple[torch.Tensor, bool]:
        """(features the heads read, whether merge-aware adaptation ran) from a cached prefix."""

    def head_for(self, mode: str, task: str, use_adapt: bool) -> Callable[[torch.Tensor], torch.Tensor]: ...

    def __call__(self, input_ids, attention_mask, token_type_ids, task, mode="oracle", x=None, state=None,
                 adapted=None) -> torch.Tensor:
        """Logits of one task's batch in a mode."""

    def dense_model(self, x=None, state=None, adapted=None) -> Callable:
        """What a node serving one merged model holds: a forward (ids, mask, types, task) -> logits."""

    def resident_bytes(self, mode: str) -> int:
        """Parameter bytes a node holds to serve the mode."""

    def edge_parts(self) -> tuple[str, dict, dict[str, torch.Tensor]]:
        """What an edge node builds its dense shell from, without the experts: (the shell class as
        "module:Class", an `EdgeShell`; its config, plain JSON; its tensors)."""

    def eval(self): ...


@runtime_checkable
class EdgeVersion(Protocol):
    """One merged version on a node's shell: a forward, and what it holds beyond the shell."""

    def __call__(self, input_ids, attention_mask, token_type_ids, task: str) -> torch.Tensor: ...

    def tensors(self) -> list[torch.Tensor]: ...

    def resident_bytes(self) -> int: ...


class EdgeShell(Protocol):
    """A model's dense shell on an edge node (`MergeableMoE.edge_parts`): merged FFNs swapped in per version."""

    @classmethod
    def from_package(cls, config: dict, tensors: Mapping[str, torch.Tensor], tasks: list[str]) -> "EdgeShell": ...

    def with_ffn(self, state: Mapping[str, torch.Tensor]) -> EdgeVersion:
        """This shell serving merged FFNs ({parameter: [moe layers, ...]}, as `merged_state` gives them)."""
