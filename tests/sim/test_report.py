"""Results directory: every file written, JSON round-trips, CSV shapes match the synthetic run."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from tanbr_ray.sim.output import PolicySeries, SimOutput
from tanbr_ray.sim.report import format_table, write_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SLOTS, K = 12, 4
NODES = ["board-0", "board-1", "gateway-0"]
CLASSES = {"board-0": "board", "board-1": "board", "gateway-0": "gateway"}
TASKS = ["SST-2", "MNLI"]


def make_output(seed: int = 0) -> SimOutput:
    """3 policies (2 merging, 1 not), 12 slots, 3 nodes in 2 classes, K=4, 2 tasks."""
    rng = np.random.default_rng(seed)
    series, policies = {}, {}
    for i, (name, merges) in enumerate([("Tanbr", True), ("Uniform", True), ("Switch-top1", False)]):
        choices = rng.dirichlet(np.ones(K), size=(SLOTS, len(NODES))) if merges else None
        latency = rng.gamma(2.0, 5.0 + i, size=40)
        resident = {n: int(1e6 * (2 + i + j)) for j, n in enumerate(NODES)}
        series[name] = PolicySeries(
            name=name,
            score=np.clip(0.6 + 0.02 * i + rng.normal(0, 0.05, SLOTS), 0, 1),
            regret_best_fixed=rng.uniform(0, 0.1, SLOTS),
            regret_oracle=rng.uniform(0, 0.2, SLOTS),
            pushed_bytes=rng.integers(0, 10**6, SLOTS),
            choices=choices,
            latency_ms=latency,
            resident_bytes=resident,
        )
        policies[name] = {
            "credit": 0.70 + 0.01 * i,
            "credit_second_half": 0.71 + 0.01 * i,
            "score": 0.61 + 0.01 * i,
            "score_second_half": 0.62 + 0.01 * i,
            "scores": {"SST-2": 0.8 - 0.01 * i, "MNLI": 0.45 + 0.01 * i},
            "latency_ms_p50": float(np.percentile(latency, 50)),
            "latency_ms_p95": float(np.percentile(latency, 95)),
            "resident_bytes": max(resident.values()),
            "pushed_bytes": int(series[name].pushed_bytes.sum()),
            "regret_vs_best_fixed": float(series[name].regret_best_fixed.sum()),
            "regret_vs_oracle": float(series[name].regret_oracle.sum()),
            "regret_slope": 0.5 + 0.1 * i,
        }
    summary = {"policies": policies, "requests": 120, "wall_seconds": 1.5, "requests_per_second": 80.0}
    return SimOutput(
        summary=summary,
        series=series,
        tasks=TASKS,
        experts=["SST-2 expert", "MNLI expert", "QQP expert", "RTE expert"],
        nodes=NODES,
        node_classes=CLASSES,
        mix_changes=[6],
        slot_seconds=60.0,
        config={"name": "unit", "seed": seed, "slots": SLOTS},
    )


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_write_results_writes_every_file(tmp_path):
    out = make_output()
    paths = write_results(out, tmp_path / "res")
    expected = {"results.json", "config.yaml", "policies.csv", "series.csv", "choices.csv", "regret.png", "score.png",
                "choices.png", "latency_memory.png", "summary.md"}
    assert set(paths) == expected
    assert {p.name for p in (tmp_path / "res").iterdir()} == expected  # no temp files left behind
    for name in expected:
        assert paths[name].stat().st_size > 0
    for png in ("regret.png", "score.png", "choices.png", "latency_memory.png"):
        assert paths[png].read_bytes()[:8] == PNG_MAGIC

    results = json.loads(paths["results.json"].read_text())
    assert results.pop("config") == out.config
    assert results == out.summary

    pol = _rows(paths["policies.csv"])
    assert [r["policy"] for r in pol] == ["Tanbr", "Uniform", "Switch-top1"]
    assert float(pol[1]["score_MNLI"]) == pytest.approx(0.46)
    assert int(pol[2]["resident_bytes"]) == out.summary["policies"]["Switch-top1"]["resident_bytes"]

    ser = _rows(paths["series.csv"])
    assert len(ser) == 3 * SLOTS
    tanbr = [r for r in ser if r["policy"] == "Tanbr"]
    np.testing.assert_allclose([float(r["score"]) for r in tanbr], out.series["Tanbr"].score)

    ch = _rows(paths["choices.csv"])
    assert len(ch) == 2 * SLOTS * len(NODES)  # only the two merging policies
    assert {r["policy"] for r in ch} == {"Tanbr", "Uniform"}
    first = ch[0]
    assert (first["policy"], first["slot"], first["node"]) == ("Tanbr", "0", "board-0")
    np.testing.assert_allclose(
        [float(first[f"x_{i}"]) for i in range(K)], out.series["Tanbr"].choices[0, 0], rtol=1e-5
    )

    md = paths["summary.md"].read_text()
    for name in ("Tanbr", "Uniform", "Switch-top1", "regret.png", "choices.png", "MNLI"):
        assert name in md


def test_numpy_and_nan_values_become_strict_json(tmp_path):
    out = make_output()
    out.summary["policies"]["Tanbr"]["regret_slope"] = np.float32(float("nan"))
    out.summary["policies"]["Tanbr"]["pushed_bytes"] = np.int64(7)
    paths = write_results(out, tmp_path)
    text = paths["results.json"].read_text()
    assert "NaN" not in text
    tanbr = json.loads(text)["policies"]["Tanbr"]
    assert tanbr["regret_slope"] is None and tanbr["pushed_bytes"] == 7
    header, rows = format_table(out.summary)
    assert rows[0][header.index("Slope")] == "–"


def test_choices_plot_falls_back_without_tanbr(tmp_path):
    out = make_output()
    del out.series["Tanbr"], out.summary["policies"]["Tanbr"]
    out.series["Uniform"].choices = None
    paths = write_results(out, tmp_path)  # no merging policy left at all
    assert paths["choices.png"].read_bytes()[:8] == PNG_MAGIC
    assert _rows(paths["choices.csv"]) == []


def test_format_table_rows_per_policy():
    out = make_output()
    header, rows = format_table(out.summary)
    assert header[0] == "Policy" and len(rows) == 3
    assert all(len(r) == len(header) and all(isinstance(c, str) for c in r) for r in rows)
    assert [r[0] for r in rows] == ["Tanbr", "Uniform", "Switch-top1"]
    assert header[1] == "Credit 2nd half %" and header[3] == "GLUE 2nd half %"  # the headline comes first
    assert rows[0][1] == "71.0" and rows[2][2] == "72.0" and rows[1][3] == "63.0"  # percent, 1 decimal
    resident = out.summary["policies"]["Uniform"]["resident_bytes"] / 1e6
    assert math.isclose(float(rows[1][header.index("Resident MB")]), resident, abs_tol=0.01)


def test_seeds_and_paired_lines():
    from tanbr_ray.sim.report import format_paired

    s = make_output().summary
    s["seeds"] = {"list": [0, 1], "policies": {n: {"credit_second_half_mean": 0.7, "credit_second_half_sd": 0.01}
                                               for n in s["policies"]}}
    s["paired"] = {"Uniform": {"diff_mean": 0.021, "ci95": [0.005, 0.04], "ci95_t_over_seeds": None},
                   "Switch-top1": {"diff_mean": -0.01, "ci95": [-0.03, 0.01], "ci95_t_over_seeds": [-0.1, 0.08]}}
    header, rows = format_table(s)
    assert header[2] == "mean ± sd over seeds" and rows[0][2] == "70.0 ± 1.0"
    lines = format_paired(s)
    assert "+2.10" in lines[1] and "above 0" in lines[1] and "spans 0" in lines[2] and "t over seeds" in lines[2]
