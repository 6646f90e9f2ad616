"""What an edge node holds: the dense shell of the merged model plus one merged FFN per MoE layer.

The central router keeps the full MoE; a node receives an `EdgePackage` once (the model's shell:
embeddings, attention, heads, non-MoE FFNs — whatever its `edge_parts` names — and its tokenizer
files, as plain tensors and bytes with the shell class named by import path, so it crosses processes
and machines without pickled code) and then only merged FFNs, one version per chosen x. `EdgeModel`
serves raw text requests with it, never the experts.
"""

from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from tanbr_ray.moe.infer import max_len_for
from tanbr_ray.moe.interface import EdgeVersion as Version
from tanbr_ray.moe.serving import Item, check_items, serve_items


@dataclass
class EdgePackage:
    shell: str  # the shell class ("module:Class", as Serve names code), built by its `from_package`
    config: dict  # the shell's structure, plain JSON
    tasks: list[str]
    max_len: dict[str, int]  # per task
    tensors: dict[str, torch.Tensor]  # the shell's state without the MoE layers' FFNs
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)

    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.tensors.values()))


def edge_package(moe) -> EdgePackage:
    """What a node needs besides merged FFNs: the model's shell (`edge_parts`) and its tokenizer."""
    shell, config, tensors = moe.edge_parts()
    with tempfile.TemporaryDirectory() as d:
        moe.tokenizer.save_pretrained(d)
        files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
    return EdgePackage(shell, config, list(moe.tasks), {t: max_len_for(moe, t) for t in moe.tasks}, tensors, files)


def build_shell(pkg: EdgePackage):
    """The package's shell with its tensors loaded; ValueError if they do not match its config."""
    module, _, name = pkg.shell.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"edge package names a shell {pkg.shell!r} this process cannot import ({e})") from None
    if not callable(getattr(cls, "from_package", None)):
        raise ValueError(f"edge package names {pkg.shell!r}, which is no edge shell (no from_package)")
    return cls.from_package(pkg.config, pkg.tensors, list(pkg.tasks))


class EdgeModel:
    """A node's model: the shell from the package, merged FFNs swapped in per version."""

    def __init__(self, pkg: EdgePackage, threads: int | None = None, bf16: bool = False, device: str | None = None):
        self.bf16 = bf16  # serve under bf16 autocast, as the simulation scores with `bf16`
        # the GPU Ray gave this process (CUDA_VISIBLE_DEVICES), else the CPU
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if threads:
            torch.set_num_threads(threads)
        self.tasks = list(pkg.tasks)
        self.max_len = dict(pkg.max_len)
        self.shell = build_shell(pkg).to(self.device)
        with tempfile.TemporaryDirectory() as d:
            for name, data in pkg.tokenizer_files.items():
                (Path(d) / Path(name).name).write_bytes(data)
            self.tokenizer = AutoTokenizer.from_pretrained(d)
        if self.tokenizer.pad_token is None:  # decoder families pad with their end token, as the model did
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model: Version | None = None  # None until the first merged FFNs arrive

    def load_ffn(self, state: dict[str, torch.Tensor]) -> None:
        """Swap in merged FFNs: the new model is complete before it replaces the old one."""
        self.model = self.shell.with_ffn({k: v.to(self.device) for k, v in state.items()})

    def resident_bytes(self) -> int:
        return 0 if self.model is None else self.model.resident_bytes()

    def predict(self, task: str, text_a: list[str], text_b: list[str] | None = None,
                model: Version | None = None) -> np.ndarray:
        """Labels (class index) or scores (STS-B) for single-task requests, in request order; with
        this node's current model, or `model` (another FFN version on the same shell)."""
        b = [None] * len(text_a) if text_b is None else list(text_b)
        return self.predict_items([(task, a, tb) for a, tb in zip(text_a, b)], model, chunk=32)

    def predict_items(self, items: list[Item], model: Version | None = None,
                      chunk: int | None = None) -> np.ndarray:
        """One batch of (head, text_a, text_b) requests, heads mixed, as a replica serves it."""
        model = model or self.model  # one version for the whole call, even if a push lands meanwhile
        if model is None:
            raise RuntimeError("no merged model loaded yet")
        check_items(items, self.tasks)
        return serve_items(self.tokenizer, self.max_len, model, items, self.device, self.bf16, chunk)
