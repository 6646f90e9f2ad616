"""W&B logging: offline by default, online only when the user has a key.

`wandb_mode` is the single place that decides the mode and exports it as WANDB_MODE, because Ray
Tune's WandbLoggerCallback reads only that environment variable. `log_simulation` turns one
simulation into one W&B run per policy, grouped by simulation, so dashboards compare policies.
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


def log_simulation(
    out: SimOutput,
    out_dir: str | os.PathLike,
    project: str = "tanbr-ray",
    group: str | None = None,
    mode: str | None = None,
    seed: int | None = None,
) -> list[str]:
    """Log one W&B run per policy under `out_dir/wandb` (named `<policy>-seed<seed>` when `seed` is
    given: one run per policy and seed of a multi-seed job); returns each run's local directory.

    Offline run directories can be uploaded later with `wandb sync DIR`. Mode 'disabled' returns []
    without importing or starting wandb at all.
    """
    mode = wandb_mode(mode)
    if mode == "disabled":
        return []
    import wandb

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    group = group or str(out.config.get("name") or out.config.get("scenario") or "simulation")
    plots = {
        f"plots/{p[:-4]}": out_dir / p
        for p in ("regret.png", "score.png", "choices.png", "latency_memory.png")
        if (out_dir / p).is_file()
    }
    settings = wandb.Settings(
        silent=True,
        console="off",
        disable_git=True,
        save_code=False,
        x_save_requirements=False,
        x_disable_stats=True,
        x_disable_machine_info=True,
    )
    run_dirs: list[str] = []
    for name, series in out.series.items():
        policy_summary = out.summary.get("policies", {}).get(name, {})
        with wandb.init(
            project=project,
            name=name if seed is None else f"{name}-seed{seed}",
            group=group,
            job_type="simulate",
            config={**out.config, "policy": name},
            dir=str(out_dir),
            mode=mode,
            reinit="create_new",
            settings=settings,
        ) as run:
            score = np.asarray(series.score, dtype=float)
            cum_bf = np.cumsum(np.asarray(series.regret_best_fixed, dtype=float))
            cum_or = np.cumsum(np.asarray(series.regret_oracle, dtype=float))
            pushed = np.asarray(series.pushed_bytes, dtype=float)
            mean_x = None
            if series.choices is not None:
                mean_x = np.asarray(series.choices, dtype=float).mean(axis=1)  # (slots, K) fleet mean
                k = mean_x.shape[1]
                labels = list(out.experts) if len(out.experts) == k else [str(i) for i in range(k)]
                x_keys = [f"x/{_key(e)}" for e in labels]
            last, final_row = max(series.slots - 1, 0), {}
            for t in range(series.slots):
                row = {
                    "score": float(score[t]),
                    "regret/best_fixed_cum": float(cum_bf[t]),
                    "regret/oracle_cum": float(cum_or[t]),
                    "pushed_bytes": float(pushed[t]),
                }
                if mean_x is not None:
                    row.update({kk: float(v) for kk, v in zip(x_keys, mean_x[t])})
                if t < last:
                    run.log(row, step=t)
                else:
                    final_row = row  # the table and plots join the last slot's row
            final_row["policies"] = _policy_table(wandb, out.summary)
            final_row.update({k: wandb.Image(str(p)) for k, p in plots.items()})
            run.log(final_row, step=last)
            run.summary.update(_run_summary(policy_summary))
            run_dirs.append(str(run.settings.sync_dir))
    # run.finish() returns before wandb-core has flushed the run's .wandb log to disk; teardown waits
    # for it, but it would also finish (and break) a run the caller still has open.
    if not _other_runs_open(wandb):
        wandb.teardown()
    return run_dirs


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
