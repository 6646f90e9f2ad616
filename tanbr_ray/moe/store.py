"""Model cache: safetensors weights + a JSON config with sha256 checksums, written atomically.

The config (written last, by rename) is the commit point: a crash mid-write leaves at most a stray
temp file, never a directory that looks valid. Loading verifies size and checksum before reading and
never unpickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig

from tanbr_ray.fileio import atomic_write, sha256_file
from tanbr_ray.moe.config import MoEConfig
from tanbr_ray.moe.merge import FFN_KEYS
from tanbr_ray.moe.model import TaskMoE

FORMAT = "tanbr-task-moe/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _tensors(moe: TaskMoE) -> dict[str, torch.Tensor]:
    out = {k: v.detach().cpu().contiguous().clone() for k, v in moe.state_dict().items()}
    for name, st in moe.static_merges.items():
        for k in FFN_KEYS:
            out[f"static.{name}.{k}"] = st[k].detach().cpu().contiguous().clone()
    return out


def save_moe(moe: TaskMoE, cfg: MoEConfig, directory: str | os.PathLike, build: dict | None = None) -> Path:
    """Write weights then config (with the weights' sha256) atomically into `directory`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(moe)
    atomic_write(d / WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "moe_config": cfg.model_dump(),
        "bert_config": moe.bert_config.to_dict(),
        "static_merges": sorted(moe.static_merges),
        "files": {WEIGHTS: {"sha256": sha256_file(d / WEIGHTS), "bytes": (d / WEIGHTS).stat().st_size}},
        "build": build or {},
    }
    atomic_write(d / CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=float)))
    return d


def read_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no model config (cache missing or incomplete)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt model config ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} model config")
    return meta


def load_moe(directory: str | os.PathLike, device="cpu") -> tuple[TaskMoE, MoEConfig, dict]:
    """Verify checksums, then load; a truncated or altered file is refused with its name."""
    d = Path(directory)
    meta = read_meta(d)
    try:
        cfg = MoEConfig(**meta["moe_config"])
        bert_config = BertConfig(**meta["bert_config"])
        info = meta["files"][WEIGHTS]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{d / CONFIG}: invalid model config ({e})") from e
    wpath = d / WEIGHTS
    if not wpath.is_file():
        raise ValueError(f"{wpath}: weights file missing")
    if wpath.stat().st_size != info["bytes"]:
        raise ValueError(f"{wpath}: size {wpath.stat().st_size} != recorded {info['bytes']} (truncated or altered)")
    if sha256_file(wpath) != info["sha256"]:
        raise ValueError(f"{wpath}: sha256 mismatch (file altered or corrupt)")
    try:
        tensors = load_file(str(wpath))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{wpath}: unreadable safetensors ({e})") from e
    moe = TaskMoE(bert_config, cfg.tasks, cfg.moe_layers, cfg.head_hidden, cfg.dropout, cfg.budget)
    static: dict[str, dict[str, torch.Tensor]] = {}
    for k in list(tensors):
        if k.startswith("static."):
            _, name, key = k.split(".", 2)
            static.setdefault(name, {})[key] = tensors.pop(k)
    try:
        moe.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{wpath}: weights do not match the config ({e})") from e
    moe.static_merges = static
    moe.to(device)
    moe.static_merges = {n: {k: v.to(device) for k, v in st.items()} for n, st in static.items()}
    moe.eval()
    return moe, cfg, meta
