import numpy as np
import pytest

from tanbr_ray.router.synthetic import SyntheticConfig, SyntheticEnv


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimum_is_certified_and_unbeaten(seed):
    env = SyntheticEnv(SyntheticConfig(seed=seed))
    psi = env.psi(0)
    x, value, gap = env.optimum(psi)
    assert gap < 1e-6
    samples = np.random.default_rng(seed).dirichlet(np.ones(8), size=20000)
    assert (env.mean_rewards(samples) @ psi).max() <= value + 1e-9
    assert value > env.objective(np.full(8, 1 / 8), psi) + 0.02  # not trivially uniform


def test_budgeted_optimum_is_sparse():
    env = SyntheticEnv(SyntheticConfig(num_experts=12, budget=3, seed=0))
    x, value, _ = env.optimum(env.psi(0))
    assert np.count_nonzero(x) <= 3 and abs(x.sum() - 1) < 1e-9


def test_schedules():
    T = 100
    stat = SyntheticEnv(SyntheticConfig(schedule="stationary", rounds=T))
    assert np.array_equal(stat.psi(0), stat.psi(99))
    sw = SyntheticEnv(SyntheticConfig(schedule="switching", rounds=T))
    assert np.array_equal(sw.psi(0), sw.psi(19)) and not np.array_equal(sw.psi(19), sw.psi(20))
    dr = SyntheticEnv(SyntheticConfig(schedule="drifting", rounds=T))
    steps = [np.abs(dr.psi(t + 1) - dr.psi(t)).sum() for t in range(T - 1)]
    assert 0 < max(steps) < 0.2  # changes every round, never abruptly
    for t in range(T):
        assert abs(dr.psi(t).sum() - 1) < 1e-12
