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

from tanbr_ray.moe.infer import max_len_for
from tanbr_ray.moe.merge import FFN_KEYS
from tanbr_ray.moe.model import DenseModel, MergedVersion, TaskMoE
from tanbr_ray.moe.pool_edge import KIND, PoolShell, PoolVersion, pool_shell_parts
from tanbr_ray.moe.pool_model import PoolMoE
from tanbr_ray.moe.serving import Item, check_items, serve_items

Version = MergedVersion | PoolVersion  # a shell with one version of merged FFNs: a forward (ids, mask, types, task)


@dataclass
class EdgePackage:
    kind: str  # which shell the node builds: "task-moe" (the built-in `DenseModel`) or "pool" (`PoolShell`)
    config: dict  # the shell's structure, plain JSON
    tasks: list[str]
    max_len: dict[str, int]  # per task
    tensors: dict[str, torch.Tensor]  # the shell's state without the MoE layers' FFNs
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)

    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.tensors.values()))


def edge_package(moe, adapted: bool | None = None) -> EdgePackage:
    """The shell a node needs besides merged FFNs (heads and norms as merged serving uses them)."""
    if isinstance(moe, TaskMoE):
        kind, (config, tensors) = "task-moe", _task_moe_parts(moe, adapted)
    elif isinstance(moe, PoolMoE):
        if adapted is not None and adapted != bool(moe.adapted.item()):
            raise ValueError("a pool's edge package serves merged mode as the pool does (adapted as built)")
        kind, (config, tensors) = KIND, pool_shell_parts(moe)
    else:
        raise TypeError(f"no edge package for a {type(moe).__name__}: the built-in MoE and pools have one")
    with tempfile.TemporaryDirectory() as d:
        moe.tokenizer.save_pretrained(d)
        files = {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}
    return EdgePackage(kind, config, list(moe.tasks), {t: max_len_for(moe, t) for t in moe.tasks}, tensors, files)


def _task_moe_parts(moe: TaskMoE, adapted: bool | None) -> tuple[dict, dict[str, torch.Tensor]]:
    x = np.full(moe.num_experts, 1.0 / moe.num_experts)
    dm = moe.dense_model(x=x, adapted=adapted)
    moe_ffn = {f"ffn.{l}.{k}" for l in moe.moe_layers for k in FFN_KEYS}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in dm.state_dict().items() if k not in moe_ffn}
    head_hidden = dm.heads[TaskMoE._hk(moe.tasks[0])].fc.out_features
    return {"bert_config": moe.bert_config.to_dict(), "moe_layers": list(moe.moe_layers),
            "head_hidden": head_hidden}, tensors


def build_shell(pkg: EdgePackage):
    """The package's shell with its tensors loaded; ValueError if they do not match its config."""
    if pkg.kind == KIND:
        shell = PoolShell(pkg.config)
        shell.load_package(pkg.tensors)
        return shell
    if pkg.kind != "task-moe":
        raise ValueError(f"edge package of unknown kind {pkg.kind!r}")
    c = pkg.config
    shell = DenseModel(BertConfig(**c["bert_config"]), pkg.tasks, c["moe_layers"], c["head_hidden"])
    missing, unexpected = shell.load_state_dict(pkg.tensors, strict=False)
    allowed = {f"ffn.{l}.{k}" for l in c["moe_layers"] for k in FFN_KEYS}
    if unexpected or set(missing) - allowed:
        raise ValueError(f"edge package does not match its config: missing {sorted(set(missing) - allowed)}, "
                         f"unexpected {sorted(unexpected)}")
    return shell


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
