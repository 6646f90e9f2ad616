"""What an edge node holds: the dense shell of the merged model plus one merged FFN per MoE layer.

The central router keeps the full MoE; a node receives an `EdgePackage` once (embeddings, attention,
heads, non-MoE FFNs, tokenizer files — plain tensors and bytes, so it crosses processes and machines
without pickled code) and then only merged FFNs, one version per chosen x. `EdgeModel` serves raw
text requests with it, never the experts.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, BertConfig

from tanbr_ray.moe.data import PAIR
from tanbr_ray.moe.merge import FFN_KEYS
from tanbr_ray.moe.model import DenseModel, MergedVersion, TaskMoE
from tanbr_ray.moe.serving import Item, check_items, serve_items


@dataclass
class EdgePackage:
    bert_config: dict
    tasks: list[str]
    moe_layers: list[int]
    head_hidden: int
    max_len_single: int
    max_len_pair: int
    tensors: dict[str, torch.Tensor]  # DenseModel state without the MoE layers' FFNs
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)

    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.tensors.values()))


def edge_package(moe: TaskMoE, adapted: bool | None = None) -> EdgePackage:
    """The shell a node needs besides merged FFNs (heads and attention norms as merged serving uses)."""
    x = np.full(moe.num_experts, 1.0 / moe.num_experts)
    dm = moe.dense_model(x=x, adapted=adapted)
    moe_ffn = {f"ffn.{l}.{k}" for l in moe.moe_layers for k in FFN_KEYS}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in dm.state_dict().items() if k not in moe_ffn}
    with tempfile.TemporaryDirectory() as d:
        moe.tokenizer.save_pretrained(d)
        files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
    head_hidden = dm.heads[TaskMoE._hk(moe.tasks[0])].fc.out_features
    return EdgePackage(moe.bert_config.to_dict(), list(moe.tasks), list(moe.moe_layers), head_hidden,
                       moe.max_len_single, moe.max_len_pair, tensors, files)


class EdgeModel:
    """A node's model: the shell from the package, merged FFNs swapped in per version."""

    def __init__(self, pkg: EdgePackage, threads: int | None = None, bf16: bool = False, device: str | None = None):
        self.bf16 = bf16  # serve under bf16 autocast, as the simulation scores with `bf16`
        # the GPU Ray gave this process (CUDA_VISIBLE_DEVICES), else the CPU
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads:
            torch.set_num_threads(threads)
        self.tasks = list(pkg.tasks)
        self.max_len = {t: pkg.max_len_pair if PAIR[t] else pkg.max_len_single for t in self.tasks}
        shell = DenseModel(BertConfig(**pkg.bert_config), pkg.tasks, pkg.moe_layers, pkg.head_hidden)
        missing, unexpected = shell.load_state_dict(pkg.tensors, strict=False)
        allowed = {f"ffn.{l}.{k}" for l in pkg.moe_layers for k in FFN_KEYS}
        if unexpected or set(missing) - allowed:
            raise ValueError(f"edge package does not match its config: missing {sorted(set(missing) - allowed)}, "
                             f"unexpected {sorted(unexpected)}")
        self.shell = shell.to(self.device)
        with tempfile.TemporaryDirectory() as d:
            for name, data in pkg.tokenizer_files.items():
                (Path(d) / Path(name).name).write_bytes(data)
            self.tokenizer = AutoTokenizer.from_pretrained(d)
        self.model: MergedVersion | None = None  # None until the first merged FFNs arrive

    def load_ffn(self, state: dict[str, torch.Tensor]) -> None:
        """Swap in merged FFNs: the new model is complete before it replaces the old one."""
        self.model = self.shell.with_ffn({k: v.to(self.device) for k, v in state.items()})

    def resident_bytes(self) -> int:
        return 0 if self.model is None else self.model.resident_bytes()

    def predict(self, task: str, text_a: list[str], text_b: list[str] | None = None,
                model: MergedVersion | None = None) -> np.ndarray:
        """Labels (class index) or scores (STS-B) for single-task requests, in request order; with
        this node's current model, or `model` (another FFN version on the same shell)."""
        b = [None] * len(text_a) if text_b is None else list(text_b)
        return self.predict_items([(task, a, tb) for a, tb in zip(text_a, b)], model, chunk=32)

    def predict_items(self, items: list[Item], model: MergedVersion | None = None,
                      chunk: int | None = None) -> np.ndarray:
        """One batch of (head, text_a, text_b) requests, heads mixed, as a replica serves it."""
        model = model or self.model  # one version for the whole call, even if a push lands meanwhile
        if model is None:
            raise RuntimeError("no merged model loaded yet")
        check_items(items, self.tasks)
        return serve_items(self.tokenizer, self.max_len, model, items, self.device, self.bf16, chunk)
