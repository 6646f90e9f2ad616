"""One Tune trial = one simulation of the Tanbr policy with the trial's settings.

Runs in a Ray worker, so everything it needs travels in its arguments (the resolved base simulation
config, the model's cache folder names, where the model is published) — nothing is read from the driver's
memory or disk. The MoE comes from the worker machine's cache, else it is fetched from `model_source`
and verified (`moe.publish.load_model`); a trial never builds it (the sweep's driver builds it once).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from tanbr_ray.sim.config import SimConfig, apply_overrides

POLICY = "Tanbr"
# Fields of the final Tanbr summary reported (prefixed `final/`) with the trial's last result.
FINAL_FIELDS = ("credit_second_half", "credit", "score", "score_second_half", "regret_vs_best_fixed", "regret_vs_oracle", "regret_slope",
                "latency_ms_p50", "latency_ms_p95", "pushed_bytes", "push_seconds")

_MOE_CACHE: dict[str, Any] = {}  # per worker process: trials that reuse a worker skip even the load


def trial_sim_config(base: dict, params: dict, threads: int | None) -> SimConfig:
    """The simulation a trial runs: base config + the trial's parameters, Tanbr only, no nested W&B."""
    overrides = [f"{k}={json.dumps(v)}" for k, v in params.items()]
    overrides += [f"policies={json.dumps([POLICY])}", "wandb=disabled"]
    raw = apply_overrides(base, overrides)
    if raw.get("threads") is None and threads:
        raw["threads"] = threads  # one trial per CPU slot: don't let torch oversubscribe the node
    return SimConfig(**raw)


def _load_moe(cfg: SimConfig, names: list[str], merge: dict, model_source: str | None):
    """The model by its cache names, merging as the sweep's driver has it (operator and α: not in the key)."""
    from tanbr_ray.moe.publish import load_model
    from tanbr_ray.moe.resolve import apply_merge_settings

    key = f"{cfg.models_dir}|{names[0]}"
    if key not in _MOE_CACHE:
        _MOE_CACHE.clear()
        _MOE_CACHE[key] = load_model(names, cfg.models_dir, model_source)[0]
    apply_merge_settings(_MOE_CACHE[key], merge)
    return _MOE_CACHE[key]


def _number(v) -> float | None:
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, float, np.number)):
        return float(v)
    return None


def run_trial(config: dict, base: dict, model_names: list[str], merge: dict, threads: int | None = None,
              model_source: str | None = None) -> None:
    """Tune function trainable: report after every slot, then once more with the final summary."""
    from ray import tune

    cfg = trial_sim_config(base, config, threads)
    moe = _load_moe(cfg, model_names, merge, model_source)
    last: dict = {}

    def on_slot(policy: str, t: int, slot_score: float, running_score: float) -> None:
        if policy != POLICY:
            return
        last.clear()
        last.update(slot=t + 1, slot_score=slot_score, running_score=running_score, seed=cfg.seed)
        tune.report(dict(last))

    from tanbr_ray.sim.loop import run_simulation

    out = run_simulation(cfg, moe, progress=False, on_slot=on_slot)
    summary = out.summary["policies"][POLICY]
    final = {f"final/{k}": _number(summary.get(k)) for k in FINAL_FIELDS}
    identity = {"model_key": out.summary["model"]["key"], "model_sha256": out.summary["model"]["weights_sha256"],
                "fingerprint": out.summary["fingerprint"]}
    tune.report({**last, **{k: v for k, v in final.items() if v is not None}, **identity, "completed": 1})
