"""Cache of built pools, like the built-in model's (`store.py`): safetensors weights and statistics,
a JSON config with their sha256s written last (the commit point). The directory is named by the
pool's settings and the content hashes of its checkpoints and data, so a changed checkpoint or data
file is a new model, never a stale cache hit."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from tanbr_ray.fileio import sha256_file
from tanbr_ray.moe.build import BuiltMoE
from tanbr_ray.moe.config import default_models_dir, resolve_device
from tanbr_ray.moe.families import Family, family_of
from tanbr_ray.moe.merge import ExpertStats
from tanbr_ray.moe.pool_config import PoolConfig, load_pool_config, register_tasks
from tanbr_ray.moe.pool_model import PoolMoE
from tanbr_ray.moe.pool_parts import empty_mean_mlp_head
from tanbr_ray.moe.store import CONFIG, STATS, WEIGHTS, _read_verified, write_model

FORMAT = "tanbr-pool-moe/1"
TOKENIZER = "tokenizer"  # the pool's tokenizer, saved as JSON beside the weights


def checkpoint_sha256(ref: str) -> str:
    """Content hash of a local checkpoint folder (every file in it); a hub id as written."""
    p = Path(ref)
    if not p.is_dir():
        return "hub:" + ref
    h = hashlib.sha256()
    for f in sorted(q for q in p.iterdir() if q.is_file()):  # weights, configs, tokenizer files alike
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def data_sha256(data: dict) -> dict[str, str]:
    """Content hash of each task's train split (texts and labels, in order)."""
    out = {}
    for t, sp in data.items():
        h = hashlib.sha256()
        for i in range(len(sp)):
            h.update(sp.text_a[i].encode())
            h.update(b"\0" + (sp.text_b[i].encode() if sp.text_b is not None else b"") + b"\1")
        h.update(np.ascontiguousarray(sp.labels, dtype=np.float64).tobytes())
        out[t] = h.hexdigest()
    return out


def pool_key(cfg: PoolConfig, data: dict) -> dict:
    """What names a built pool: its settings, its checkpoints' contents and its data's."""
    settings = cfg.model_dump(exclude={"device", "merge_operator", "regmean_alpha"})
    ident = {"settings": settings, "base": checkpoint_sha256(cfg.base),
             "checkpoints": {e.task: checkpoint_sha256(e.checkpoint) for e in cfg.experts},
             "tokenizer": checkpoint_sha256(cfg.tokenizer) if cfg.tokenizer else None,
             "parts": sha256_file(cfg.parts) if cfg.parts else None,
             "data": data_sha256(data)}
    ident["key"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return ident


def save_pool(moe: PoolMoE, cfg: PoolConfig, ident: dict, directory: Path, build: dict, configs: dict) -> Path:
    """The pool's cache folder (`store.write_model`), its tokenizer saved as JSON beside the weights."""
    def tokenizer(d: Path) -> dict:
        moe.tokenizer.save_pretrained(d / TOKENIZER, legacy_format=False)  # JSON only: the cache is self-contained
        return {"tokenizer_sha256": {f.name: sha256_file(f) for f in sorted((d / TOKENIZER).iterdir())}}

    heads = {t: moe.heads[t.replace("-", "_")] for t in moe.tasks}
    meta = {"pool_config": cfg.model_dump(), "identity": ident, "family": moe.family.name,
            "backbone_config": moe.backbone.config.to_dict(),
            "head_configs": {t: c.to_dict() for t, c in configs.items()},
            "pooling": moe.pooling, "adapt_names": moe.adapt_names(),
            "experts": {"num_experts": moe.num_experts, "expert_of": moe.expert_of, "expert_map": moe.expert_map,
                        "native_top_k": getattr(moe, "native_top_k", None), "renormalize": moe.renormalize},
            "moe_layers": list(moe.moe_layers),
            "mean_mlp_heads": {t: int(h["mean_mlp"].fc.out_features) for t, h in heads.items() if "mean_mlp" in h}}
    d = Path(directory)
    write_model(moe, d, FORMAT, meta, build, tokenizer)
    moe.meta = meta
    moe.head_configs = meta["head_configs"]  # each task's classifier config (for merged checkpoints)
    return d


def pool_modules(meta: dict, where: str) -> tuple[PoolConfig, Family, torch.nn.Module, dict]:
    """(settings, family, backbone, heads) rebuilt from a stored pool config, weights uninitialised;
    the pool's tasks beyond GLUE registered in this process. ValueError naming `where` if malformed."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    try:
        cfg = PoolConfig(**meta["pool_config"])
        register_tasks(cfg, {t: c.get("num_labels") or len(c["id2label"]) for t, c in meta["head_configs"].items()})
        family = family_of(meta["backbone_config"]["model_type"], where)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: invalid pool config ({e})") from e

    def config(raw: dict):
        raw = dict(raw)
        return AutoConfig.for_model(raw.pop("model_type"), **raw)

    backbone = AutoModel.from_config(config(meta["backbone_config"]))
    if hasattr(backbone, "pooler"):
        backbone.pooler = None
    hidden, inner = backbone.config.hidden_size, meta.get("mean_mlp_heads", {})
    def head(c: dict) -> torch.nn.ModuleDict:  # the classifier built bodiless (meta), its head given storage
        with torch.device("meta"):
            clf = AutoModelForSequenceClassification.from_config(config(c))
        return family.head_modules(clf).to_empty(device="cpu")  # the caller loads its weights

    heads = {t: empty_mean_mlp_head(hidden, inner[t], t) if t in inner else head(c)
             for t, c in meta["head_configs"].items()}
    return cfg, family, backbone, heads


def load_pool(directory: str | os.PathLike, device="cpu") -> tuple[PoolMoE, dict]:
    """Verify checksums, rebuild the modules from the stored configs, load; never unpickles."""
    from transformers import AutoTokenizer

    d = Path(directory)
    try:
        meta = json.loads((d / CONFIG).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} config")
        files = {n: (int(v["bytes"]), str(v["sha256"])) for n, v in meta["files"].items()}
    except (OSError, KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"{d / CONFIG}: invalid pool config ({e})") from e
    cfg, family, backbone, heads = pool_modules(meta, str(d / CONFIG))
    loaded = {n: _read_verified(d / n, *files[n]) for n in files}
    ex = meta["experts"]
    moe = PoolMoE(family, backbone, cfg.tasks, heads, meta.get("moe_layers", cfg.moe_layers), cfg.budget,
                  meta.get("pooling"), meta.get("adapt_names", []), ex["num_experts"], ex["expert_of"], ex["expert_map"])
    moe.renormalize = bool(ex.get("renormalize", True))
    if ex.get("native_top_k"):
        moe.native_top_k = int(ex["native_top_k"])
    try:
        moe.load_state_dict(loaded[WEIGHTS], strict=True)
    except RuntimeError as e:
        raise ValueError(f"{d / WEIGHTS}: weights do not match the config ({e})") from e
    moe.to(device).eval()
    if STATS in loaded:
        moe.set_stats(ExpertStats.from_tensors(loaded[STATS], str(d / STATS), moe.keys,
                                               family.grams).to(device))
    for name, sha in meta.get("tokenizer_sha256", {}).items():
        f = d / TOKENIZER / name
        if not f.is_file() or sha256_file(f) != sha:
            raise ValueError(f"{f}: missing or altered (sha256 mismatch)")
    moe.meta = meta  # what an edge package rebuilds the shell from
    moe.tokenizer = AutoTokenizer.from_pretrained(d / TOKENIZER)
    if moe.tokenizer.pad_token is None:
        moe.tokenizer.pad_token = moe.tokenizer.eos_token
    moe.max_len_single, moe.max_len_pair = cfg.max_len_single, cfg.max_len_pair
    moe.merge_operator, moe.regmean_alpha = cfg.merge_operator, cfg.regmean_alpha
    moe.identity = {"key": d.name, "weights_sha256": files[WEIGHTS][1]}
    moe.cache_dir = d
    moe.head_configs = meta["head_configs"]
    return moe, meta


def pool_dirname(cfg: PoolConfig, ident: dict) -> str:
    return f"pool-{cfg.name}-{ident['key']}"


def pool_cache_name(path: str | os.PathLike, data_dir=None) -> str:
    """The cache folder name of the pool a YAML names (its checkpoints and data hashed; nothing built):
    what a process that only loads the pool (a merger, a trial) is told to find."""
    from tanbr_ray.moe.pool_build import load_configs, load_data

    cfg = load_pool_config(path)
    load_configs(cfg)
    return pool_dirname(cfg, pool_key(cfg, load_data(cfg, data_dir)))


def load_or_build_pool(path: str | os.PathLike, models_dir=None, progress: bool = True, data_dir=None,
                       rebuild: bool = False) -> BuiltMoE:
    """The pool a YAML names: checked, then reused from the cache or built and cached."""
    from tanbr_ray.moe.pool_build import build_pool, load_configs, load_data

    cfg = load_pool_config(path)
    _, _, configs = load_configs(cfg)  # refuses a bad pool before any data or weights are read
    data = load_data(cfg, data_dir)
    ident = pool_key(cfg, data)
    d = Path(models_dir or default_models_dir()) / pool_dirname(cfg, ident)
    if (d / CONFIG).exists() and not rebuild:
        moe, meta = load_pool(d, resolve_device(cfg.device))
        moe.merge_operator, moe.regmean_alpha = cfg.merge_operator, cfg.regmean_alpha  # not in the key: the YAML's
        return BuiltMoE(moe, d, meta.get("build", {}))
    moe, stats = build_pool(cfg, data_dir, progress, data)
    save_pool(moe, cfg, ident, d, stats, configs)
    return BuiltMoE(moe, d, stats)
