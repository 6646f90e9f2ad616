"""Model cache: safetensors weights, the experts' merge statistics (Fishers, Grams) in a second
safetensors file, and a JSON config with both files' sha256 checksums, written atomically.

The config (written last, by rename) is the commit point: a crash mid-write leaves at most a stray
temp file, never a directory that looks valid. Loading verifies size and checksum before reading and
never unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig

from tanbr_ray.fileio import atomic_write, sha256_file
from tanbr_ray.moe.config import MoEConfig
from tanbr_ray.moe.merge import ExpertStats
from tanbr_ray.moe.model import TaskMoE

FORMAT = "tanbr-task-moe/2"
WEIGHTS = "model.safetensors"
STATS = "stats.safetensors"
CONFIG = "config.json"


def save_moe(moe: TaskMoE, cfg: MoEConfig, directory: str | os.PathLike, build: dict | None = None) -> Path:
    """Write weights and statistics, then the config (with their sha256s) atomically into `directory`."""
    d = Path(directory)
    write_model(moe, d, FORMAT, {"moe_config": cfg.model_dump(), "bert_config": moe.bert_config.to_dict()}, build)
    return d


def write_model(moe, d: Path, fmt: str, meta: dict, build: dict | None = None, extra=None) -> dict:
    """A model's cache folder, for every kind of model: its state dict and its statistics as safetensors,
    `extra(d)` (more files; returns more config keys), then the config with the files' sha256s, written
    last (the commit point). Sets the model's identity and home; returns the config."""
    d.mkdir(parents=True, exist_ok=True)
    files = {WEIGHTS: {k: v.detach().cpu().contiguous().clone() for k, v in moe.state_dict().items()}}
    if moe.stats is not None:
        files[STATS] = moe.stats.tensors()
    for name, tensors in files.items():
        atomic_write(d / name, lambda p, t=tensors: save_file(t, p, metadata={"format": fmt}))
    meta = {"format": fmt, **meta, **(extra(d) if extra else {}),
            "files": {n: {"sha256": sha256_file(d / n), "bytes": (d / n).stat().st_size} for n in files},
            "build": build or {}}
    atomic_write(d / CONFIG, lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=float)))
    moe.identity = {"key": d.name, "weights_sha256": meta["files"][WEIGHTS]["sha256"]}
    moe.cache_dir = d  # where measurements of this model are kept beside it (its calibration)
    return meta


def read_meta(directory: str | os.PathLike, formats: tuple[str, ...] = (FORMAT,)) -> dict:
    """A cached model's config, if it is one of `formats`; ValueError naming the file otherwise."""
    path = Path(directory) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no model config (cache missing or incomplete)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt model config ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        raise ValueError(f"{path}: not a {' or '.join(formats)} model config")
    return meta


def load_moe(directory: str | os.PathLike, device="cpu") -> tuple[TaskMoE, MoEConfig, dict]:
    """Verify checksums, then load; a truncated or altered file is refused with its name."""
    d = Path(directory)
    meta = read_meta(d)
    try:
        cfg = MoEConfig(**meta["moe_config"])
        bert_config = BertConfig(**meta["bert_config"])
        files = {n: (int(meta["files"][n]["bytes"]), str(meta["files"][n]["sha256"])) for n in meta["files"]}
        if WEIGHTS not in files or not set(files) <= {WEIGHTS, STATS}:
            raise ValueError(f"files must list {WEIGHTS} (and optionally {STATS}), got {sorted(files)}")
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{d / CONFIG}: invalid model config ({e})") from e
    loaded = {n: _read_verified(d / n, *files[n]) for n in files}
    moe = TaskMoE(bert_config, cfg.tasks, cfg.moe_layers, cfg.head_hidden, cfg.dropout, cfg.budget)
    try:
        moe.load_state_dict(loaded[WEIGHTS], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{d / WEIGHTS}: weights do not match the config ({e})") from e
    moe.merge_operator, moe.regmean_alpha = cfg.merge_operator, cfg.regmean_alpha
    moe.to(device)
    if STATS in loaded:
        stats = ExpertStats.from_tensors(loaded[STATS], str(d / STATS)).to(device)
        try:
            moe.set_stats(stats)
        except ValueError as e:
            raise ValueError(f"{d / STATS}: {e}") from e
    moe.eval()
    moe.identity = {"key": d.name, "weights_sha256": files[WEIGHTS][1]}
    moe.cache_dir = d
    return moe, cfg, meta


def _read_verified(path: Path, size: int, sha256: str) -> dict[str, torch.Tensor]:
    """Size and checksum first, then safetensors (never unpickles); errors name the file."""
    if not path.is_file():
        raise ValueError(f"{path}: file missing")
    if path.stat().st_size != size:
        raise ValueError(f"{path}: size {path.stat().st_size} != recorded {size} (truncated or altered)")
    if sha256_file(path) != sha256:
        raise ValueError(f"{path}: sha256 mismatch (file altered or corrupt)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: unreadable safetensors ({e})") from e


def weights_checksum(directory: str | os.PathLike) -> str:
    """The sha256 its config records for a cached model's weights (names what was computed with it)."""
    return str(read_meta(directory)["files"][WEIGHTS]["sha256"])


def model_identity(moe) -> dict:
    """What a result was computed with: a stored model's cache key and weights sha256 (as its config
    records them); a model that was never stored is hashed from its state dict instead."""
    if getattr(moe, "identity", None):
        return dict(moe.identity)
    h = hashlib.sha256()
    for name, t in sorted(moe.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"key": "unsaved", "weights_sha256": "state:" + h.hexdigest()}
