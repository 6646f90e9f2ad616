"""`tanbr bench model`: latency, resident bytes and dev scores per inference mode of the task MoE,
static merges, and a dense offline search of the merge landscape for three reference task mixes."""

from __future__ import annotations

import time

import numpy as np

from tanbr_ray.moe.build import sample_x
from tanbr_ray.moe.data import load_task
from tanbr_ray.moe.infer import batch_latency, halves, predict, prepare, score
from tanbr_ray.moe.metrics import weighted_score

BENCH_MODES = ("dense", "merged", "top1", "top2", "oracle")
BATCH_SIZES = (1, 8, 32)


def candidate_xs(K: int, budget: int, n: int, mixes: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """≥ n feasible x: one-hots, uniform, each mix's ψ, pairwise halves, then random sparse Dirichlet."""
    xs = [np.eye(K)[k] for k in range(K)] + [np.full(K, 1.0 / K)] if budget >= K else [np.eye(K)[k] for k in range(K)]
    xs += [m for m in mixes if np.count_nonzero(m) <= budget]
    if budget >= 2:
        for i in range(K):
            for j in range(i + 1, K):
                v = np.zeros(K)
                v[[i, j]] = 0.5
                xs.append(v)
    uniq: dict[tuple, np.ndarray] = {}
    for x in xs:
        uniq.setdefault(tuple(np.round(x, 6)), x)
    rng = np.random.default_rng(seed)
    while len(uniq) < n:  # distinct x only: random supports of size 1 would repeat the one-hots
        x = sample_x(rng, K, budget)
        uniq.setdefault(tuple(np.round(x, 6)), x)
    return list(uniq.values())


def reference_mixes(tasks: list[str], drop: dict[str, float]) -> list[tuple[str, np.ndarray]]:
    """Uniform; 0.7 on the task merging hurts most; 0.45+0.45 on the two it hurts most — edge nodes
    serving the one or two applications where the choice of x matters (drops measured on the
    selection half only)."""
    K = len(tasks)
    order = sorted(tasks, key=lambda t: -drop[t])
    mixes = [("uniform", np.full(K, 1.0 / K))]
    one = np.full(K, 0.3 / (K - 1)) if K > 1 else np.ones(1)
    one[tasks.index(order[0])] = 0.7 if K > 1 else 1.0
    mixes.append((f"{order[0]}=0.7", one))
    if K > 2:
        two = np.full(K, 0.1 / (K - 2))
        two[tasks.index(order[0])] = two[tasks.index(order[1])] = 0.45
        mixes.append((f"{order[0]}+{order[1]}=0.45", two))
    return mixes


def _psi(tasks, v) -> dict[str, float]:
    return {t: float(p) for t, p in zip(tasks, v)}


def evaluate_xs(moe, cache, xs, sel=None, val=None, adapted=None, progress=True, bf16=False, desc="merge landscape"):
    """Per-task scores of every x on the selection half (A) and the scoring half (B) — or on the
    whole cache when no halves are given; each x is evaluated once and reused for every mix."""
    from tqdm.auto import tqdm

    A, B = [], []
    for x in tqdm(xs, desc=desc, disable=not progress):
        p = predict(moe, cache, "merged", x=x, adapted=adapted, bf16=bf16)
        A.append(score(cache, p, sel))
        if val is not None:
            B.append(score(cache, p, val))
    return A, B


def finalists_for(xs, mixes, tasks, screen_scores, per_mix: int, K: int) -> list[int]:
    """Indices to evaluate fully: the baselines (one-hots, uniform, each ψ), then each mix's best
    screened x in rank order, interleaved across mixes."""
    base = [i for i, x in enumerate(xs) if np.count_nonzero(x) == 1 or np.allclose(x, 1.0 / K)]
    base += [i for i, x in enumerate(xs) for _, v in mixes if np.allclose(x, v)]
    ranked = []
    for _, v in mixes:
        psi = _psi(tasks, v)
        ranked.append(list(np.argsort([-weighted_score(s, psi) for s in screen_scores], kind="stable")[:per_mix]))
    out: list[int] = []
    for i in base + [int(r[j]) for j in range(per_mix) for r in ranked if j < len(r)]:
        if i not in out:
            out.append(i)
    return out


def summarise_landscape(tasks, xs, mixes, A, B, oracle_b) -> list[dict]:
    """Per mix: best x picked on half A, it and the baselines scored on half B."""
    K = len(tasks)
    uni = np.full(K, 1.0 / K)
    out = []
    for name, v in mixes:
        psi = _psi(tasks, v)
        sa = [weighted_score(s, psi) for s in A]
        sb = [weighted_score(s, psi) for s in B]
        i = int(np.argmax(sa))
        iu = next((j for j, x in enumerate(xs) if np.allclose(x, uni)), None)  # None when B < K
        ip = next((j for j, x in enumerate(xs) if np.allclose(x, v)), None)
        orc = weighted_score(oracle_b, psi)
        out.append(
            {
                "name": name,
                "psi": psi,
                "best_x": [round(float(a), 4) for a in xs[i]],
                "best": sb[i],
                "best_on_selection_half": sa[i],
                "uniform": sb[iu] if iu is not None else None,
                "psi_merge": sb[ip] if ip is not None else None,
                "oracle": orc,
                "best_minus_uniform": sb[i] - sb[iu] if iu is not None else None,
                "oracle_minus_best": orc - sb[i],
                "best_index": i,
            }
        )
    return out


def run_bench(
    moe,
    data_dir=None,
    eval_examples: int | None = None,
    landscape_size: int = 200,
    landscape_examples: int = 240,
    no_adapt_size: int = 24,
    screen_examples: int | None = None,
    finalists: int = 6,
    bf16: bool = False,
    runs: int = 20,
    warmup: int = 3,
    seq_len: int = 64,
    batch_sizes=BATCH_SIZES,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Everything `tanbr bench model` reports, as a JSON-ready dict (scores are fractions)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    tasks, K = moe.tasks, moe.num_experts
    uniform = np.full(K, 1.0 / K)
    dev = {t: load_task(t, "dev", data_dir) for t in tasks}
    # per-mode scores on the (whole, or first n of the) dev split
    cache = prepare(moe, {t: s.head(eval_examples, seed) for t, s in dev.items()}, progress=progress)
    modes: dict = {}
    for mode in tqdm(BENCH_MODES, desc="scores per mode", disable=not progress):
        p = predict(moe, cache, mode, x=uniform if mode == "merged" else None, bf16=bf16)
        modes[mode] = {"scores": score(cache, p)}
    statics = {}
    for name in ["uniform", *sorted(moe.static_merges)]:
        statics[name] = {"scores": score(cache, predict(moe, cache, "merged", state=moe.static_state(name), bf16=bf16))}
    if bool(moe.adapted.item()):
        p = predict(moe, cache, "merged", x=uniform, adapted=False, bf16=bf16)
        statics["uniform_no_adaptation"] = {"scores": score(cache, p)}
    # latency and bytes
    for mode in tqdm(BENCH_MODES, desc="latency", disable=not progress):
        lat = {str(b): batch_latency(moe, mode, b, seq_len, runs, warmup) for b in batch_sizes}
        modes[mode]["latency_ms_p50"] = {b: v["p50"] for b, v in lat.items()}
        modes[mode]["latency_ms_p95"] = {b: v["p95"] for b, v in lat.items()}
        modes[mode]["bytes"] = moe.resident_bytes(mode)
    del cache
    # merge landscape on a fresh subset, split into selection and scoring halves
    lsplits = {t: s.head(landscape_examples, seed + 1) for t, s in dev.items()}
    lc = prepare(moe, lsplits, progress=progress)
    sel, val = halves(lc, seed)
    oracle_p = predict(moe, lc, "oracle", bf16=bf16)
    uni_a = score(lc, predict(moe, lc, "merged", x=uniform, bf16=bf16), sel)
    ora_a = score(lc, oracle_p, sel)
    drop = {t: ora_a[t] - uni_a[t] for t in tasks}
    mixes = reference_mixes(tasks, drop)
    xs = candidate_xs(K, moe.budget, landscape_size, [v for _, v in mixes], seed)
    if screen_examples and screen_examples < min(len(v) for v in sel.values()):
        # two-stage search: screen every x on part of the selection half, then evaluate the
        # finalists (and all baselines) on both halves; the best is still chosen on the selection half
        screen = prepare(moe, {t: lsplits[t].subset(sel[t][:screen_examples]) for t in tasks}, progress=progress)
        S, _ = evaluate_xs(moe, screen, xs, progress=progress, bf16=bf16, desc="merge landscape (screen)")
        del screen
        keep = finalists_for(xs, mixes, tasks, S, finalists, K)
    else:
        keep = list(range(len(xs)))
    fx = [xs[i] for i in keep]
    A, B = evaluate_xs(moe, lc, fx, sel, val, progress=progress, bf16=bf16, desc="merge landscape (finalists)")
    oracle_b = score(lc, oracle_p, val)
    entries = summarise_landscape(tasks, fx, mixes, A, B, oracle_b)
    stat_val = {n: score(lc, predict(moe, lc, "merged", state=moe.static_state(n), bf16=bf16), val) for n in moe.static_merges}
    for e in entries:
        # no single fixed x is best for all mixes: score each mix's best x under the other mixes
        e["best_x_of_other_mixes"] = {o["name"]: weighted_score(B[o["best_index"]], e["psi"]) for o in entries if o is not e}
        for n, sv in stat_val.items():
            e[n] = weighted_score(sv, e["psi"])
    distinct_best = len({tuple(e["best_x"]) for e in entries})
    adaptation = None
    if bool(moe.adapted.item()) and no_adapt_size > 0:
        n = min(no_adapt_size, len(fx))
        A0, B0 = evaluate_xs(moe, lc, fx[:n], sel, val, adapted=False, progress=progress, bf16=bf16, desc="no adaptation")
        without = summarise_landscape(tasks, fx[:n], mixes, A0, B0, oracle_b)
        with_sub = summarise_landscape(tasks, fx[:n], mixes, A[:n], B[:n], oracle_b)
        adaptation = {
            "num_x": n,
            "per_mix": [
                {
                    "name": w["name"],
                    "gap_without": wo["oracle_minus_best"],
                    "gap_with": w["oracle_minus_best"],
                    "uniform_gap_without": None if wo["uniform"] is None else wo["oracle"] - wo["uniform"],
                    "uniform_gap_with": None if w["uniform"] is None else w["oracle"] - w["uniform"],
                    "best_without": wo["best"],
                    "best_with": w["best"],
                }
                for w, wo in zip(with_sub, without)
            ],
        }
    for e in entries:
        e.pop("best_index")
    build_seconds = float(getattr(moe, "build_info", {}).get("build_seconds", float("nan")))
    res = {
        "model": {
            "tasks": tasks,
            "num_experts": K,
            "moe_layers": moe.moe_layers,
            "budget": moe.budget,
            "adapted": bool(moe.adapted.item()),
            "cache_dir": str(getattr(moe, "cache_dir", "")),
        },
        "device": str(moe.device),
        "seq_len": seq_len,
        "runs": runs,
        "eval_examples": {t: len(y) for t, y in zip(tasks, [dev[t].head(eval_examples, seed).labels for t in tasks])},
        "modes": modes,
        "static_merges": statics,
        "landscape": entries,
        "landscape_meta": {
            "num_x": len(xs),
            "num_finalists": len(fx),
            "screen_examples_per_task": screen_examples if len(fx) < len(xs) else None,
            "precision": "bf16-autocast" if bf16 else "fp32",
            "examples_per_task": {t: len(y) for t, y in lc.labels.items()},
            "distinct_best_x": distinct_best,
            "uniform_drop_on_selection_half": drop,
        },
        "adaptation": adaptation,
        "build_seconds": build_seconds,
        "build_stages": getattr(moe, "build_info", {}).get("stages", {}),
        "bench_seconds": time.perf_counter() - t_start,
    }
    res["targets"] = check_targets(res)
    return res


ORACLE_TARGETS = {"SST-2": 0.84, "QNLI": 0.72, "QQP": 0.75, "MNLI": 0.55}


def check_targets(res: dict) -> dict:
    """The issue's targets, evaluated on this run (True = met)."""
    m = res["modes"]
    out: dict = {}
    out["build_le_20min"] = res["build_seconds"] <= 1200
    out["oracle_scores"] = {t: m["oracle"]["scores"][t] >= v for t, v in ORACLE_TARGETS.items() if t in m["oracle"]["scores"]}
    gains = [m["oracle"]["scores"][t] - m["dense"]["scores"][t] for t in m["oracle"]["scores"]]
    out["experts_beat_heads_only_by_3pts_avg"] = float(np.mean(gains)) >= 0.03
    out["experts_beat_heads_only_each"] = all(g > 0 for g in gains)
    non_uni = [e for e in res["landscape"] if e["name"] != "uniform"]
    out["best_beats_uniform_by_2pts"] = {e["name"]: (e["best_minus_uniform"] or 0.0) >= 0.02 for e in non_uni}
    out["no_single_best_x"] = res["landscape_meta"]["distinct_best_x"] > 1
    out["best_within_4pts_of_oracle"] = {e["name"]: e["oracle_minus_best"] <= 0.04 for e in res["landscape"]}
    b32 = lambda mode: m[mode]["latency_ms_p50"]["32"]  # noqa: E731
    out["merged_le_1.05x_dense"] = b32("merged") <= 1.05 * b32("dense")
    out["merged_le_0.8x_top2"] = b32("merged") <= 0.8 * b32("top2")
    out["merged_bytes_le_0.4x_moe"] = m["merged"]["bytes"] <= 0.4 * m["top2"]["bytes"]
    return out


def format_table(res: dict) -> str:
    """Human-readable summary of a bench result."""
    tasks = res["model"]["tasks"]
    lines = []
    hdr = f"{'mode':8} {'p50 b1':>8} {'p50 b8':>8} {'p50 b32':>8} {'p95 b32':>8} {'MB':>7} " + " ".join(f"{t:>6}" for t in tasks) + "    avg"
    lines += [hdr, "-" * len(hdr)]
    for mode, v in res["modes"].items():
        sc = [v["scores"][t] for t in tasks]
        lat, p95 = v["latency_ms_p50"], v["latency_ms_p95"]
        lines.append(
            f"{mode:8} {lat['1']:8.1f} {lat['8']:8.1f} {lat['32']:8.1f} {p95['32']:8.1f} {v['bytes'] / 2**20:7.1f} "
            + " ".join(f"{s:6.3f}" for s in sc)
            + f" {np.mean(sc):6.3f}"
        )
    lines.append("")
    lines.append("static merges (dev scores): " + "; ".join(
        f"{n}: " + " ".join(f"{t} {s['scores'][t]:.3f}" for t in tasks) for n, s in res["static_merges"].items()
    ))
    lines.append("")
    lm = res["landscape_meta"]
    lines.append(
        f"merge landscape: {lm['num_x']} x ({lm['num_finalists']} finalists after screening on "
        f"{lm['screen_examples_per_task']}/task), {lm['examples_per_task']} dev examples/task "
        f"(select on one half, score on the other), {lm['precision']}"
    )
    h2 = f"{'mix':24} {'best':>6} {'uniform':>7} {'psi':>6} {'fisher':>6} {'regmean':>7} {'oracle':>6}  best_x"
    lines += [h2, "-" * len(h2)]
    for e in res["landscape"]:
        pm = "   n/a" if e["psi_merge"] is None else f"{e['psi_merge']:6.3f}"
        un = "    n/a" if e["uniform"] is None else f"{e['uniform']:7.3f}"
        lines.append(
            f"{e['name']:24} {e['best']:6.3f} {un} {pm} {e.get('fisher', float('nan')):6.3f} "
            f"{e.get('regmean', float('nan')):7.3f} {e['oracle']:6.3f}  {e['best_x']}"
        )
    if res.get("adaptation"):
        a = res["adaptation"]
        lines.append("")
        lines.append(f"merge-aware adaptation (oracle − best merge, {a['num_x']} x):")
        for p in a["per_mix"]:
            line = f"  {p['name']:24} gap without {p['gap_without']:+.3f} → with {p['gap_with']:+.3f}"
            if p["uniform_gap_with"] is not None:
                line += f"; uniform merge's gap {p['uniform_gap_without']:+.3f} → {p['uniform_gap_with']:+.3f}"
            lines.append(line)
    lines.append("")
    lines.append(f"build {res['build_seconds']:.0f}s; bench {res['bench_seconds']:.0f}s; device {res['device']}")
    lines.append("targets: " + ", ".join(f"{k}={v}" for k, v in res["targets"].items()))
    return "\n".join(lines)
