import pytest
import numpy as np
import torch

from tanbr_ray.router.bandit import BanditConfig, NeuralUCB


def _trained(full: bool) -> NeuralUCB:
    b = NeuralUCB(5, 3, BanditConfig(full_covariance=full, width=16, seed=2))
    rng = np.random.default_rng(0)
    for _ in range(6):
        b.observe(rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(3)), rng.random(3))
    return b


def test_diagonal_width_equals_torch_func_gradients():
    b = _trained(full=False)
    rng = np.random.default_rng(1)
    xs, psi = rng.dirichlet(np.ones(5), size=40), rng.dirichlet(np.ones(3))
    _, width = b.ucb(xs, psi)
    g = b._per_sample_grads(torch.as_tensor(xs), torch.as_tensor(psi).expand(len(xs), -1))
    a_diag = torch.cat([b.A_diag[k].flatten() for k in b.params])
    expected = torch.sqrt((g ** 2 / a_diag).sum(1)).numpy()
    assert np.allclose(width, expected, rtol=1e-5, atol=1e-7)  # candidates are scored in float32


def test_ucb_many_equals_ucb_per_mix():
    """The batched widths psi^T G(x) psi are the per-mix backward passes, for every mix."""
    b = _trained(full=False)
    rng = np.random.default_rng(3)
    xs, psis = rng.dirichlet(np.ones(5), size=30), rng.dirichlet(np.ones(3), size=7)
    mean, width = b.ucb_many(xs, psis)
    assert mean.shape == width.shape == (7, 30)
    for i, psi in enumerate(psis):
        m1, w1 = b.ucb(xs, psi)
        assert np.allclose(mean[i], m1, rtol=1e-5, atol=1e-6)
        assert np.allclose(width[i], w1, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("full", [False, True])
def test_observe_many_accumulates_every_rows_gradient(full):
    """A += sum of g g^T over a batch, each g at the same parameters (sgd_steps=0: no step between),
    equals observing the rows one by one; the buffer holds the same rows in the same order."""
    cfg = BanditConfig(full_covariance=full, width=8, sgd_steps=0, seed=4)
    one, many = NeuralUCB(4, 3, cfg), NeuralUCB(4, 3, cfg)
    rng = np.random.default_rng(0)
    xs, psis, rs = rng.dirichlet(np.ones(4), size=6), rng.dirichlet(np.ones(3), size=6), rng.random((6, 3))
    masks = rng.random((6, 3)) < 0.7
    g = one._per_sample_grads(torch.as_tensor(xs), torch.as_tensor(psis))
    for row in zip(xs, psis, rs, masks):
        one.observe(*row)
    many.observe_many(xs, psis, rs, masks)
    a, b = one.tensors(), many.tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-10, atol=1e-12), k
    if not full:
        a_diag = torch.cat([many.A_diag[k].flatten() for k in many.params])
        assert torch.allclose(a_diag, 1.0 + (g ** 2).sum(0), rtol=1e-10)


def test_observe_many_trains_j_steps_per_call_and_keeps_the_newest_rows():
    cfg = BanditConfig(width=8, sgd_steps=3, history=4, seed=1)
    b = NeuralUCB(3, 2, cfg)
    rng = np.random.default_rng(0)
    xs = rng.dirichlet(np.ones(3), size=6)
    b.observe_many(xs, np.full((6, 2), 0.5), rng.random((6, 2)))
    assert b.n_seen == 6
    assert int(b.opt.state[next(b.net.parameters())]["step"]) == 3
    kept = b.tensors()["buf_x"].numpy()  # ring positions: rows 4, 5 overwrote slots 0, 1
    assert np.allclose(kept, xs[[4, 5, 2, 3]])


def test_full_covariance_matches_explicit_inverse():
    b = NeuralUCB(4, 2, BanditConfig(full_covariance=True, width=8, depth=1, sgd_steps=0, lam=1.0))
    rng = np.random.default_rng(0)
    played = [(rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(2))) for _ in range(5)]
    A = torch.eye(b.num_params, dtype=torch.float64)
    for x, psi in played:
        g = b._per_sample_grads(torch.as_tensor(x)[None], torch.as_tensor(psi)[None])[0]
        A += torch.outer(g, g)
        b.observe(x, psi, rng.random(2))
    assert torch.allclose(b.A_inv, torch.linalg.inv(A), atol=1e-8)


def test_width_shrinks_where_played_and_model_fits():
    b = NeuralUCB(3, 1, BanditConfig(width=32, sgd_steps=20, lr=1e-2))
    x, far, psi = np.array([0.8, 0.1, 0.1]), np.array([0.1, 0.1, 0.8]), np.array([1.0])
    _, w0 = b.ucb(np.stack([x, far]), psi)
    for _ in range(60):
        b.observe(x, psi, np.array([0.7]))
    mean, w1 = b.ucb(np.stack([x, far]), psi)
    assert w1[0] < 0.5 * w0[0]
    assert w1[0] < w1[1]
    assert abs(mean[0] - 0.7) < 0.05


def test_seeded_determinism():
    a, b = _trained(False), _trained(False)
    xs = np.random.default_rng(5).dirichlet(np.ones(5), size=10)
    assert np.array_equal(a.ucb(xs, np.ones(3) / 3)[0], b.ucb(xs, np.ones(3) / 3)[0])


def test_prior_starts_at_the_sharpened_psi_merge_and_the_mlp_learns_the_rest():
    import numpy as np
    import pytest

    from tanbr_ray.router.bandit import BanditConfig, NeuralUCB
    from tanbr_ray.router.tanbr import Tanbr, TanbrConfig

    K = V = 4
    b = NeuralUCB(K, V, BanditConfig(prior=0.3, prior_power=2.0, seed=1))
    psi = np.array([0.6, 0.3, 0.1, 0.0])
    from tanbr_ray.router.tree import TreeConfig

    t = Tanbr(K, V, TanbrConfig(bandit=BanditConfig(prior=0.3, gamma=0.0), tree=TreeConfig(nu=0.0), psi_candidates=True))
    fam = t.psi_family(psi, K)  # p = 0.5, 1, 2, 4
    mean, _ = b.ucb(np.vstack([fam, np.full(K, 0.25)]), psi)
    assert int(np.argmax(mean)) == 2  # x ∝ psi² is the prior's optimum for p = 2
    assert np.allclose(b.predict(fam)[:, 3], -0.3 / 0.5)  # no expert weight: the curve's floor -c/a
    # p = 1 (log curve) puts the prior's optimum at ψ-merge itself
    b1 = NeuralUCB(K, V, BanditConfig(prior=0.3, prior_power=1.0, seed=1))
    mean1, _ = b1.ucb(np.vstack([fam, np.full(K, 0.25)]), psi)
    assert int(np.argmax(mean1)) == 1
    # an untrained Tanbr with the prior plays the sharpened point, and validates task_experts
    x = t.select(psi, K)
    assert np.allclose(x, fam[2])
    with pytest.raises(ValueError, match="task_experts"):
        NeuralUCB(K, V, BanditConfig(prior=0.1), task_experts=[0, 1, 2, 9])
    # the residual learns: a reward the prior does not predict is fitted after a few observations
    xs = np.eye(K)[0]
    for _ in range(60):
        b.observe(xs, psi, np.array([0.9, 0.1, 0.1, 0.1]))
    assert abs(b.predict(xs[None])[0, 0] - 0.9) < 0.1 and b.predict(xs[None])[0, 0] != pytest.approx(0.0)


def test_psi_weighting_ignores_the_rewards_of_tasks_a_node_does_not_serve():
    """A task's reward is a mean over ~psi_v x the sample, so psi weighs its squared error: a task at
    psi = 0 moves nothing (its output stays at the prior), while unweighted its noise is fitted."""
    import numpy as np
    import torch

    from tanbr_ray.router.bandit import BanditConfig, NeuralUCB

    K = V = 3
    psi = np.array([0.5, 0.0, 0.5])
    rng = np.random.default_rng(0)
    nets = {w: NeuralUCB(K, V, BanditConfig(prior=0.3, prior_power=1.0, psi_weighted=w, seed=2)) for w in (False, True)}
    xs = rng.dirichlet(np.ones(K), size=20)
    for x in xs:
        r = np.array([0.7, rng.random(), 0.6])
        for b in nets.values():
            b.observe(x, psi, r)
    prior = nets[True].prior_of(torch.as_tensor(xs)).numpy()
    assert np.allclose(nets[True].predict(xs)[:, 1], prior[:, 1])
    assert not np.allclose(nets[False].predict(xs)[:, 1], prior[:, 1])
