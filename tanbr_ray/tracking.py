"""W&B logging: offline by default, online only when the user has a key.

`wandb_mode` is the single place that decides the mode and exports it as WANDB_MODE, because Ray
Tune's WandbLoggerCallback reads only that environment variable. `SimulationTracker` logs one
simulation as one W&B run per policy, grouped by simulation, live per slot, so dashboards compare
policies while they run.
"""

from __future__ import annotations

import netrc
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from tanbr_ray.sim.output import SimOutput
from tanbr_ray.sim.report import SCALAR_FIELDS

MODES = ("disabled", "offline", "online")
_ALIASES = {"dryrun": "offline", "run": "online"}  # legacy spellings wandb still accepts
DEFAULT_HOST = "https://api.wandb.ai"


def _normalise(mode: str, source: str) -> str:
    m = mode.strip().lower()
    m = _ALIASES.get(m, m)
    if m not in MODES:
        raise ValueError(f"{source}: unknown W&B mode {mode!r}; expected one of {', '.join(MODES)}")
    return m


def _netrc_path() -> Path:
    # Same lookup order as wandb's own netrc reader: $NETRC, ~/.netrc, ~/_netrc.
    if env := os.environ.get("NETRC"):
        return Path(env).expanduser()
    unix = Path("~/.netrc").expanduser()
    windows = Path("~/_netrc").expanduser()
    return windows if not unix.exists() and windows.exists() else unix


def has_api_key() -> bool:
    """True when wandb could log in without prompting: WANDB_API_KEY or a netrc entry for the host."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc or "api.wandb.ai"
    try:
        creds = netrc.netrc(str(_netrc_path())).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(creds and creds[2])


def wandb_mode(requested: str | None = None) -> str:
    """Resolve the W&B mode (explicit > $WANDB_MODE > online if a key exists > offline) and export it."""
    if requested:
        mode = _normalise(requested, "requested mode")
    elif os.environ.get("WANDB_MODE", "").strip():
        mode = _normalise(os.environ["WANDB_MODE"], "WANDB_MODE")
    else:
        mode = "online" if has_api_key() else "offline"
    os.environ["WANDB_MODE"] = mode
    return mode


def _key(label: str) -> str:
    """W&B metric keys: '/' would nest panels and spaces read badly, so keep them simple."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(label)).strip("_") or "x"


def _policy_table(wandb, summary: dict):
    fields = SCALAR_FIELDS
    rows = []
    for name, p in summary.get("policies", {}).items():
        row = [name]
        for f in fields:
            v = p.get(f)
            row.append(float(v) if isinstance(v, (int, float, np.number)) else None)
        rows.append(row)
    return wandb.Table(columns=["policy", *fields], data=rows)


def _run_summary(policy: dict) -> dict:
    flat = {}
    for k, v in policy.items():
        if isinstance(v, dict):
            for sub, sv in v.items():
                if isinstance(sv, (int, float, np.number)):
                    flat[f"{k}/{_key(sub)}"] = float(sv)
        elif isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
            flat[k] = v.item() if isinstance(v, np.generic) else v
    return flat


class SimulationTracker:
    """W&B as CleanRL's `--track`: one run per policy, opened when the policy starts and logged every
    slot while the simulation runs (`on_slot`); once the run is summarised, `finish` adds its
    per-slot traces, the policy table and the plots, and closes the runs. Runs are named
    `<policy>-seed<seed>` when `seed` is given (one run per policy and seed of a multi-seed job) and
    live under `out_dir/wandb` (offline ones upload later with `wandb sync DIR`). Mode 'disabled'
    does nothing and never imports wandb."""

    def __init__(self, config: dict, out_dir: str | os.PathLike, project: str = "tanbr-ray",
                 group: str | None = None, mode: str | None = None, seed: int | None = None):
        self.mode = wandb_mode(mode)
        self.config, self.out_dir, self.project, self.seed = config, Path(out_dir), project, seed
        self.group = group or str(config.get("name") or "simulation")
        self.runs: dict = {}

    def _run(self, policy: str):
        if policy not in self.runs:
            import wandb

            self.out_dir.mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=self.project, name=policy if self.seed is None else f"{policy}-seed{self.seed}",
                             group=self.group, job_type="simulate", config={**self.config, "policy": policy},
                             dir=str(self.out_dir), mode=self.mode, reinit="create_new", settings=_settings(wandb))
            run.define_metric("slot")
            run.define_metric("*", step_metric="slot")  # live rows and the traces added at the end share one axis
            self.runs[policy] = run
        return self.runs[policy]

    def on_slot(self, policy: str, t: int, slot_score: float, running_score: float) -> None:
        if self.mode != "disabled":
            self._run(policy).log({"slot": t, "live/score": slot_score, "live/running_score": running_score})

    def finish(self, out: SimOutput) -> list[str]:
        """Add every policy's traces and results to its run, close the runs; their local directories."""
        if self.mode == "disabled":
            return []
        import wandb

        plots = {f"plots/{p[:-4]}": self.out_dir / p for p in ("regret.png", "score.png", "choices.png",
                                                               "latency_memory.png") if (self.out_dir / p).is_file()}
        run_dirs = []
        for name, series in out.series.items():
            run = self._run(name)
            rows = _trace_rows(series, out.experts)
            rows[-1]["policies"] = _policy_table(wandb, out.summary)  # the table and plots join the last slot's row
            rows[-1].update({k: wandb.Image(str(p)) for k, p in plots.items()})
            for row in rows:
                run.log(row)
            run.summary.update(_run_summary(out.summary.get("policies", {}).get(name, {})))
            run.finish()
            run_dirs.append(str(run.settings.sync_dir))
        self.runs.clear()
        # run.finish() returns before wandb-core has flushed the run's .wandb log to disk; teardown waits
        # for it, but it would also finish (and break) a run the caller still has open.
        if not _other_runs_open(wandb):
            wandb.teardown()
        return run_dirs


def _settings(wandb):
    return wandb.Settings(silent=True, console="off", disable_git=True, save_code=False, x_save_requirements=False,
                          x_disable_stats=True, x_disable_machine_info=True)


def _trace_rows(series, experts: list[str]) -> list[dict]:
    """One row per slot: score, cumulative regrets, pushed bytes and the fleet's mean x per expert."""
    cum_bf = np.cumsum(np.asarray(series.regret_best_fixed, dtype=float))
    cum_or = np.cumsum(np.asarray(series.regret_oracle, dtype=float))
    rows = [{"slot": t, "score": float(series.score[t]), "regret/best_fixed_cum": float(cum_bf[t]),
             "regret/oracle_cum": float(cum_or[t]), "pushed_bytes": float(series.pushed_bytes[t])}
            for t in range(series.slots)]
    if series.choices is not None:
        mean_x = np.asarray(series.choices, dtype=float).mean(axis=1)  # (slots, K) fleet mean
        labels = list(experts) if len(experts) == mean_x.shape[1] else [str(i) for i in range(mean_x.shape[1])]
        for row, xs in zip(rows, mean_x):
            row.update({f"x/{_key(e)}": float(v) for e, v in zip(labels, xs)})
    return rows or [{"slot": 0}]


def log_simulation(out: SimOutput, out_dir: str | os.PathLike, project: str = "tanbr-ray", group: str | None = None,
                   mode: str | None = None, seed: int | None = None) -> list[str]:
    """A finished simulation's runs, one per policy (`SimulationTracker` without the live slots)."""
    return SimulationTracker(out.config, out_dir, project, group, mode, seed).finish(out)


def _other_runs_open(wandb) -> bool:
    """Any run still active in this process (with reinit='create_new', wandb.run does not show it)."""
    if wandb.run is not None:
        return True
    from wandb.sdk import wandb_setup

    singleton = getattr(wandb_setup, "_singleton", None)
    if singleton is None:
        return False
    if not hasattr(singleton, "most_recent_active_run"):
        return True  # unknown wandb internals: skip the teardown rather than break a caller's run
    return singleton.most_recent_active_run is not None  # a property in wandb 0.31
