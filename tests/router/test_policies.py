import numpy as np
import pytest

from tanbr_ray.bench.regret import make_policy, run_one
from tanbr_ray.router import (HOOPolicy, NucbPolicy, PsiMergePolicy, RandomPolicy, Tanbr, TanbrConfig,
                              TreeConfig, UniformPolicy)
from tanbr_ray.router.synthetic import SyntheticConfig, SyntheticEnv

NAMES = ["Tanbr", "Nucb", "HOO", "Random", "Uniform", "psi-merge", "Best-x"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("budget", [1, 3, 6])
def test_every_choice_is_feasible(name, budget):
    env = SyntheticEnv(SyntheticConfig(num_experts=6, num_tasks=4, budget=budget, schedule="switching",
                                       rounds=30, seed=1))
    policy = make_policy(name, env, seed=0)
    assert policy.name == name
    for t in range(30):
        psi = env.psi(t)
        x = policy.select(psi, budget)
        assert np.all(x >= 0) and abs(x.sum() - 1) <= 1e-6 and np.count_nonzero(x) <= budget
        policy.update(x, psi, env.sample_rewards(x))


def test_psi_merge_and_uniform():
    psi = np.array([0.5, 0.3, 0.2, 0.0])
    assert np.allclose(PsiMergePolicy(4, 4).select(psi, 4), psi)
    assert np.allclose(PsiMergePolicy(4, 4).select(psi, 2), [0.625, 0.375, 0, 0])
    assert np.array_equal(PsiMergePolicy(4, 4, grid=8).select(psi, 2), [0.625, 0.375, 0, 0])  # on the grid
    assert np.array_equal(PsiMergePolicy(4, 4, grid=4).select(psi, 2), [0.75, 0.25, 0, 0])
    assert np.allclose(UniformPolicy(4, 4).select(psi, 4), 0.25)
    assert np.allclose(UniformPolicy(4, 4).select(psi, 2), [0.5, 0.5, 0, 0])


def test_random_covers_supports():
    pol = RandomPolicy(6, 2, seed=0)
    supports = {tuple(np.nonzero(pol.select([0.5, 0.5], 2))[0]) for _ in range(200)}
    assert len(supports) == 15  # all C(6, 2) supports


def test_random_on_points_plays_only_its_fixed_draws():
    from tanbr_ray.simplex import random_points

    pts = random_points(6, 2, 10)
    assert np.array_equal(random_points(6, 2, 4), pts[:4])  # prefix-stable
    assert all((p > 0).sum() == 2 and np.isclose(p.sum(), 1) for p in pts)
    a, b = RandomPolicy(6, 2, seed=0, points=10), RandomPolicy(6, 2, seed=1, points=10)
    played = [a.select([0.5, 0.5], 2) for _ in range(60)]
    assert {p.tobytes() for p in played} <= {p.tobytes() for p in pts}  # the same set for every seed ...
    assert len({p.tobytes() for p in played}) == 10
    assert any(not np.array_equal(x, b.select([0.5, 0.5], 2)) for x in played[:10])  # ... picked by the seed
    with pytest.raises(ValueError, match="random_points"):
        RandomPolicy(6, 2, points=-1)


def test_tanbr_learns_faster_than_random():
    cfg = SyntheticConfig(rounds=300, seed=0)
    tanbr = run_one("Tanbr", cfg)["cumulative"][-1]
    rnd = run_one("Random", cfg)["cumulative"][-1]
    assert tanbr < 0.5 * rnd


def test_tanbr_deterministic_for_a_seed():
    cfg = SyntheticConfig(rounds=40, seed=3, schedule="drifting")
    assert np.array_equal(run_one("Tanbr", cfg)["cumulative"], run_one("Tanbr", cfg)["cumulative"])


@pytest.mark.parametrize("policy", [Tanbr(4, 3), NucbPolicy(4, 3), HOOPolicy(4, 3), UniformPolicy(4, 3)])
def test_bad_input_names_the_field(policy):
    good_psi = np.array([0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="psi"):
        policy.select([0.5, 0.6, 0.1], 2)  # sums to 1.2
    with pytest.raises(ValueError, match="psi"):
        policy.select([-0.1, 0.6, 0.5], 2)
    with pytest.raises(ValueError, match="psi"):
        policy.select([0.5, 0.5], 2)  # wrong length
    with pytest.raises(ValueError, match="psi"):
        policy.select([np.nan, 0.5, 0.5], 2)
    with pytest.raises(ValueError, match="budget"):
        policy.select(good_psi, 5)  # > K
    with pytest.raises(ValueError, match="budget"):
        policy.select(good_psi, 0)
    x = policy.select(good_psi, 2)
    with pytest.raises(ValueError, match="rewards"):
        policy.update(x, good_psi, [0.5, np.nan, 0.2])
    with pytest.raises(ValueError, match="rewards"):
        policy.update(x, good_psi, [0.5, 0.2])
    with pytest.raises(ValueError, match="x"):
        policy.update([0.5, 0.5, 0.5, -0.5], good_psi, [0.1, 0.2, 0.3])


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="rho"):
        TanbrConfig(tree={"rho": 1.2})
    with pytest.raises(ValueError, match="rho"):
        HOOPolicy(4, 2, rho=0.0)
    with pytest.raises(ValueError, match="max_nodes"):
        TreeConfig(max_nodes=0)
    with pytest.raises(ValueError, match="unknown_knob"):
        TanbrConfig(bandit={"unknown_knob": 1})


def test_unobserved_tasks_are_masked_not_invented():
    psi = np.array([0.5, 0.5, 0.0])
    for policy in (Tanbr(4, 3), NucbPolicy(4, 3), HOOPolicy(4, 3)):
        x = policy.select(psi, 4)
        policy.update(x, psi, [0.8, np.nan, np.nan], observed=[True, False, False])
        with pytest.raises(ValueError, match="rewards"):
            policy.update(x, psi, [np.nan, 0.1, 0.1], observed=[True, True, False])
        with pytest.raises(ValueError, match="observed"):
            policy.update(x, psi, [0.1, 0.1, 0.1], observed=[True, False])
    b = Tanbr(4, 3).bandit
    for _ in range(50):
        b.observe(np.full(4, 0.25), psi, np.array([0.9, 0.0, 0.0]), np.array([True, False, False]))
    assert abs(b.predict(np.full((1, 4), 0.25))[0, 0] - 0.9) < 0.05
