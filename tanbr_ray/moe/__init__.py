"""Task-expert MoE: build one from a pretrained transformer, merge its experts, serve it.

Public entry points (the simulator builds on these):

- :class:`MoEConfig`, :func:`default_config`, :func:`quick_config` — typed build settings.
- :func:`load_or_build` — reuse a valid cached MoE or build (and cache) a new one.
- :class:`TaskMoE` — inference modes (dense, oracle, top-k, merged by x, static merges).
- :func:`validate_x` — the feasibility check every merging weight vector goes through.
- :mod:`tanbr_ray.moe.metrics` — GLUE scores; :mod:`tanbr_ray.moe.adapters` — Hugging Face MoEs.
"""

from tanbr_ray.moe.config import MoEConfig, default_config, quick_config
from tanbr_ray.moe.merge import validate_x
from tanbr_ray.moe.model import TaskMoE
from tanbr_ray.moe.build import build_moe, load_or_build
from tanbr_ray.moe.infer import EvalCache, measure_latency

__all__ = [
    "MoEConfig",
    "default_config",
    "quick_config",
    "validate_x",
    "TaskMoE",
    "build_moe",
    "load_or_build",
    "EvalCache",
    "measure_latency",
]
