"""The one place a `model:` value becomes a model: `default` / `quick` (the built-in MoE presets,
built from MiniLM on first use) or a YAML naming a pool of fine-tunes (`pool_config.py`). Every
command resolves its model here and then sees only the interface of `moe/interface.py`."""

from __future__ import annotations

from pathlib import Path

from tanbr_ray.moe.build import BuiltMoE
from tanbr_ray.moe.pool_config import is_pool_spec

PRESETS = ("default", "quick")


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
