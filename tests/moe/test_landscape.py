"""Landscape helpers: node mixes, the ψ-family, and choosing on one half while scoring on the other."""

import numpy as np
import pytest
import torch

from tanbr_ray.bench.model import MIN_TASK_SHARE, draw_mixes, landscape, split_state
from tanbr_ray.simplex import PSI_POWERS, psi_family, snap_to_grid
from tanbr_ray.moe.merge import validate_x

TASKS = ["SST-2", "QNLI", "QQP", "MNLI"]


def test_mixes_are_seeded_distributions_without_tiny_shares():
    a, b = draw_mixes(8, 6, seed=3), draw_mixes(8, 6, seed=3)
    assert len(a) == 6 and all(np.array_equal(x, y) for x, y in zip(a, b))
    for v in a:
        assert np.isclose(v.sum(), 1) and ((v == 0) | (v >= MIN_TASK_SHARE * 0.99)).all()
    assert not np.array_equal(a[0], draw_mixes(8, 6, seed=4)[0])


def test_psi_family_is_feasible_and_sharpens():
    psi = np.array([0.5, 0.3, 0.15, 0.05])
    fam = psi_family(psi, budget=3)
    assert set(fam) == set(PSI_POWERS)
    for x in fam.values():
        validate_x(x, 4, 3)
        assert x[3] == 0  # top-B keeps the three largest
    assert np.allclose(fam[1.0], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert fam[4.0][0] > fam[2.0][0] > fam[1.0][0] > fam[0.5][0]


def test_snap_to_grid_keeps_the_sum_and_the_support():
    x = np.array([0.41, 0.33, 0.2, 0.06, 0.0])
    assert np.array_equal(snap_to_grid(x, 10), [0.4, 0.3, 0.2, 0.1, 0.0])  # largest remainders round up
    assert np.array_equal(snap_to_grid(x, 0), x)
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = np.where(rng.random(6) < 0.4, 0.0, rng.dirichlet(np.full(6, 0.3)))
        if x.sum() == 0:
            continue
        x = x / x.sum()
        y = snap_to_grid(x, 32)
        assert np.isclose(y.sum(), 1) and np.allclose(y * 32, np.round(y * 32))
        assert not ((x == 0) & (y > 0)).any() and np.abs(x - y).max() <= 1 / 32
        assert np.array_equal(snap_to_grid(y, 32), y)  # points on the grid stay put
    assert np.array_equal(snap_to_grid(np.eye(4)[2], 7), np.eye(4)[2])
    with pytest.raises(ValueError, match="grid"):
        snap_to_grid(x, -1)


def test_psi_family_on_a_grid_recurs_under_small_moves():
    psi = np.array([0.5, 0.3, 0.15, 0.05])
    moved = psi + np.array([0.004, -0.003, 0.001, -0.002])
    a, b = psi_family(psi, 4, grid=32), psi_family(moved, 4, grid=32)
    assert all(np.array_equal(a[p], b[p]) for p in PSI_POWERS)  # the same merges replay
    assert not np.array_equal(psi_family(psi, 4)[1.0], psi_family(moved, 4)[1.0])


class _FakeMoE:
    tasks = ["SST-2", "QNLI"]
    num_experts = 2

    def merged_state(self, x, op):
        return np.asarray(x, dtype=float)


class _FakePool:
    """Credit of x on task v: x_v on half A; on half B, x_v for SST-2 but 1 - x_v for QNLI (so a
    choice made on A can lose on B)."""

    def credit(self, tasks, mode="merged", state=None):
        return {t: (float(state[i]), float(state[i] if t == "SST-2" else 1 - state[i]))
                for i, t in enumerate(["SST-2", "QNLI"]) if t in tasks}

    def screen(self, tasks, state):
        return {t: v[0] for t, v in self.credit(tasks, state=state).items()}


def test_landscape_chooses_on_half_a_and_scores_on_half_b():
    mixes = [np.array([0.2, 0.8])]
    res = landscape(_FakeMoE(), _FakePool(), mixes, "linear", budget=2, random_candidates=3,
                    finalists=1, seed=0, progress=False)
    m = res["mixes"][0]
    fam = psi_family(mixes[0], 2)
    # on A the sharpest power wins (most weight on QNLI); on B that costs QNLI
    assert m["best_psi_power"] == 4.0
    want_b = 0.2 * fam[4.0][0] + 0.8 * (1 - fam[4.0][1])
    assert m["best_psi_family"] == pytest.approx(want_b)
    assert m["psi_merge"] == pytest.approx(0.2 * 0.2 + 0.8 * 0.2)
    assert m["uniform"] == pytest.approx(0.5)
    assert m["best_search_on_selection_half"] >= 0.2 * fam[4.0][0] + 0.8 * fam[4.0][1] - 1e-12
    assert res["mean"]["psi2"] == pytest.approx(0.2 * fam[2.0][0] + 0.8 * (1 - fam[2.0][1]))


class _LayeredMoE(_FakeMoE):
    """Two MoE layers; a state holds x per layer."""

    def merged_state(self, x, op):
        return {"w": torch.as_tensor(np.stack([x, x]))}


class _LayeredPool(_FakePool):
    """SST-2 reads the lower layer's x, QNLI the upper layer's, on both halves: one x per layer half
    can serve both tasks at once, one x for all layers cannot."""

    def credit(self, tasks, mode="merged", state=None):
        w = state["w"].numpy()
        return {t: (float(w[layer, i]),) * 2 for i, (t, layer) in enumerate([("SST-2", 0), ("QNLI", 1)]) if t in tasks}


def test_split_state_takes_the_lower_half_from_one_merge_and_the_rest_from_the_other():
    lower, upper = {"w": torch.zeros(4, 3)}, {"w": torch.ones(4, 3)}
    assert split_state(lower, upper)["w"][:, 0].tolist() == [0, 0, 1, 1]


def test_layer_split_finds_one_power_per_layer_half():
    mixes = [np.array([0.2, 0.8])]
    res = landscape(_LayeredMoE(), _LayeredPool(), mixes, "linear", budget=2, random_candidates=0,
                    finalists=0, seed=0, progress=False, layer_split=True)
    m, fam = res["mixes"][0], psi_family(mixes[0], 2)
    # the lower layers want the most SST-2 weight (the flattest power), the upper the most QNLI
    assert m["layer_split_powers"] == [0.5, 4.0]
    assert m["best_layer_split"] == pytest.approx(0.2 * fam[0.5][0] + 0.8 * fam[4.0][1])
    assert m["best_layer_split"] > m["best_psi_family"] == pytest.approx(m["best_psi_family_in_hindsight"])
    assert "best_layer_split" not in landscape(_LayeredMoE(), _LayeredPool(), mixes, "linear", budget=2,
                                               random_candidates=0, finalists=0, seed=0, progress=False)["mean"]
