"""Results directory of a simulation: JSON, CSV, PNG plots and a markdown summary.

Every file goes through `tanbr_ray.fileio.atomic_write_*` so an interrupted run never leaves a
half-written results file next to good ones. Plots use the Agg backend: the simulator runs on
headless machines and must not need a display.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
from pathlib import Path

import numpy as np
import yaml

from tanbr_ray.fileio import atomic_write_bytes, atomic_write_json
from tanbr_ray.router import registry
from tanbr_ray.sim.output import PolicySeries, SimOutput

MB = 1e6  # decimal megabytes in every table and plot

#: Scalar per-policy fields in the order they appear in policies.csv (extra scalars follow).
SCALAR_FIELDS = (
    "credit_second_half",
    "credit",
    "score",
    "score_second_half",
    "latency_ms_p50",
    "latency_ms_p95",
    "resident_bytes",
    "pushed_bytes",
    "regret_vs_best_fixed",
    "regret_vs_oracle",
    "regret_slope",
)

PLOTS = ("regret.png", "score.png", "choices.png", "latency_memory.png")


def to_jsonable(obj):
    """Plain-JSON copy: numpy scalars/arrays to Python, NaN/inf to None (strict JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _num(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(value, scale: float = 1.0, digits: int = 1, suffix: str = "") -> str:
    v = _num(value)
    return "–" if v is None else f"{v * scale:.{digits}f}{suffix}"


def format_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Header and one row of strings per policy, for the CLI and summary.md (percent). The headline
    is the second-half per-request credit; with several seeds its mean ± sd over them comes next."""
    seeds = (summary.get("seeds") or {}).get("policies", {})
    multi = len((summary.get("seeds") or {}).get("list", [])) > 1
    header = ["Policy", "Credit 2nd half %"] + (["mean ± sd over seeds"] if multi else []) + [
        "Credit %", "GLUE 2nd half %", "p50 ms", "p95 ms", "Dropped", "Resident MB", "Pushed MB",
        "Regret best-fixed", "Regret oracle", "Slope"]
    rows = []
    for name, p in summary.get("policies", {}).items():
        sd = seeds.get(name, {})
        spread = [f"{100 * sd['credit_second_half_mean']:.1f} ± {100 * sd['credit_second_half_sd']:.1f}"] if multi and sd else (
            ["–"] if multi else [])
        rows.append(
            [str(name), _fmt(p.get("credit_second_half"), 100.0)] + spread + [
                _fmt(p.get("credit"), 100.0),
                _fmt(p.get("score_second_half"), 100.0),
                _fmt(p.get("latency_ms_p50"), digits=1),
                _fmt(p.get("latency_ms_p95"), digits=1),
                str(p.get("dropped_requests", "–")),
                _fmt(p.get("resident_bytes"), 1 / MB, 1),
                _fmt(p.get("pushed_bytes"), 1 / MB, 1),
                _fmt(p.get("regret_vs_best_fixed"), digits=2),
                _fmt(p.get("regret_vs_oracle"), digits=2),
                _fmt(p.get("regret_slope"), digits=2),
            ]
        )
    return header, rows


def provenance_line(summary: dict) -> str | None:
    """One line naming the model and data a run measured and the fingerprint comparable runs share."""
    if "fingerprint" not in summary:
        return None
    m, d = summary["model"], summary["data"]
    pool = hashlib.sha256("".join(d["pool_sha256"][t] + d["labels_sha256"][t] for t in sorted(d["pool_sha256"])).encode())
    n = sorted(set(d["examples"].values()))
    return (f"model {m['key']} (weights sha256 {m['weights_sha256'][:12]}…), pool of {'/'.join(map(str, n))} "
            f"{d['split']} examples a task from {d['source']} (examples+labels sha256 {pool.hexdigest()[:12]}…); "
            f"runs with fingerprint {summary['fingerprint']} measured the same model, data and config: comparable")


def format_paired(summary: dict) -> list[str]:
    """Tanbr − each baseline, second-half credit in points, with the 95 % interval."""
    paired = summary.get("paired") or {}
    if not paired:
        return []
    n = len((summary.get("seeds") or {}).get("list", [1]))
    lines = [f"Tanbr − baseline, 2nd-half credit in points (95 % bootstrap over node-slots, {n} seed(s)):"]
    for name, d in paired.items():
        lo, hi = d["ci95"]
        mark = "above 0" if lo > 0 else ("below 0" if hi < 0 else "spans 0")
        t = d.get("ci95_t_over_seeds")
        tt = f"; t over seeds [{100 * t[0]:+.1f}, {100 * t[1]:+.1f}]" if t else ""
        lines.append(f"  vs {name:12} {100 * d['diff_mean']:+.2f}  [{100 * lo:+.2f}, {100 * hi:+.2f}] {mark}{tt}")
    return lines


def latency_ratios(summary: dict, policy: str = "Tanbr") -> list[str]:
    """`policy`'s p50 latency over Switch top-2's and top-1's, fleet-wide and per node class. None
    for the Ray backend, whose router policies report measured wall time and Switch the model."""
    pols = summary.get("policies", {})
    if policy not in pols or "ray" in summary:
        return []
    lines = []
    for ref in registry.switch_baselines():
        if ref not in pols:
            continue
        mine, theirs = pols[policy], pols[ref]
        per = [f"{c} {mine['latency_ms_p50_by_class'][c] / v:.2f}"
               for c, v in theirs.get("latency_ms_p50_by_class", {}).items() if c in mine.get("latency_ms_p50_by_class", {})]
        lines.append(f"{policy} p50 latency / {ref}: fleet {mine['latency_ms_p50'] / theirs['latency_ms_p50']:.2f}"
                     + (f" ({', '.join(per)})" if per else ""))
    return lines


def _task_list(out: SimOutput) -> list[str]:
    tasks = list(out.tasks)
    for p in out.summary.get("policies", {}).values():
        for t in p.get("scores", {}) or {}:
            if t not in tasks:
                tasks.append(t)
    return tasks


def _csv_bytes(header: list[str], rows) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def _csv_cell(value):
    value = to_jsonable(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def _policies_csv(out: SimOutput) -> bytes:
    policies = out.summary.get("policies", {})
    extra = []
    for p in policies.values():
        for k, v in p.items():
            if k not in SCALAR_FIELDS and k != "scores" and k not in extra and not isinstance(v, (dict, list)):
                extra.append(k)
    tasks = _task_list(out)
    header = ["policy", *SCALAR_FIELDS, *extra, *(f"score_{t}" for t in tasks)]
    rows = []
    for name, p in policies.items():
        scores = p.get("scores", {}) or {}
        rows.append(
            [name]
            + [_csv_cell(p.get(k)) for k in (*SCALAR_FIELDS, *extra)]
            + [_csv_cell(scores.get(t)) for t in tasks]
        )
    return _csv_bytes(header, rows)


def _series_csv(out: SimOutput) -> bytes:
    header = ["policy", "slot", "score", "regret_best_fixed", "regret_oracle", "pushed_bytes"]
    rows = []
    for name, s in out.series.items():
        cols = [np.asarray(a) for a in (s.score, s.regret_best_fixed, s.regret_oracle, s.pushed_bytes)]
        for t in range(s.slots):
            rows.append([name, t, *(_csv_cell(c[t]) for c in cols)])
    return _csv_bytes(header, rows)


def _choices_csv(out: SimOutput) -> bytes:
    k = len(out.experts)
    for s in out.series.values():
        if s.choices is not None:
            k = int(np.asarray(s.choices).shape[-1])
            break
    header = ["policy", "slot", "node", *(f"x_{i}" for i in range(k))]
    rows = []
    for name, s in out.series.items():
        if s.choices is None:
            continue
        ch = np.asarray(s.choices, dtype=float)
        for t in range(ch.shape[0]):
            for n in range(ch.shape[1]):
                node = out.nodes[n] if n < len(out.nodes) else str(n)
                rows.append([name, t, node, *(f"{v:.6g}" for v in ch[t, n])])
    return _csv_bytes(header, rows)


# ----------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _moving_average(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` slots (shorter at the start, so no lag artefacts)."""
    x = np.asarray(x, dtype=float)
    if x.size == 0 or window <= 1:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _style(names) -> dict[str, dict]:
    """Distinct colours for up to 20 policies (the default cycle repeats after 10); Tanbr on top."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    return {
        n: {"color": cmap(i % cmap.N), "linewidth": 2.2 if n == "Tanbr" else 1.1, "zorder": 3 if n == "Tanbr" else 2}
        for i, n in enumerate(names)
    }


def _plot_regret(out: SimOutput, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    style = _style(list(out.series))
    for name, s in out.series.items():
        axes[0].plot(np.cumsum(np.asarray(s.regret_best_fixed, dtype=float)), label=name, **style[name])
        axes[1].plot(np.cumsum(np.asarray(s.regret_oracle, dtype=float)), label=name, **style[name])
    axes[0].set_title("Cumulative regret vs best fixed x (hindsight)")
    axes[1].set_title("Cumulative regret vs task-oracle routing")
    for ax in axes:
        ax.set_xlabel("slot")
        ax.set_ylabel("cumulative regret")
        for c in out.mix_changes:
            ax.axvline(c, color="grey", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", ncol=2)
    _save(fig, path)


def _plot_score(out: SimOutput, path: Path) -> None:
    plt = _pyplot()
    slots = max((s.slots for s in out.series.values()), default=0)
    window = max(1, min(10, slots // 8))  # per-slot scores are noisy (tens of requests a slot)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    style = _style(list(out.series))
    for name, s in out.series.items():
        ax.plot(100.0 * _moving_average(s.score, window), label=name, **style[name])
    for i, c in enumerate(out.mix_changes):
        ax.axvline(c, color="black", linestyle="--", linewidth=0.9, label="mix change" if i == 0 else None)
    ax.set_xlabel("slot")
    ax.set_ylabel(f"per-request credit % (moving average, {window} slots)")
    ax.set_title("Fleet-wide credit of the scored sample over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    _save(fig, path)


def _merging_series(out: SimOutput) -> PolicySeries | None:
    tanbr = out.series.get("Tanbr")
    if tanbr is not None and tanbr.choices is not None:
        return tanbr
    return next((s for s in out.series.values() if s.choices is not None), None)


def _plot_choices(out: SimOutput, path: Path) -> None:
    plt = _pyplot()
    s = _merging_series(out)
    if s is None:
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.text(0.5, 0.5, "no merging policy in this run", ha="center", va="center")
        ax.axis("off")
        _save(fig, path)
        return
    ch = np.asarray(s.choices, dtype=float)
    first_of_class: dict[str, int] = {}
    for i, node in enumerate(out.nodes[: ch.shape[1]]):
        first_of_class.setdefault(out.node_classes.get(node, node), i)
    if not first_of_class:
        first_of_class = {"node 0": 0}
    k = ch.shape[2]
    labels = list(out.experts) if len(out.experts) == k else [f"x_{i}" for i in range(k)]
    mix = None if out.true_mix is None else np.asarray(out.true_mix, dtype=float)
    cols = 1 if mix is None else 2
    fig, axes = plt.subplots(len(first_of_class), cols, figsize=(6 * cols, 0.5 + (0.35 * k + 0.8) * len(first_of_class)),
                             squeeze=False)
    im = None
    for row, (cls, i) in enumerate(first_of_class.items()):
        node = out.nodes[i] if i < len(out.nodes) else str(i)
        panels = [(ch[:, i, :].T, f"{s.name}: x it got on {node} ({cls})", labels)]
        if mix is not None:  # the true mix beside it: does x follow what the node serves?
            panels.insert(0, (mix[:, i, :].T, f"true task mix of {node}", list(out.tasks)))
        for ax, (data, title, ticks) in zip(axes[row], panels):
            im = ax.imshow(data, aspect="auto", origin="lower", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(title, fontsize=9)
            ax.set_yticks(range(len(ticks)))
            ax.set_yticklabels(ticks, fontsize=7)
            for c in out.mix_changes:
                ax.axvline(c - 0.5, color="white", linestyle="--", linewidth=0.8)
    for ax in axes[-1]:
        ax.set_xlabel("slot")
    fig.colorbar(im, ax=axes.ravel().tolist(), label="share / merging weight")
    _save(fig, path)


def _resident_mb(name: str, out: SimOutput) -> float:
    s = out.series.get(name)
    if s is not None and s.resident_bytes:
        return max(s.resident_bytes.values()) / MB
    return (_num(out.summary.get("policies", {}).get(name, {}).get("resident_bytes")) or 0.0) / MB


def _plot_latency_memory(out: SimOutput, path: Path) -> None:
    plt = _pyplot()
    policies = out.summary.get("policies", {})
    names = list(policies) or list(out.series)
    x = np.arange(len(names))
    p50 = [_num(policies.get(n, {}).get("latency_ms_p50")) or 0.0 for n in names]
    p95 = [_num(policies.get(n, {}).get("latency_ms_p95")) or 0.0 for n in names]
    res = [_resident_mb(n, out) for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    axes[0].bar(x - 0.2, p50, width=0.4, label="p50")
    axes[0].bar(x + 0.2, p95, width=0.4, label="p95")
    axes[0].set_ylabel("request latency (ms)")
    axes[0].set_title("Latency per policy")
    axes[0].legend()
    axes[1].bar(x, res, color="tab:green")
    axes[1].set_ylabel("resident model MB (max over nodes)")
    axes[1].set_title("Memory per policy")
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=40, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


# -------------------------------------------------------------------------------------- markdown


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _credit_note(out: SimOutput) -> str:
    if out.config.get("label_free"):
        return "agreement with the full MoE"
    if out.config.get("credit") == "balanced":
        return "balanced: a correct answer of class y earns 1/(C p_y); 1 - |error|/5 for STS-B"
    return "accuracy; 1 - |error|/5 for STS-B"


def _summary_md(out: SimOutput) -> bytes:
    s = out.summary
    header, rows = format_table(s)
    tasks = _task_list(out)
    task_rows = [
        [name, *(_fmt((p.get("scores") or {}).get(t), 100.0) for t in tasks)]
        for name, p in s.get("policies", {}).items()
    ]
    parts = ["# Simulation results", ""]
    facts = []
    if "requests" in s:
        facts.append(f"requests: {s['requests']}")
    if _num(s.get("wall_seconds")) is not None:
        facts.append(f"wall time: {float(s['wall_seconds']):.1f} s")
    if _num(s.get("requests_per_second")) is not None:
        facts.append(f"simulated requests/s: {float(s['requests_per_second']):.0f}")
    facts.append(f"slot length: {out.slot_seconds:g} s")
    facts.append(f"nodes: {len(out.nodes)} in {len(set(out.node_classes.values()))} classes")
    parts += ["; ".join(facts) + ".", "", "## Policies", "",
              "Scores in percent; MB = 10^6 bytes; regrets are cumulative, in per-request credit "
              f"({_credit_note(out)}).", "",
              _md_table(header, rows), "", *[f"- {line}" for line in latency_ratios(s)],
              *([f"- {provenance_line(s)}"] if provenance_line(s) else []), "",
              "## Score per task (%)", "",
              _md_table(["Policy", *tasks], task_rows), "", "## Plots", ""]
    titles = {
        "regret.png": "Cumulative regret",
        "score.png": "Score over time",
        "choices.png": "Chosen merging weights",
        "latency_memory.png": "Latency and memory",
    }
    parts += [f"- [{titles[p]}]({p})\n\n  ![{titles[p]}]({p})" for p in PLOTS]
    return ("\n".join(parts) + "\n").encode()


def write_results(out: SimOutput, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the whole results directory; returns {file name: path} for the CLI and W&B logger."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        name: out_dir / name
        for name in ("results.json", "config.yaml", "policies.csv", "series.csv", "choices.csv", *PLOTS, "summary.md")
    }
    results = to_jsonable(dict(out.summary))
    results["config"] = to_jsonable(out.config)
    atomic_write_json(paths["results.json"], results)
    # the resolved config, whole: `tanbr simulate --config <out>/config.yaml` runs the same scenario
    atomic_write_bytes(paths["config.yaml"], yaml.safe_dump({"base": None, **results["config"]}, sort_keys=False).encode())
    atomic_write_bytes(paths["policies.csv"], _policies_csv(out))
    atomic_write_bytes(paths["series.csv"], _series_csv(out))
    atomic_write_bytes(paths["choices.csv"], _choices_csv(out))
    _plot_regret(out, paths["regret.png"])
    _plot_score(out, paths["score.png"])
    _plot_choices(out, paths["choices.png"])
    _plot_latency_memory(out, paths["latency_memory.png"])
    atomic_write_bytes(paths["summary.md"], _summary_md(out))
    return paths
