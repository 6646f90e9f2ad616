"""`tanbr bench pool`: the built-in MoE exported as a pool of fine-tunes (`tanbr export-pool`) and
built back, twice — with the exported parts (router, adapted heads and norms, statistics) and from
the checkpoints alone (those parts computed anew by the pool build) — each compared with the
built-in model mode by mode on the same dev rows in fp32: the largest logit difference, the share of
equal predictions and each side's GLUE score, plus both builds' times against the built-in build's."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import yaml

from tanbr_ray.moe.data import PAIR, bucket_batches, load_task
from tanbr_ray.moe.infer import _to_pred
from tanbr_ray.moe.metrics import glue_score

MODES = ("dense", "oracle", "top1", "top2", "soft")
OPERATORS = ("linear", "fisher", "regmean")


def _cases(K: int, seed: int) -> list[tuple[str, str, np.ndarray | None]]:
    """(label, operator, x): every operator at uniform x, at a vertex and at one random x; the static merges."""
    rng = np.random.default_rng(seed)
    xs = {"uniform": np.full(K, 1.0 / K), "vertex": np.eye(K)[K - 1], "random": rng.dirichlet(np.ones(K))}
    return [(f"merged {op} @ {name}", op, x) for op in OPERATORS for name, x in xs.items()]


@torch.no_grad()
def _logits(model, batches: dict, mode: str, state=None) -> dict[str, torch.Tensor]:
    out = {}
    for task, bs in batches.items():
        rows = [model(b.input_ids, b.attention_mask, b.token_type_ids, task, mode=mode, state=state).float() for b in bs]
        order = np.concatenate([b.index for b in bs])
        out[task] = torch.cat(rows)[np.argsort(order)]
    return out


def compare(ref, other, rows: int, seed: int, data_dir=None) -> dict:
    """Mode by mode: max |Δ logit|, share of equal predictions, each side's mean GLUE score."""
    batches, labels = {}, {}
    for t in ref.tasks:
        sp = load_task(t, "dev", data_dir).head(rows, seed=seed)
        batches[t] = bucket_batches(ref.tokenizer, sp, ref.max_len_pair if PAIR[t] else ref.max_len_single, 32)
        labels[t] = sp.labels
    ref.eval(), other.eval()
    out = {}
    cases = [(m, m, None, None) for m in MODES] + [(lab, "merged", op, x) for lab, op, x in _cases(ref.num_experts, seed)]
    cases += [(f"static {n}", "merged", n, "static") for n in ("uniform", "fisher", "regmean")]
    for label, mode, op, x in cases:
        if x is None:
            a, b = _logits(ref, batches, mode), _logits(other, batches, mode)
        elif isinstance(x, str):
            a, b = (_logits(m, batches, mode, m.static_state(op)) for m in (ref, other))
        else:
            a, b = (_logits(m, batches, mode, m.merged_state(x, op)) for m in (ref, other))
        pa = {t: _to_pred(t, a[t]) for t in a}
        pb = {t: _to_pred(t, b[t]) for t in b}
        out[label] = {
            "max_abs_logit_diff": float(max((a[t] - b[t]).abs().max() for t in a)),
            "equal_predictions": float(np.mean(np.concatenate([pa[t] == pb[t] for t in a]))),
            "score_builtin": float(np.mean([glue_score(t, pa[t], labels[t]) for t in a])),
            "score_pool": float(np.mean([glue_score(t, pb[t], labels[t]) for t in a])),
        }
    return out


def run_roundtrip(built, out: Path, models_dir=None, data_dir=None, rows: int = 64, seed: int = 1,
                  progress: bool = True) -> dict:
    """Export `built` (a BuiltMoE of the built-in model) into `out`, build it back both ways, compare."""
    from tanbr_ray.moe.export import export_pool
    from tanbr_ray.moe.pool_store import load_or_build_pool

    moe = built.moe
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pool_yaml = export_pool(moe, moe.tokenizer, out, moe.identity["key"], (moe.max_len_single, moe.max_len_pair),
                            progress=progress)
    export_s = time.perf_counter() - t0
    alone_yaml = out / "pool-checkpoints-only.yaml"
    spec = yaml.safe_load(pool_yaml.read_text())
    spec.pop("parts")
    spec["name"] = spec["name"] + "-checkpoints-only"
    alone_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))
    res = {"model": dict(moe.identity), "builtin": {"model": moe.identity, "build_seconds": built.build_info.get("build_seconds")},
           "export_seconds": export_s, "rows_per_task": rows, "rows_seed": seed, "precision": "fp32"}
    for name, path in (("with_parts", pool_yaml), ("checkpoints_only", alone_yaml)):
        t0 = time.perf_counter()
        pool = load_or_build_pool(path, models_dir, progress=progress, data_dir=data_dir, rebuild=True)
        res[name] = {"build_seconds": time.perf_counter() - t0, "stages": pool.build_info.get("stages", {}),
                     "from_parts": pool.build_info.get("from_parts", []), "model": pool.moe.identity,
                     "modes": compare(moe, pool.moe, rows, seed, data_dir)}
    b = res["builtin"]["build_seconds"]
    res["build_ratio"] = None if not b else res["checkpoints_only"]["build_seconds"] / b
    return res


def format_roundtrip(res: dict) -> str:
    lines = [f"export: {res['export_seconds']:.1f} s; built-in build (recorded) "
             f"{res['builtin']['build_seconds'] or float('nan'):.1f} s"]
    for name in ("with_parts", "checkpoints_only"):
        r = res[name]
        lines.append(f"pool built {name.replace('_', ' ')}: {r['build_seconds']:.1f} s"
                     + (f" ({r['build_seconds'] / res['builtin']['build_seconds']:.2f}x the built-in build)"
                        if res["builtin"]["build_seconds"] else "")
                     + (f"; from parts: {', '.join(r['from_parts'])}" if r["from_parts"] else ""))
        lines.append(f"  {'mode':28s} {'max |Δ logit|':>14s} {'equal preds':>12s} {'score built-in':>15s} {'score pool':>11s}")
        for mode, m in r["modes"].items():
            lines.append(f"  {mode:28s} {m['max_abs_logit_diff']:14.2e} {m['equal_predictions']:12.4f} "
                         f"{m['score_builtin']:15.4f} {m['score_pool']:11.4f}")
    return "\n".join(lines)
