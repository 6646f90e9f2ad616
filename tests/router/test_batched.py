"""select_many / update_many: one call per slot for the whole fleet, the same choices and learning as
node by node."""

import numpy as np
import pytest

from tanbr_ray.router import BanditConfig, NucbPolicy, Tanbr, TanbrConfig, TreeConfig, UniformPolicy
from tanbr_ray.router.synthetic import SyntheticConfig, SyntheticEnv


def _tanbr(sgd_steps=1, psi_candidates=False, prior=0.0):
    cfg = TanbrConfig(tree=TreeConfig(max_nodes=63, probes=3), psi_candidates=psi_candidates,
                      bandit=BanditConfig(width=16, sgd_steps=sgd_steps, seed=0, gamma=0.5, prior=prior))
    return Tanbr(5, 4, cfg)


def _slot(env, t, nodes):
    rng = np.random.default_rng(t)
    psis = np.stack([0.7 * env.psi(t) + 0.3 * rng.dirichlet(np.ones(4)) for _ in range(nodes)])
    return psis / psis.sum(1, keepdims=True)


def _feedback(env, xs):
    return np.stack([env.sample_rewards(x) for x in xs])


@pytest.mark.parametrize("make", [lambda: _tanbr(), lambda: _tanbr(psi_candidates=True, prior=0.3),
                                  lambda: NucbPolicy(5, 4, BanditConfig(width=16, seed=0, gamma=0.5))])
def test_select_many_equals_select_node_by_node_as_the_tree_grows(make):
    """Two copies fed the same feedback: one decides with select_many, the other with select per node;
    every choice agrees, on a tiny tree through its splits, under mixed budgets."""
    env = SyntheticEnv(SyntheticConfig(num_experts=5, num_tasks=4, budget=5, seed=2))
    batched, serial = make(), make()
    budgets = [5, 3, 5, 2, 3, 5]
    for t in range(12):
        psis = _slot(env, t, len(budgets))
        xs = batched.select_many(psis, budgets)
        assert np.array_equal(xs, np.stack([serial.select(p, b) for p, b in zip(psis, budgets)]))
        rewards = _feedback(env, xs)
        batched.update_many(xs, psis, rewards)
        serial.update_many(xs, psis, rewards)
    if isinstance(batched, Tanbr):
        assert batched.tree.size > 1  # the tree did split meanwhile


def test_update_many_equals_serial_updates_without_steps_between():
    """With no gradient steps between them (sgd_steps=0) a slot's batched update is the serial one
    exactly: tree visits (every node's play counts), A, replay buffer, then the next choices."""
    env = SyntheticEnv(SyntheticConfig(num_experts=5, num_tasks=4, budget=5, seed=1))
    batched, serial = _tanbr(sgd_steps=0), _tanbr(sgd_steps=0)
    budgets = [5] * 5
    for t in range(8):
        psis = _slot(env, t, 5)
        xs = batched.select_many(psis, budgets)
        assert np.array_equal(xs, serial.select_many(psis, budgets))
        rewards = _feedback(env, xs)
        batched.update_many(xs, psis, rewards)
        for row in zip(xs, psis, rewards):
            serial.update(*row)
    assert batched.tree.size == serial.tree.size > 1
    assert np.array_equal(batched.tree.visits, serial.tree.visits)
    assert batched.pending == serial.pending == {}
    a, b = batched.bandit.tensors(), serial.bandit.tensors()
    for k in a:
        assert np.allclose(a[k].numpy(), b[k].numpy(), rtol=1e-10, atol=1e-12), k


def test_every_play_of_the_same_x_visits_its_leaf():
    """Three nodes with one mix play the root's same point: all three plays count."""
    router = _tanbr(sgd_steps=0)
    psis = np.tile([0.25, 0.25, 0.25, 0.25], (3, 1))
    xs = router.select_many(psis, [5, 5, 5])
    assert len({x.tobytes() for x in xs}) == 1
    router.update_many(xs, psis, np.full((3, 4), 0.5))
    assert router.tree.visits[0] == 1 and router.tree.size == 3  # the root split at its first visit...
    assert router.tree.visits[1:3].sum() == 0  # ...and the later plays found their leaf gone
    assert router.pending == {} and router.updates == 3


def test_bad_fleet_input_is_refused_whole():
    router = _tanbr()
    psis = np.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="budgets"):
        router.select_many(psis, [5])
    with pytest.raises(ValueError, match="budget"):
        router.select_many(psis, [5, 6])
    with pytest.raises(ValueError, match="psi"):
        router.select_many([[0.5, 0.6, 0.0, 0.0], [0.25] * 4], [5, 5])
    assert router.pending == {}  # nothing half-decided
    xs = router.select_many(psis, [5, 5])
    with pytest.raises(ValueError, match="one of each per node"):
        router.update_many(xs, psis, np.full((1, 4), 0.5))
    with pytest.raises(ValueError, match="rewards"):
        router.update_many(xs, psis, [[0.5] * 4, [np.nan] * 4])
    assert router.updates == 0 and router.bandit.n_seen == 0


def test_static_policies_batch_node_by_node():
    pol = UniformPolicy(4, 4)
    xs = pol.select_many(np.full((3, 4), 0.25), [4, 2, None])
    assert np.allclose(xs[0], 0.25) and np.count_nonzero(xs[1]) == 2 and np.allclose(xs[2], 0.25)
    assert pol.select_many(np.zeros((0, 4)), []).shape == (0, 4)
