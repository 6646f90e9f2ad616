"""Task-expert MoE: build one from a pretrained transformer, merge its experts, serve it.

Public entry points (the simulator builds on these):

- :class:`MoEConfig`, :func:`default_config`, :func:`quick_config` — typed build settings.
- :func:`load_or_build` — reuse a valid cached MoE or build (and cache) a new one.
- :class:`TaskMoE` — inference modes (dense, oracle, top-k, merged by x, static merges).
- :func:`validate_x` — the feasibility check every merging weight vector goes through.
- :mod:`tanbr_ray.moe.metrics` — GLUE scores.
- :mod:`tanbr_ray.moe.interface` — what every model implements; :mod:`tanbr_ray.moe.resolve` — `model:`
  values (default, quick, a pool or native YAML) to models; :mod:`tanbr_ray.moe.pool_build` — pools of
  fine-tunes and native MoE checkpoints.
"""

from importlib import import_module

# Resolved on first use (PEP 562): an edge replica imports only the modules it serves with, not the
# build stack (datasets, training), which keeps replica start-up short.
_EXPORTS = {
    "MoEConfig": "config", "default_config": "config", "quick_config": "config", "validate_x": "merge",
    "TaskMoE": "model", "build_moe": "build", "load_or_build": "build", "EvalCache": "infer",
    "measure_latency": "infer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tanbr_ray.moe' has no attribute {name!r}")
    return getattr(import_module(f"tanbr_ray.moe.{_EXPORTS[name]}"), name)
