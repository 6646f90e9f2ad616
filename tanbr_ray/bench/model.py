"""`tanbr bench model`: what each serving mode costs and scores, how good each expert is, how fast
each merge operator merges, and the merge landscape per operator on node-like task mixes.

The landscape answers the question the router lives on: for the mixes edge nodes see (Dirichlet 0.3
over the tasks, as the workload draws them), how much per-request accuracy does a task-aware x buy
over static merges, and how close does it get to the task oracle? Candidates are chosen on one half
of the dev examples and scored on the other, so the choice itself is part of what is measured.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from tanbr_ray.moe.build import sample_x
from tanbr_ray.moe.data import load_task
from tanbr_ray.moe.infer import EvalCache, interleaved_latency, mode_forward, predict, prepare, score
from tanbr_ray.moe.merge import OPERATORS
from tanbr_ray.moe.metrics import METRIC, glue_score, majority_prediction, request_credit
from tanbr_ray.sim.comparator import screen_then_final
from tanbr_ray.simplex import MIX_CONCENTRATION, PSI_POWERS, psi_family

BENCH_MODES = ("dense", "merged", "top1", "top2", "soft", "oracle")
BATCH_SIZES = (1, 8, 32)
MIN_TASK_SHARE = 0.01  # tasks under 1 % of a mix are dropped from it (ψ renormalised)


def draw_mixes(K: int, n: int, seed: int) -> list[np.ndarray]:
    """n node mixes as the workload draws them: Dirichlet(0.3), seeded; tiny shares dropped."""
    rng = np.random.default_rng(seed)
    out = []
    for v in rng.dirichlet(np.full(K, MIX_CONCENTRATION), size=n):
        v = np.where(v >= MIN_TASK_SHARE, v, 0.0)
        out.append(v / v.sum())
    return out


class CreditTable:
    """Mean per-request credit per task on the two halves of a dev pool, for any model state.

    One cache per task, so a candidate is run only on the tasks its mix holds."""

    def __init__(self, moe, splits: Mapping, seed: int, progress: bool, screen_rows: int = 0):
        self.moe = moe
        self.caches: dict[str, EvalCache] = {t: prepare(moe, {t: s}) for t, s in tqdm(
            splits.items(), desc="landscape pool", disable=not progress, leave=False)}
        rng = np.random.default_rng(seed)
        self.halves = {}
        for t, s in splits.items():
            perm = rng.permutation(len(s))
            self.halves[t] = (np.sort(perm[: len(s) // 2]), np.sort(perm[len(s) // 2:]))
        self.labels = {t: np.asarray(s.labels) for t, s in splits.items()}
        # the screen: the first `screen_rows` of half A, in a cache of their own (runs only those rows)
        self.screen_idx = {t: self.halves[t][0][:screen_rows] for t in splits}
        self.screen_caches = {t: prepare(moe, {t: s.subset(self.screen_idx[t])}) for t, s in splits.items()} if screen_rows else {}
        self.rows = 0

    def credit(self, tasks, mode: str = "merged", state=None) -> dict:
        """{task: (credit on half A, credit on half B)} over the whole pool."""
        out = {}
        for t in tasks:
            c = request_credit(t, predict(self.moe, self.caches[t], mode, state=state)[t], self.labels[t])
            self.rows += len(c)
            a, b = self.halves[t]
            out[t] = (float(c[a].mean()), float(c[b].mean()))
        return out

    def screen(self, tasks, state) -> dict:
        """{task: credit on the screening rows of half A} (only those rows run)."""
        out = {}
        for t in tasks:
            p = predict(self.moe, self.screen_caches[t], "merged", state=state)[t]
            self.rows += len(p)
            out[t] = float(request_credit(t, p, self.labels[t][self.screen_idx[t]]).mean())
        return out


def _mix_value(table: dict, psi: dict[str, float], half: int) -> float:
    return float(sum(w * table[t][half] for t, w in psi.items()))


def split_state(lower: Mapping[str, torch.Tensor], upper: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A merged state whose lower half of MoE layers comes from `lower` and the rest from `upper`.
    Every operator merges each layer on its own, so this is the merge with one x per layer half."""
    out = {}
    for k, a in lower.items():
        h = a.shape[0] // 2
        out[k] = torch.cat([a[:h], upper[k][h:]])
    return out


def landscape(moe, pool: CreditTable, mixes: list[np.ndarray], op: str, budget: int, random_candidates: int,
              finalists: int, seed: int, progress: bool, layer_split: bool = False) -> dict:
    """One operator's landscape: per mix uniform, x = ψ, x ∝ ψ², the ψ-family's best (p chosen on
    half A) and the best of a wider search (the family plus the best screened random x, chosen on
    half A), all scored on half B. `layer_split` adds the best pair of ψ powers for the lower and
    upper halves of the MoE layers (chosen on A): does one x per layer half open room one x lacks?"""
    tasks, K = moe.tasks, moe.num_experts
    psis = [{t: float(v[i]) for i, t in enumerate(tasks) if v[i] > 0} for v in mixes]
    uniform = pool.credit(tasks, state=moe.merged_state(np.full(K, 1.0 / K), op))
    rng = np.random.default_rng(seed + 7)
    randoms = [sample_x(rng, K, budget) for _ in range(random_candidates)]
    screen = [pool.screen(tasks, moe.merged_state(x, op))
              for x in tqdm(randoms, desc=f"{op}: screen {random_candidates} random x", disable=not progress, leave=False)]
    per_mix = []
    for v, psi in tqdm(list(zip(mixes, psis)), desc=f"{op}: mixes", disable=not progress, leave=False):
        fam = psi_family(v, budget)
        fam_states = {p: moe.merged_state(x, op) for p, x in fam.items()}
        fam_tab = {p: pool.credit(psi, state=st) for p, st in fam_states.items()}
        p_best = max(PSI_POWERS, key=lambda p: _mix_value(fam_tab[p], psi, 0))
        cands = [("psi^%g" % p, fam[p], fam_tab[p]) for p in PSI_POWERS]
        if randoms:  # the random x: the finalists of the screen, each scored on all of half A
            fin_tab = {}

            def final(i: int) -> float:
                fin_tab[i] = pool.credit(psi, state=moe.merged_state(randoms[i], op))
                return _mix_value(fin_tab[i], psi, 0)

            i, _ = screen_then_final(range(len(randoms)), lambda i: sum(w * screen[i][t] for t, w in psi.items()),
                                     finalists, final)
            cands.append(("random", randoms[i], fin_tab[i]))
        name, x_best, tab_best = max(cands, key=lambda c: _mix_value(c[2], psi, 0))
        per_mix.append({
            "psi": psi,
            "uniform": _mix_value(uniform, psi, 1),
            "psi_merge": _mix_value(fam_tab[1.0], psi, 1),
            "psi2": _mix_value(fam_tab[2.0], psi, 1),
            "best_psi_family": _mix_value(fam_tab[p_best], psi, 1),
            "best_psi_power": p_best,
            "best_search": _mix_value(tab_best, psi, 1),
            "best_search_from": name,
            "best_search_x": [round(float(a), 4) for a in x_best],
            "best_search_on_selection_half": _mix_value(tab_best, psi, 0),
        })
        if layer_split:
            split_tab = {(a, b): fam_tab[a] if a == b else pool.credit(psi, state=split_state(fam_states[a], fam_states[b]))
                         for a in PSI_POWERS for b in PSI_POWERS}
            pair = max(split_tab, key=lambda ab: _mix_value(split_tab[ab], psi, 0))
            per_mix[-1].update(best_layer_split=_mix_value(split_tab[pair], psi, 1), layer_split_powers=list(pair),
                               best_layer_split_in_hindsight=max(_mix_value(t, psi, 1) for t in split_tab.values()),
                               best_psi_family_in_hindsight=max(_mix_value(fam_tab[p], psi, 1) for p in PSI_POWERS))
    keys = ("best_psi_family", "best_search", "psi_merge", "psi2", "uniform")
    keys += ("best_layer_split", "best_layer_split_in_hindsight", "best_psi_family_in_hindsight") if layer_split else ()
    mean = {k: float(np.mean([m[k] for m in per_mix])) for k in keys}
    mean["psi"] = mean.pop("psi_merge")
    return {"mean": mean, "mixes": per_mix, "uniform_per_task": {t: uniform[t][1] for t in tasks}}


def merge_timing(moe, ops, runs: int, seed: int) -> tuple[dict, dict]:
    """p50 ms of one merge per operator, x over all K experts (the most work); the one-off set-up
    of regmean (G_k W_kᵀ) is timed apart."""
    rng = np.random.default_rng(seed)
    xs = [rng.dirichlet(np.ones(moe.num_experts)) for _ in range(runs)]
    prep = {}
    t0 = time.perf_counter()
    if "regmean" in ops:
        moe.merger._prepare_regmean()
        prep["regmean"] = (time.perf_counter() - t0) * 1e3
    out = {}
    for op in ops:
        ts = []
        for x in xs:
            t = time.perf_counter()
            moe.merged_state(x, op)
            ts.append((time.perf_counter() - t) * 1e3)
        out[op] = float(np.median(ts))
    return out, prep


@torch.no_grad()
def routed_share(moe, cache: EvalCache) -> list[float]:
    """Per MoE layer, the share of dev tokens Switch-top1 routes to their own task's expert."""
    hits = np.zeros(len(moe.moe_layers))
    total = 0
    for b in cache.batches:
        rec: list = []
        moe.pooled_from_first_moe(b.h, b.attention_mask, b.task, "top1", record=rec)
        keep = b.attention_mask.bool()
        e = moe.task_index(b.task)
        for l, h in rec:
            if l in moe.moe_layers:
                m = moe.moe_layers.index(l)
                hits[m] += float((moe.router_logits(m, h[keep]).argmax(-1) == e).sum())
        total += int(keep.sum())
    return [float(h / max(total, 1)) for h in hits]


def run_bench(
    moe,
    data_dir=None,
    *,
    build_info: dict | None = None,
    eval_examples: int | None = None,
    mixes: int = 6,
    landscape_examples: int = 300,
    random_candidates: int = 100,
    screen_examples: int = 40,
    finalists: int = 2,
    budget: int = 3,
    operators=OPERATORS,
    layer_split: bool = False,
    bf16: bool = False,
    runs: int = 20,
    warmup: int = 3,
    seq_len: int = 64,
    batch_sizes=BATCH_SIZES,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Everything `tanbr bench model` reports, as a JSON-ready dict (scores are fractions)."""
    t_start = time.perf_counter()
    tasks = moe.tasks
    budget = min(budget, moe.budget)
    operators = [op for op in operators if op == "linear" or moe.stats is not None]
    dev = {t: load_task(t, "dev", data_dir) for t in tasks}
    # 1. per-mode scores on the (whole, or first n of the) dev split; 2. each expert
    cache = prepare(moe, {t: s.head(eval_examples, seed) for t, s in dev.items()}, progress=progress)
    modes, statics, preds = mode_scores(moe, cache, bf16, progress)
    experts = expert_table(moe, cache, preds, modes, data_dir)
    router = {"routed_to_task_expert": routed_share(moe, cache) if hasattr(moe, "router_logits") else None,
              "build": (build_info or {}).get("router", {})}
    del cache
    # 3. latency and bytes of every mode; merge time per operator
    modes = latency_table(moe, modes, batch_sizes, seq_len, runs, warmup)
    merge_ms, prep_ms = merge_timing(moe, operators, 5, seed)
    # 4. the landscape per operator, on a fresh pool split into selection / scoring halves
    pool = CreditTable(moe, {t: s.head(landscape_examples, seed + 1) for t, s in dev.items()}, seed, progress,
                       screen_examples if random_candidates else 0)
    mix_vs = draw_mixes(moe.num_experts, mixes, seed + 11)
    by_op = {op: landscape(moe, pool, mix_vs, op, budget, random_candidates, finalists, seed, progress, layer_split)
             for op in tqdm(operators, desc="landscape per operator", disable=not progress)}
    reference = landscape_references(moe, pool, by_op)
    psis = [m["psi"] for m in by_op[operators[0]]["mixes"]]
    best_op = max(by_op, key=lambda op: by_op[op]["mean"]["best_psi_family"])
    info = build_info or {}
    res = {
        "model": {"tasks": tasks, "num_experts": moe.num_experts, "moe_layers": moe.moe_layers, "budget": moe.budget,
                  "adapted": bool(moe.adapted), "merge_operator": moe.merge_operator},
        "device": str(moe.device), "seq_len": seq_len, "runs": runs,
        "eval_examples": {t: len(dev[t].head(eval_examples, seed)) for t in tasks},
        "modes": modes, "static_merges": statics, "experts": experts, "router": router,
        "merge_ms_p50": merge_ms, "merge_prepare_ms": prep_ms,
        "landscape_by_operator": by_op, "landscape_reference": reference,
        "landscape": [{"name": f"mix {i}", "psi": m["psi"], "best_x": m["best_search_x"], "best": m["best_search"],
                       "uniform": m["uniform"], "psi_merge": m["psi_merge"], "oracle": m["oracle"],
                       "oracle_minus_best": m["oracle"] - m["best_search"]} for i, m in enumerate(by_op[best_op]["mixes"])],
        "landscape_meta": {
            "credit": "per-request accuracy (STS-B: 1 - |error|/5), ψ-weighted, on the scoring half",
            "mixes": mixes, "budget": budget, "psi_powers": list(PSI_POWERS),
            "random_candidates": random_candidates, "screen_examples_per_task": screen_examples,
            "finalists_per_mix": finalists, "best_operator": best_op,
            "examples_per_task": {t: len(pool.labels[t]) for t in tasks},
            "scored_rows": pool.rows,
        },
        "adaptation": adaptation_effect(moe, pool, mix_vs, psis, budget),
        "build_seconds": float(info.get("build_seconds", float("nan"))),
        "build_stages": info.get("stages", {}),
        "bench_seconds": time.perf_counter() - t_start,
    }
    res["targets"] = check_targets(res)
    return res


def mode_scores(moe, cache: EvalCache, bf16: bool, progress: bool) -> tuple[dict, dict, dict]:
    """Scores of every serving mode (merged: x uniform) and of the static merges; the predictions."""
    uniform = np.full(moe.num_experts, 1.0 / moe.num_experts)
    modes, preds = {}, {}
    for mode in tqdm(BENCH_MODES, desc="scores per mode", disable=not progress):
        preds[mode] = predict(moe, cache, mode, x=uniform if mode == "merged" else None, bf16=bf16)
        modes[mode] = {"scores": score(cache, preds[mode])}
    statics = {}
    for name in ("uniform", "fisher", "regmean"):
        if name == "uniform" or moe.stats is not None:
            statics[name] = {"scores": score(cache, predict(moe, cache, "merged", state=moe.static_state(name), bf16=bf16))}
    if bool(moe.adapted):
        statics["uniform_no_adaptation"] = {"scores": score(cache, predict(moe, cache, "merged", x=uniform, adapted=False, bf16=bf16))}
    return modes, statics, preds


def expert_table(moe, cache: EvalCache, preds: dict, modes: dict, data_dir) -> dict:
    """Each expert (task-oracle routing) beside the majority class and the heads-only baseline."""
    experts = {}
    for t in moe.tasks:
        y = cache.labels[t]
        const = np.full(len(y), majority_prediction(t, load_task(t, "train", data_dir).labels), dtype=np.asarray(preds["oracle"][t]).dtype)
        experts[t] = {
            "metric_name": METRIC[t],
            "metric": modes["oracle"]["scores"][t],
            "accuracy": float(request_credit(t, preds["oracle"][t], y).mean()),
            "majority": float(request_credit(t, const, y).mean()),
            "majority_metric": glue_score(t, const, y),
            "heads_only": modes["dense"]["scores"][t],
            "predicts_one_class": bool(t != "STS-B" and len(np.unique(preds["oracle"][t])) == 1),
        }
    return experts


def latency_table(moe, modes: dict, batch_sizes, seq_len: int, runs: int, warmup: int) -> dict:
    """Latency p50/p95 and bytes of every mode, every mode and batch size timed round-robin: a load
    change on a shared host then hits all alike (timed one mode after another, merged read 1.054x
    dense at batch 32)."""
    fns = {(mode, b): mode_forward(moe, mode, b, seq_len) for mode in BENCH_MODES for b in batch_sizes}
    timed = interleaved_latency(fns, runs=runs, warmup=warmup)
    for mode in BENCH_MODES:
        modes[mode]["latency_ms_p50"] = {str(b): timed[(mode, b)]["p50"] for b in batch_sizes}
        modes[mode]["latency_ms_p95"] = {str(b): timed[(mode, b)]["p95"] for b in batch_sizes}
        modes[mode]["bytes"] = moe.resident_bytes(mode)
    return modes


def landscape_references(moe, pool: "CreditTable", by_op: dict) -> dict:
    """The fixed models on the landscape's mixes (static merges, Switch, Soft, the oracle), their mean
    over the mixes; each mix's value is added to every operator's per-mix rows."""
    tasks = moe.tasks
    refs = {
        "static_regmean": pool.credit(tasks, state=moe.static_state("regmean")) if moe.stats is not None else None,
        "static_fisher": pool.credit(tasks, state=moe.static_state("fisher")) if moe.stats is not None else None,
        "switch_top1": pool.credit(tasks, "top1"),
        "soft": pool.credit(tasks, "soft"),
        "oracle": pool.credit(tasks, "oracle"),
    }
    psis = [m["psi"] for m in next(iter(by_op.values()))["mixes"]]
    reference = {k: (None if tab is None else float(np.mean([_mix_value(tab, p, 1) for p in psis]))) for k, tab in refs.items()}
    for op in by_op:
        for m in by_op[op]["mixes"]:
            m.update({k: _mix_value(tab, m["psi"], 1) for k, tab in refs.items() if tab is not None})
    return reference


def adaptation_effect(moe, pool: "CreditTable", mix_vs, psis, budget: int) -> dict | None:
    """Merge-aware adaptation: x ∝ ψ² (linear) with and without the adapted LayerNorms and heads."""
    if not bool(moe.adapted):
        return None
    vals = {}
    for flag in (True, False):
        v = []
        for mv, psi in zip(mix_vs, psis):
            st = moe.merged_state(psi_family(mv, budget)[2.0], "linear")
            tab = {t: request_credit(t, predict(moe, pool.caches[t], "merged", state=st, adapted=flag)[t], pool.labels[t])[pool.halves[t][1]].mean() for t in psi}
            v.append(sum(w * tab[t] for t, w in psi.items()))
        vals[flag] = float(np.mean(v))
    return {"psi2_linear_with": vals[True], "psi2_linear_without": vals[False]}


EXPERT_FLOORS = {"CoLA": 0.15, "RTE": 0.56, "SST-2": 0.85, "QNLI": 0.78, "MNLI": 0.60, "STS-B": 0.75}


def check_targets(res: dict) -> dict:
    """The issue's targets, evaluated on this run (True = met)."""
    m, ex = res["modes"], res["experts"]
    out: dict = {"build_le_20min": res["build_seconds"] <= 1200}
    floors = {t: ex[t]["metric"] >= v for t, v in EXPERT_FLOORS.items() if t in ex}
    if "MRPC" in ex:
        floors["MRPC"] = ex["MRPC"]["accuracy"] >= 0.72 and ex["MRPC"]["metric"] * 2 - ex["MRPC"]["accuracy"] >= 0.81
    if "QQP" in ex:
        floors["QQP"] = ex["QQP"]["accuracy"] >= 0.80
    out["expert_floors"] = floors
    out["no_expert_at_majority"] = not any(e["predicts_one_class"] for e in ex.values())
    by_op, ref = res["landscape_by_operator"], res["landscape_reference"]
    best = max(v["mean"]["best_psi_family"] for v in by_op.values())
    if ref.get("static_regmean") is not None:
        out["psi_family_beats_static_regmean_by_3pts"] = best - ref["static_regmean"] >= 0.03
    out["psi_family_within_4pts_of_oracle"] = ref["oracle"] - best <= 0.04
    if "regmean" in by_op:
        out["regmean_psi_family_ge_linear_minus_0.5pt"] = (
            by_op["regmean"]["mean"]["best_psi_family"] >= by_op["linear"]["mean"]["best_psi_family"] - 0.005)
    if "regmean" in res["merge_ms_p50"]:
        out["regmean_merge_le_500ms"] = res["merge_ms_p50"]["regmean"] <= 500
    out["linear_merge_le_50ms"] = res["merge_ms_p50"]["linear"] <= 50
    b32 = lambda mode: m[mode]["latency_ms_p50"]["32"]  # noqa: E731
    out["merged_le_1.05x_dense"] = b32("merged") <= 1.05 * b32("dense")
    out["merged_bytes_le_0.35x_moe"] = m["merged"]["bytes"] <= 0.35 * m["top2"]["bytes"]
    avg = lambda mode: float(np.mean(list(m[mode]["scores"].values())))  # noqa: E731
    out["switch_top1_within_3pts_of_oracle"] = avg("oracle") - avg("top1") <= 0.03
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
        lines.append(f"{mode:8} {lat['1']:8.1f} {lat['8']:8.1f} {lat['32']:8.1f} {p95['32']:8.1f} {v['bytes'] / 2**20:7.1f} "
                     + " ".join(f"{s:6.3f}" for s in sc) + f" {np.mean(sc):6.3f}")
    for n, s in res["static_merges"].items():
        sc = [s["scores"][t] for t in tasks]
        lines.append(f"{'static ' + n:26} {'':>19}" + " ".join(f"{x:6.3f}" for x in sc) + f" {np.mean(sc):6.3f}")
    lines += ["", "experts (task-oracle routing, dev):",
              f"  {'task':6} {'metric':>20} {'value':>6} {'majority':>8} {'heads-only':>10} {'accuracy':>8} {'majority acc':>12}"]
    for t, e in res["experts"].items():
        flag = "  <- one class only" if e["predicts_one_class"] else ""
        lines.append(f"  {t:6} {e['metric_name']:>20} {e['metric']:6.3f} {e['majority_metric']:8.3f} {e['heads_only']:10.3f} "
                     f"{e['accuracy']:8.3f} {e['majority']:12.3f}{flag}")
    r = res["router"]["routed_to_task_expert"]
    if r is not None:
        lines += ["", "Switch-top1: share of dev tokens routed to their task's expert, per layer: "
                  + " ".join(f"{v:.2f}" for v in r)]
    lines.append("merge ms p50 (x over all experts): " + ", ".join(f"{k} {v:.1f}" for k, v in res["merge_ms_p50"].items())
                 + "".join(f"; {k} set-up {v:.0f} ms once" for k, v in res["merge_prepare_ms"].items()))
    lm, ref = res["landscape_meta"], res["landscape_reference"]
    lines += ["", f"merge landscape: {lm['mixes']} mixes ~ Dirichlet(0.3), budget B = {lm['budget']}, "
              f"{lm['examples_per_task']} dev examples/task (choose on one half, score on the other); {lm['credit']}"]
    h2 = f"  {'operator':9} {'psi-best':>8} {'search':>7} {'psi':>6} {'psi^2':>6} {'uniform':>7}"
    lines += [h2]
    for op, v in res["landscape_by_operator"].items():
        mm = v["mean"]
        lines.append(f"  {op:9} {mm['best_psi_family']:8.3f} {mm['best_search']:7.3f} {mm['psi']:6.3f} {mm['psi2']:6.3f} {mm['uniform']:7.3f}")
        if "best_layer_split" in mm:
            lines.append(f"  {'':9} one ψ power per layer half: {mm['best_layer_split']:.3f} chosen on A "
                         f"({mm['best_layer_split_in_hindsight']:.3f} best on B itself; ψ-family {mm['best_psi_family_in_hindsight']:.3f})")
    lines.append("  reference: " + ", ".join(f"{k} {v:.3f}" for k, v in ref.items() if v is not None))
    op = lm["best_operator"]
    lines += [f"  per mix ({op}):", f"    {'mix (top tasks)':34} {'psi-best':>8} {'p':>4} {'search':>7} {'psi':>6} {'uniform':>7} {'regmean':>7} {'oracle':>6}"]
    for m in res["landscape_by_operator"][op]["mixes"]:
        top = ", ".join(f"{t} {w:.2f}" for t, w in sorted(m["psi"].items(), key=lambda kv: -kv[1])[:3])
        lines.append(f"    {top:34} {m['best_psi_family']:8.3f} {m['best_psi_power']:4g} {m['best_search']:7.3f} {m['psi_merge']:6.3f} "
                     f"{m['uniform']:7.3f} {m.get('static_regmean', float('nan')):7.3f} {m['oracle']:6.3f}")
    if res.get("adaptation"):
        a = res["adaptation"]
        lines.append(f"  merge-aware adaptation, x ∝ ψ² linear: {a['psi2_linear_without']:.3f} without → {a['psi2_linear_with']:.3f} with")
    lines += ["", f"build {res['build_seconds']:.0f}s; bench {res['bench_seconds']:.0f}s; device {res['device']}",
              "targets: " + ", ".join(f"{k}={v}" for k, v in res["targets"].items())]
    return "\n".join(lines)

