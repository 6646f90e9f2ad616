"""Run a sweep with `ray.tune.Tuner` and write its results: trials.csv, best_config.yaml, PNGs, W&B.

Results directory layout:
  trials.csv        one row per trial: parameters, seed, last metric, slots run, final Tanbr summary
  settings.csv      one row per setting: mean and 95 % interval over seeds, overlap with the best
  sweep.json        all of the above with the models the trials ran on and the run's provenance
  best_config.yaml  the best completed trial as a simulation YAML for `tanbr simulate --config`
  metric_vs_<param>.png, learning_curves.png
  wandb/            offline W&B runs (one per trial, plus a summary run with the trial table)
  <name>/           Ray's own experiment directory (when `storage` is not set)
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tanbr_ray.sim.config import SimConfig, apply_overrides
from tanbr_ray.stats import t_interval
from tanbr_ray.tune.config import TuneSpec, override
from tanbr_ray.tune.trainable import FINAL_FIELDS, run_trial

IDENTITY_FIELDS = ("model_key", "model_sha256", "fingerprint")  # what each trial measured (results.json's)
PLOT_NAMES = {"tanbr.tree.rho": "rho", "slot_seconds": "slot_length"}


@dataclass
class SweepResult:
    rows: list[dict]
    best: dict | None
    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    wall_seconds: float = 0.0
    wandb_runs: int = 0
    settings: list[dict] = field(default_factory=list)  # settings_summary: mean and interval over seeds


def _moe_raw(spec: TuneSpec) -> dict | None:
    if spec.moe_config is None:
        return None
    from tanbr_ray.moe.config import load_config as load_moe_config

    return load_moe_config(spec.moe_config).model_dump(mode="json")


def _absolute_paths(raw: dict, config_dir: Path) -> dict:
    """Workers (and the best config) must not depend on the driver's working directory."""
    out = dict(raw)
    if str(out.get("model", "")).endswith((".yaml", ".yml")):  # a pool YAML, read by every trial
        out["model"] = str((config_dir / Path(out["model"]).expanduser()).resolve())
    for key in ("models_dir", "data_dir", "fleet"):
        if out.get(key):
            p = Path(out[key]).expanduser()
            out[key] = str(p if p.is_absolute() else (config_dir / p).resolve())
    return out


def _init_ray(spec: TuneSpec) -> bool:
    """Start (local) or join (address) Ray unless the caller already did; True if we must shut it down."""
    import ray

    if ray.is_initialized():
        return False
    if spec.address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster: no token needed
    ray.init(address=spec.address, num_cpus=spec.num_cpus if spec.address is None else None,
             include_dashboard=False, log_to_driver=False)
    return True


def _callbacks(spec: TuneSpec, mode: str, out_dir: Path) -> list:
    if mode == "disabled":
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
    return [WandbLoggerCallback(project=spec.wandb.project, group=spec.name, mode=mode, dir=str(out_dir),
                                job_type="tune-trial")]


def run_sweep(spec: TuneSpec, sim_raw: dict, config_dir: Path = Path("."), out: str | Path | None = None,
              wandb: str | None = None, verbose: int = 1) -> SweepResult:
    """Run every trial, then write the results files; Ray is shut down again if this call started it."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from tanbr_ray.tracking import wandb_mode

    mode = wandb_mode(wandb or spec.wandb.mode)  # exported before Ray starts: workers inherit WANDB_MODE
    out_dir = Path(out or spec.results_dir()).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    sim_raw = _absolute_paths(sim_raw, config_dir)
    if os.environ.get("TANBR_DATA_DIR"):  # trials run in their own directories: hand them an absolute path
        os.environ["TANBR_DATA_DIR"] = str(Path(os.environ["TANBR_DATA_DIR"]).resolve())
    slots = SimConfig(**sim_raw).slots
    space = {k: d.to_tune() for k, d in spec.search_space.items()}
    if spec.seeds:
        space["seed"] = tune.grid_search(list(spec.seeds))
    if spec.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=slots + 1,
                                  grace_period=min(spec.asha.grace_period, slots),
                                  reduction_factor=spec.asha.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    threads = max(1, int(spec.resources.cpu))
    base = SimConfig(**sim_raw)
    from tanbr_ray.moe.config import MoEConfig
    from tanbr_ray.moe.resolve import cache_names, merge_settings, merge_settings_of, open_model

    if spec.model_source is None:  # built once here, with progress; trials never build it
        from tanbr_ray.moe.build import load_or_build_info

        if spec.moe_config:
            built = load_or_build_info(MoEConfig(**_moe_raw(spec)), base.models_dir, progress=verbose > 0,
                                       data_dir=base.data_dir)
        else:
            built = open_model(base.model, base.models_dir, progress=verbose > 0, data_dir=base.data_dir)
        names = [built.cache_dir.name]
        merge = merge_settings_of(built.moe)
    else:
        if spec.moe_config:
            moe_cfg = MoEConfig(**_moe_raw(spec))
            names = moe_cfg.cache_names()
            merge = merge_settings_of(moe_cfg)
        else:
            names, merge = cache_names(base.model, base.data_dir), merge_settings(base.model)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=sim_raw, model_names=names, merge=merge, threads=threads,
                             model_source=spec.model_source),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})
    storage = spec.storage or str(out_dir)
    started = _init_ray(spec)
    t0 = time.perf_counter()
    try:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=spec.metric, mode=spec.mode, scheduler=scheduler, num_samples=spec.num_samples,
                max_concurrent_trials=spec.max_concurrent,
                search_alg=BasicVariantGenerator(random_state=spec.search_seed)),
            run_config=tune.RunConfig(name=spec.name, storage_path=storage, verbose=verbose,
                                      callbacks=_callbacks(spec, mode, out_dir)),
        )
        grid = tuner.fit()
        wall = time.perf_counter() - t0
        rows, curves = _collect(grid, spec)
    finally:
        if started:
            import ray

            ray.shutdown()
    best = _best(rows, spec)
    result = SweepResult(rows, best, out_dir, wall_seconds=wall, settings=settings_summary(rows, spec))
    result.files["trials"] = _write_csv(rows, spec, out_dir / "trials.csv")
    result.files["settings"] = _write_settings(result.settings, spec, out_dir / "settings.csv")
    result.files["summary"] = _write_summary(result, spec, sim_raw, out_dir / "sweep.json")
    if best is not None:
        result.files["best_config"] = _write_best(best, spec, sim_raw, out_dir / "best_config.yaml")
    result.files.update(_plots(rows, curves, spec, out_dir, result.settings))
    if mode != "disabled":
        result.wandb_runs = len(rows) + _log_summary(result, spec, mode)
    return result


def _collect(grid, spec: TuneSpec) -> tuple[list[dict], dict[str, list[tuple[int, float]]]]:
    """Per trial: parameters, status and last metrics; plus (slot, metric) learning curves."""
    rows, curves = [], {}
    for i, r in enumerate(grid):
        m = r.metrics or {}
        config = r.config or {}  # None for a trial that never started (sweep interrupted)
        trial_id = m.get("trial_id", f"trial_{i}")
        params = {k: config.get(k) for k in spec.search_space}
        row = {"trial_id": trial_id, **params, "seed": m.get("seed", config.get("seed")),
               "slots_run": m.get("slot", 0), spec.metric: m.get(spec.metric),
               "completed": bool(m.get("completed")), "error": str(r.error).splitlines()[0] if r.error else ""}
        row.update({f"final/{k}": m.get(f"final/{k}") for k in FINAL_FIELDS})
        row.update({k: m.get(k) for k in IDENTITY_FIELDS})
        rows.append(row)
        df = r.metrics_dataframe
        if df is not None and "slot" in df and spec.metric in df:
            pts = df[["slot", spec.metric]].dropna().drop_duplicates("slot")
            curves[trial_id] = [(int(s), float(v)) for s, v in pts.itertuples(index=False)]
    return rows, curves


def _value(row: dict, spec: TuneSpec) -> float:
    v = row.get(spec.metric)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return -math.inf
    return float(v) if spec.mode == "max" else -float(v)


def _pool(rows: list[dict], spec: TuneSpec) -> list[dict]:
    """Completed trials (a trial stopped early has seen fewer slots: not comparable); else all that reported."""
    return [r for r in rows if r["completed"]] or [r for r in rows if r.get(spec.metric) is not None]


def settings_summary(rows: list[dict], spec: TuneSpec) -> list[dict]:
    """Per setting of the search space: the metric's mean over its seeds with a 95 % Student-t
    interval, best first. `overlaps_best` marks the settings whose interval overlaps the best one's:
    these seeds cannot tell them apart (None while an interval needs a second seed)."""
    groups: dict[tuple, list[dict]] = {}
    for r in _pool(rows, spec):
        if math.isfinite(_value(r, spec)):
            groups.setdefault(tuple(repr(r[k]) for k in spec.search_space), []).append(r)
    out = []
    for members in groups.values():
        mean, ci = t_interval([float(r[spec.metric]) for r in members])
        out.append({**{k: members[0][k] for k in spec.search_space}, "seeds": len(members), "mean": mean,
                    "ci95": list(ci) if ci else None, "trials": [r["trial_id"] for r in members],
                    "by_seed": {r.get("seed"): float(r[spec.metric]) for r in members}})
    out.sort(key=lambda st: -st["mean"] if spec.mode == "max" else st["mean"])
    for st in out:
        a, b = st["ci95"], out[0]["ci95"]
        st["overlaps_best"] = None if a is None or b is None else bool(a[1] >= b[0] and a[0] <= b[1])
        st["vs_best_paired"] = None if st is out[0] else _paired(st["by_seed"], out[0]["by_seed"])
    return out


def _paired(mine: dict, best: dict) -> dict | None:
    """This setting minus the best on the seeds both ran (the same workloads): mean and 95 % interval.
    Seed-to-seed spread cancels, so this separates settings that the unpaired intervals cannot."""
    seeds = [s for s in mine if s is not None and s in best]
    if len(seeds) < 2:
        return None
    mean, ci = t_interval([mine[s] - best[s] for s in seeds])
    return {"mean": mean, "ci95": list(ci) if ci else None, "seeds": len(seeds)}


def _best(rows: list[dict], spec: TuneSpec) -> dict | None:
    """The best trial; with `seeds`, the setting with the best mean over seeds (the best single
    (point, seed) pair would mostly reward a lucky workload), carrying that mean and no seed."""
    pool = _pool(rows, spec)
    if not pool:
        return None
    if not spec.seeds:
        return max(pool, key=lambda r: _value(r, spec))
    top = settings_summary(rows, spec)[0]
    best = dict(next(r for r in pool if r["trial_id"] in top["trials"]))
    best[spec.metric] = top["mean"]
    best["seed"], best["replicates"] = None, top["seeds"]
    return best


def ranked(rows: list[dict], spec: TuneSpec) -> list[dict]:
    """Completed trials first, each group best first."""
    return sorted(rows, key=lambda r: (not r["completed"], -_value(r, spec)))


def _write_csv(rows: list[dict], spec: TuneSpec, path: Path) -> Path:
    header = list(rows[0]) if rows else ["trial_id", *spec.search_space, spec.metric]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        for r in ranked(rows, spec):
            w.writerow(r)
    return path


def _write_settings(settings: list[dict], spec: TuneSpec, path: Path) -> Path:
    """settings.csv: one row per setting, best first, with its mean and 95 % interval over seeds."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*spec.search_space, "seeds", f"{spec.metric}_mean", "ci95_low", "ci95_high", "overlaps_best",
                    "vs_best_paired_mean", "vs_best_paired_ci95_low", "vs_best_paired_ci95_high"])
        for st in settings:
            ci = st["ci95"] or [None, None]
            p = st["vs_best_paired"] or {}
            w.writerow([*(st[k] for k in spec.search_space), st["seeds"], st["mean"], *ci, st["overlaps_best"],
                        p.get("mean"), *(p.get("ci95") or [None, None])])
    return path


def _write_summary(result: SweepResult, spec: TuneSpec, sim_raw: dict, path: Path) -> Path:
    """sweep.json: the sweep, its base simulation, every setting's interval and every trial, with the
    models the trials ran on and the provenance of this run (what `tanbr report` and plots read)."""
    from tanbr_ray.fileio import atomic_write_bytes
    from tanbr_ray.provenance import provenance

    models = sorted({(r.get("model_key"), r.get("model_sha256")) for r in result.rows if r.get("model_sha256")})
    obj = {"sweep": spec.model_dump(mode="json"), "base": sim_raw, "metric": spec.metric, "mode": spec.mode,
           "settings": result.settings, "best": result.best, "trials": result.rows,
           "models": [{"key": k, "weights_sha256": h} for k, h in models],
           "model": {"key": models[0][0], "weights_sha256": models[0][1]} if len(models) == 1 else None,
           "provenance": provenance(result.wall_seconds)}
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=_json_default).encode())
    return path


def _json_default(v):
    return v.item() if hasattr(v, "item") else str(v)


def _write_best(best: dict, spec: TuneSpec, sim_raw: dict, path: Path) -> Path:
    """The base simulation config + the best parameters; every policy, so `tanbr simulate` compares."""
    params = {k: best[k] for k in spec.search_space}
    if best.get("seed") is not None:
        params["seed"] = best["seed"]
    raw = apply_overrides(sim_raw, [override(k, v) for k, v in params.items()])
    raw["name"] = f"{spec.name}-best"
    raw["out"] = f"results/simulate-{spec.name}-best"
    SimConfig(**raw)  # the file must load back: fail here rather than hand out a broken config
    over = f", mean of {best['replicates']} seeds" if best.get("replicates") else ""
    head = (f"# Best trial of tune sweep '{spec.name}' ({spec.metric}={best[spec.metric]:.4f}{over}, {spec.mode}).\n"
            f"# Parameters: {', '.join(f'{k}={v}' for k, v in params.items())}\n")
    if spec.moe_config:
        head += f"# The sweep used the MoE built from {spec.moe_config} (not a `model` preset).\n"
    path.write_text(head + yaml.safe_dump(raw, sort_keys=False))
    return path


def _plots(rows: list[dict], curves: dict, spec: TuneSpec, out_dir: Path,
           settings: list[dict] | None = None) -> dict[str, Path]:
    """metric vs each numeric swept parameter (rho, slot length, ...) and the top trials' curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}
    for key in spec.search_space:
        name = PLOT_NAMES.get(key, key.replace(".", "_"))
        fig = _param_plot(rows, spec, key, settings if len(spec.search_space) == 1 else None)
        if fig is None:
            continue
        files[f"metric_vs_{name}"] = out_dir / f"metric_vs_{name}.png"
        fig.savefig(files[f"metric_vs_{name}"], dpi=110)
        plt.close(fig)
    top = [r for r in ranked(rows, spec) if r["trial_id"] in curves][:5]
    if top:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in top:
            s, v = zip(*curves[r["trial_id"]])
            label = ", ".join(f"{k.split('.')[-1]}={_fmt(r[k])}" for k in spec.search_space)
            ax.plot(s, v, marker=".", label=label)
        ax.set_xlabel("slot")
        ax.set_ylabel(spec.metric)
        ax.set_title(f"{spec.name}: learning curves, top {len(top)} trials")
        ax.legend(fontsize=7)
        fig.tight_layout()
        files["learning_curves"] = out_dir / "learning_curves.png"
        fig.savefig(files["learning_curves"], dpi=110)
        plt.close(fig)
    return files


def _param_plot(rows: list[dict], spec: TuneSpec, key: str, settings: list[dict] | None):
    """Every trial's metric against one parameter; with seeds, each seed's trials joined by a line (the
    settings are compared on the same workloads) and each setting's mean with its 95 % interval."""
    import matplotlib.pyplot as plt

    pts = [(r[key], r[spec.metric], r["completed"], r.get("seed")) for r in rows
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
           and r.get(spec.metric) is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for seed in sorted({p[3] for p in pts if p[3] is not None}):
        line = sorted((p[0], p[1]) for p in pts if p[3] == seed)
        ax.plot(*zip(*line), color="0.8", lw=0.8, zorder=1)
    for done, label, marker in ((True, "trial (completed)", "o"), (False, "stopped early by ASHA (fewer slots)", "x")):
        xs = [p[0] for p in pts if p[2] == done]
        if xs:
            ax.scatter(xs, [p[1] for p in pts if p[2] == done], marker=marker, s=18, label=label, zorder=2)
    ci = [st for st in settings or [] if st.get("ci95")]
    if ci:
        xs, means = [st[key] for st in ci], [st["mean"] for st in ci]
        err = [[m - st["ci95"][0] for m, st in zip(means, ci)], [st["ci95"][1] - m for m, st in zip(means, ci)]]
        ax.errorbar(xs, means, yerr=err, fmt="D", color="black", capsize=4, label="mean, 95 % interval", zorder=3)
    if spec.search_space[key].kind == "loguniform":
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.set_ylabel(spec.metric)
    ax.set_title(f"{spec.name}: {spec.metric} vs {key}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _log_summary(result: SweepResult, spec: TuneSpec, mode: str) -> int:
    """One extra W&B run holding the trial table, the best parameters and the plots (dashboards)."""
    import wandb

    rows = ranked(result.rows, spec)
    if not rows:
        return 0
    cols = list(rows[0])
    table = wandb.Table(columns=cols, data=[[_cell(r[c]) for c in cols] for r in rows])
    settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False,
                              x_save_requirements=False, x_disable_stats=True, x_disable_machine_info=True)
    with wandb.init(project=spec.wandb.project, group=spec.name, name=f"{spec.name}-summary",
                    job_type="tune-summary", dir=str(result.out_dir), mode=mode, reinit="create_new",
                    settings=settings, config={"search_space": {k: d.model_dump(exclude_none=True)
                                                                for k, d in spec.search_space.items()},
                                               "metric": spec.metric, "mode": spec.mode}) as run:
        log = {"trials": table}
        log.update({f"plots/{k}": wandb.Image(str(p)) for k, p in result.files.items() if p.suffix == ".png"})
        run.log(log)
        if result.best is not None:
            run.summary.update({f"best/{k}": _cell(v) for k, v in result.best.items()})
        run.summary["wall_seconds"] = result.wall_seconds
    wandb.teardown()
    return 1


def _cell(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)
