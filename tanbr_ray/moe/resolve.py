"""The one place a `model:` value becomes a model: `default` / `quick` (the built-in MoE presets,
built from MiniLM on first use) or a YAML naming a pool of fine-tunes (`pool_config.py`). Every
command resolves its model here and then sees only the interface of `moe/interface.py`."""

from __future__ import annotations

import re
from pathlib import Path

from tanbr_ray.moe.build import BuiltMoE
from tanbr_ray.moe.pool_config import is_pool_spec

PRESETS = ("default", "quick")
MODEL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*-[0-9a-f]{12}")  # a built model's cache folder name


def is_model_name(v: str) -> bool:
    """A built model named by its cache folder (what `tanbr build-moe --publish` prints), not a file."""
    return bool(MODEL_NAME.fullmatch(v)) and not is_pool_spec(v)


def check_spec(spec: str) -> str:
    """A valid `model:` value, or a ValueError saying what is accepted."""
    if spec in PRESETS:
        return spec
    if is_pool_spec(spec):
        if not Path(spec).is_file():
            raise ValueError(f"model: {spec} is not a file")
        return spec
    raise ValueError(f"model: {spec!r} is neither a preset {list(PRESETS)} nor a pool YAML (path/to/pool.yaml)")


def preset_config(spec: str):
    from tanbr_ray.moe.config import default_config, quick_config

    return quick_config() if spec == "quick" else default_config()


def is_cached(spec: str, models_dir=None) -> bool | None:
    """Whether a preset's build is cached (None for a pool: known only once its data are hashed)."""
    from tanbr_ray.moe.config import default_models_dir

    if spec not in PRESETS:
        return None
    return (Path(models_dir or default_models_dir()) / preset_config(spec).cache_dirname() / "config.json").exists()


def cache_names(spec: str, data_dir=None) -> list[str]:
    """The cache folders that hold the model a `model:` value names, in order of preference: what a
    process that must not build it (a merger, a Tune trial) loads or fetches (`publish.load_model`).
    A pool's name is content-keyed, so its checkpoints and data are hashed here."""
    check_spec(spec)
    if spec in PRESETS:
        return preset_config(spec).cache_names()
    from tanbr_ray.moe.pool_store import pool_cache_name

    return [pool_cache_name(spec, data_dir)]


def merge_settings(spec: str) -> dict:
    """How the model a `model:` value names merges (its operator and RegMean's α): settings of the YAML or
    preset, applied at merge time and so not part of the cache key ({} for a model known only by name:
    it merges as it was built)."""
    check_spec(spec)
    if spec in PRESETS:
        return merge_settings_of(preset_config(spec))
    from tanbr_ray.moe.pool_config import load_pool_config

    return merge_settings_of(load_pool_config(spec))


def merge_settings_of(obj) -> dict:
    """The merge settings a model config or a loaded model carries (α None where it has none)."""
    return {"merge_operator": obj.merge_operator, "regmean_alpha": getattr(obj, "regmean_alpha", None)}


def apply_merge_settings(moe, merge: dict | None) -> None:
    """Set a loaded model's operator and RegMean α from `merge_settings`-shaped values (None: leave)."""
    for key in ("merge_operator", "regmean_alpha"):
        if (merge or {}).get(key) is not None:
            setattr(moe, key, merge[key])


def load_dir(directory, device: str | None = None) -> BuiltMoE:
    """A cached model of either kind (built-in or pool), checksums verified; never builds."""
    from tanbr_ray.moe.build import load_cached
    from tanbr_ray.moe.config import MoEConfig, resolve_device
    from tanbr_ray.moe.pool_store import FORMAT as POOL_FORMAT
    from tanbr_ray.moe.pool_store import load_pool
    from tanbr_ray.moe.store import FORMAT, read_meta

    d = Path(directory)
    meta = read_meta(d, (FORMAT, POOL_FORMAT))
    if meta["format"] == POOL_FORMAT:
        moe, meta = load_pool(d, resolve_device(device or meta.get("pool_config", {}).get("device", "auto")))
        return BuiltMoE(moe, d, meta.get("build", {}))
    try:
        cfg = MoEConfig(**meta["moe_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{d}/config.json: invalid model config ({e})") from e
    moe, meta = load_cached(cfg.model_copy(update={"device": device}) if device else cfg, d)
    return BuiltMoE(moe, d, meta.get("build", {}))


def open_model(spec: str, models_dir=None, progress: bool = True, data_dir=None, rebuild: bool = False,
               isolate: bool = False) -> BuiltMoE:
    """The model a `model:` value names: reused from the cache (checksums verified) or built."""
    check_spec(spec)
    if spec in PRESETS:
        from tanbr_ray.moe.build import load_or_build_info

        return load_or_build_info(preset_config(spec), models_dir, progress=progress, data_dir=data_dir,
                                  rebuild=rebuild, isolate=isolate)
    from tanbr_ray.moe.pool_store import load_or_build_pool

    return load_or_build_pool(spec, models_dir, progress=progress, data_dir=data_dir, rebuild=rebuild)
