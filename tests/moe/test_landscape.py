"""Landscape search helpers: feasible candidates, reference mixes, selection on one half."""

import numpy as np

from tanbr_ray.bench.model import candidate_xs, reference_mixes, summarise_landscape
from tanbr_ray.moe.merge import validate_x

TASKS = ["SST-2", "QNLI", "QQP", "MNLI"]


def test_candidates_are_feasible_and_cover_corners():
    mixes = [v for _, v in reference_mixes(TASKS, {"SST-2": 0.0, "QNLI": 0.1, "QQP": 0.05, "MNLI": 0.2})]
    xs = candidate_xs(4, 4, 200, mixes)
    assert len(xs) >= 200 and len({tuple(np.round(x, 6)) for x in xs}) == len(xs)  # distinct
    for x in xs:
        validate_x(x, 4, 4)
    assert any(np.allclose(x, [1, 0, 0, 0]) for x in xs) and any(np.allclose(x, 0.25) for x in xs)
    for x in candidate_xs(4, 2, 50, mixes):
        validate_x(x, 4, 2)  # budget respected: no uniform, no dense ψ


def test_reference_mixes_follow_the_merging_drop():
    mixes = dict(reference_mixes(TASKS, {"SST-2": 0.0, "QNLI": 0.1, "QQP": 0.05, "MNLI": 0.2}))
    assert list(mixes) == ["uniform", "MNLI=0.7", "MNLI+QNLI=0.45"]
    assert np.isclose(mixes["MNLI=0.7"].sum(), 1) and mixes["MNLI=0.7"][3] == 0.7
    assert np.allclose(mixes["MNLI+QNLI=0.45"], [0.05, 0.45, 0.05, 0.45])


def test_best_is_selected_on_one_half_and_scored_on_the_other():
    xs = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([0.5, 0.5])]
    A = [{"SST-2": 0.9, "QNLI": 0.1}, {"SST-2": 0.2, "QNLI": 0.8}, {"SST-2": 0.5, "QNLI": 0.5}]
    B = [{"SST-2": 0.6, "QNLI": 0.1}, {"SST-2": 0.2, "QNLI": 0.9}, {"SST-2": 0.5, "QNLI": 0.5}]
    mixes = [("uniform", np.array([0.5, 0.5])), ("SST-2=0.7", np.array([0.7, 0.3]))]
    e = summarise_landscape(["SST-2", "QNLI"], xs, mixes, A, B, {"SST-2": 0.9, "QNLI": 0.9})
    assert e[1]["best_x"] == [1.0, 0.0]  # chosen on A
    assert np.isclose(e[1]["best"], 0.7 * 0.6 + 0.3 * 0.1)  # scored on B
    assert np.isclose(e[1]["uniform"], 0.5) and np.isclose(e[1]["oracle"], 0.9)
    none_uniform = summarise_landscape(["SST-2", "QNLI"], xs[:2], mixes, A[:2], B[:2], {"SST-2": 1, "QNLI": 1})
    assert none_uniform[0]["uniform"] is None and none_uniform[0]["best_minus_uniform"] is None
