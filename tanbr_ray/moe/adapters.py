"""Hugging Face MoE adapters: extract the experts of Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE models,
merge them by x into one FFN per layer, and produce a dense model.

In transformers ≥ 5 these families store each layer's experts fused as 3-D parameters
(`experts.gate_up_proj` [K, 2I, H], `experts.down_proj` [K, H, I]) next to a top-k router (`gate`);
Qwen2-MoE adds an always-on shared expert. The adapter works on that layout, whatever the family.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tanbr_ray.moe.merge import validate_x

SUPPORTED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@dataclass
class ExpertLayer:
    """One MoE layer's experts: SwiGLU weights stacked over K experts."""

    name: str
    gate_up: torch.Tensor  # [K, 2I, H]
    down: torch.Tensor  # [K, H, I]

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]


def _is_moe_block(m: nn.Module) -> bool:
    ex = getattr(m, "experts", None)
    return (
        ex is not None
        and isinstance(getattr(ex, "gate_up_proj", None), torch.Tensor)
        and isinstance(getattr(ex, "down_proj", None), torch.Tensor)
        and getattr(ex, "gate_up_proj").dim() == 3
        and hasattr(m, "gate")
    )


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, sparse MoE block) for every fused-expert MoE block in the model."""
    blocks = [(n, m) for n, m in model.named_modules() if _is_moe_block(m)]
    if not blocks:
        mt = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(f"no fused-expert MoE blocks found in {mt!r}; supported families: {SUPPORTED}")
    return blocks


def num_experts(model: nn.Module) -> int:
    ks = {b.experts.gate_up_proj.shape[0] for _, b in find_moe_blocks(model)}
    if len(ks) != 1:
        raise ValueError(f"MoE layers disagree on the number of experts: {sorted(ks)}")
    return ks.pop()


def extract_experts(model: nn.Module) -> list[ExpertLayer]:
    """Detached copies of every MoE layer's expert weights."""
    return [
        ExpertLayer(n, b.experts.gate_up_proj.detach().clone(), b.experts.down_proj.detach().clone())
        for n, b in find_moe_blocks(model)
    ]


class MergedMLP(nn.Module):
    """One SwiGLU FFN (Σ_k x_k·expert_k), plus the block's shared expert where the family has one."""

    def __init__(self, block: nn.Module, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up)
        self.down_proj = nn.Parameter(down)
        self.act_fn = block.experts.act_fn
        self.shared_expert = copy.deepcopy(getattr(block, "shared_expert", None))
        self.shared_expert_gate = copy.deepcopy(getattr(block, "shared_expert_gate", None))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        gate, up = F.linear(h, self.gate_up_proj).chunk(2, dim=-1)
        out = F.linear(self.act_fn(gate) * up, self.down_proj)
        if self.shared_expert is not None:
            shared = self.shared_expert(h)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(h)) * shared
            out = out + shared
        return out.reshape(shape)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def merge_hf_moe(model: nn.Module, x, budget: int | None = None) -> nn.Module:
    """A dense copy of `model`: each MoE block replaced by its experts merged with weights x (the
    router is dropped — a merged model routes nothing). The original model is left untouched."""
    K = num_experts(model)
    w = validate_x(x, K, budget)
    dense = copy.deepcopy(model)
    for name, block in find_moe_blocks(dense):
        wt = torch.as_tensor(w, dtype=block.experts.gate_up_proj.dtype, device=block.experts.gate_up_proj.device)
        gu = torch.einsum("k,kij->ij", wt, block.experts.gate_up_proj)
        dn = torch.einsum("k,kij->ij", wt, block.experts.down_proj)
        _set_module(dense, name, MergedMLP(block, gu, dn))
    if hasattr(dense, "config"):
        dense.config.output_router_logits = False
    return dense


@contextlib.contextmanager
def force_expert(model: nn.Module, expert: int):
    """Route every token of every MoE layer to one expert with weight 1 (the reference for exactness)."""
    K = num_experts(model)
    if not 0 <= expert < K:
        raise ValueError(f"expert {expert} outside 0..{K - 1}")
    saved = []
    for _, block in find_moe_blocks(model):
        gate = block.gate

        def forced(hidden_states, _g=gate):
            h = hidden_states.reshape(-1, hidden_states.shape[-1])
            n = h.shape[0]
            logits = torch.zeros(n, K, dtype=h.dtype, device=h.device)
            return logits, torch.ones(n, 1, dtype=h.dtype, device=h.device), torch.full((n, 1), expert, device=h.device, dtype=torch.long)

        saved.append((gate, gate.forward))
        gate.forward = forced
    try:
        yield model
    finally:
        for gate, fwd in saved:
            gate.forward = fwd


def param_bytes(model: nn.Module) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


def load_hf_moe(path: str | os.PathLike, causal_lm: bool = True) -> nn.Module:
    """Load a local Hugging Face MoE checkpoint (safetensors; never the hub, never pickles)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{p}: not a local model folder")
    cfg = AutoConfig.from_pretrained(p, local_files_only=True)
    if cfg.model_type not in SUPPORTED:
        raise ValueError(f"{p}: model_type {cfg.model_type!r} not supported; supported: {SUPPORTED}")
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_pretrained(p, local_files_only=True, use_safetensors=True)
    model.eval()
    find_moe_blocks(model)
    return model


def merge_hf_checkpoint(path: str | os.PathLike, x, out_dir: str | os.PathLike | None = None) -> nn.Module:
    """Load a local MoE, merge by x, optionally save the dense model's weights as safetensors."""
    model = load_hf_moe(path)
    dense = merge_hf_moe(model, np.asarray(x, dtype=float))
    if out_dir is not None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in dense.state_dict().items()}
        tmp = out / ".model.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(out / "model.safetensors")
    return dense
