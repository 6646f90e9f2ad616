import numpy as np
import pytest

from tanbr_ray.router.tree import PartitionTree, TreeConfig, representatives, tighten


def _check_feasible(cands, budget):
    assert np.all(cands >= 0)
    assert np.allclose(cands.sum(1), 1.0, atol=1e-6)
    assert np.all((cands > 0).sum(1) <= budget)


def test_root_is_uniform_merge():
    tree = PartitionTree(6)
    assert np.allclose(tree.candidates(6), 1 / 6)
    assert tree.leaves.tolist() == [0]


def test_splits_follow_threshold():
    cfg = TreeConfig(rho=0.5, tau0=2.0, max_nodes=1023)
    tree = PartitionTree(4, cfg)
    assert [tree.threshold(h) for h in range(4)] == [2, 4, 8, 16]
    assert tree.visit(0) is None  # 1 < 2
    children = tree.visit(0)     # 2 >= 2: split
    assert children == (1, 2)
    assert tree.leaves.tolist() == [1, 2]
    for _ in range(3):
        assert tree.visit(1) is None
    assert tree.visit(1) == (3, 4)  # depth 1 needs 4 visits
    assert tree.depth[3] == 2 and tree.parent[3] == 1


def test_children_partition_parent_and_candidates_feasible():
    rng = np.random.default_rng(0)
    tree = PartitionTree(8, TreeConfig(max_nodes=201))
    while tree.size < 201:
        leaf = int(rng.choice(tree.leaves))
        tree.split(leaf)
        if tree.size + 2 > 201:
            break
    for b in (1, 3, 8):
        _check_feasible(tree.candidates(b), b)
    # every random point of the simplex lies in exactly one leaf
    for x in rng.dirichlet(np.ones(8), size=200):
        assert sum(tree.contains(int(leaf), x) for leaf in tree.leaves) >= 1
    # representatives lie inside their own region
    for leaf in tree.leaves:
        assert tree.contains(int(leaf), tree.rep[leaf])


def test_probe_points_lie_in_their_leaf_and_are_fixed_per_node():
    rng = np.random.default_rng(1)
    tree = PartitionTree(8, TreeConfig(probes=5))
    for _ in range(20):
        tree.split(int(rng.choice(tree.leaves)))
    pts, owner = tree.candidate_points(8)
    assert len(pts) == 6 * len(tree.leaves) and set(owner.tolist()) == set(tree.leaves.tolist())
    _check_feasible(pts, 8)
    for x, leaf in zip(pts, owner):
        assert tree.contains(int(leaf), x)
    assert len({x.tobytes() for x in pts}) == len(pts)  # probes differ from the centre and each other
    again = PartitionTree.from_state_dict(tree.state_dict())
    assert np.array_equal(again.candidate_points(3)[0], tree.candidate_points(3)[0])
    _check_feasible(tree.candidate_points(2)[0], 2)
    assert len(PartitionTree(8, TreeConfig(probes=0)).candidate_points(8)[0]) == 1


def test_tightened_box_is_exact_range():
    lo = np.array([[0.0, 0.5, 0.0]])
    hi = np.array([[1.0, 1.0, 0.2]])
    tlo, thi = tighten(lo, hi)
    assert np.allclose(tlo, [[0.0, 0.5, 0.0]]) and np.allclose(thi, [[0.5, 1.0, 0.2]])
    rep = representatives(tlo, thi)[0]
    assert abs(rep.sum() - 1) < 1e-12 and np.all(rep >= tlo[0] - 1e-12) and np.all(rep <= thi[0] + 1e-12)


def test_caps_hold_and_memory_is_flat():
    tree = PartitionTree(8, TreeConfig(max_nodes=31, max_depth=3, tau0=1.0, rho=0.9))
    nbytes = tree.lo.nbytes + tree.hi.nbytes + tree.rep.nbytes
    rng = np.random.default_rng(1)
    for _ in range(2000):
        tree.visit(int(rng.choice(tree.leaves)))
    assert tree.size <= 31
    assert tree.depth[:tree.size].max() <= 3
    assert tree.lo.nbytes + tree.hi.nbytes + tree.rep.nbytes == nbytes
    tree2 = PartitionTree(8, TreeConfig(max_nodes=15, max_depth=60, tau0=1.0))
    for _ in range(500):
        tree2.visit(int(tree2.leaves[0]))
    assert tree2.size == 15


def test_state_round_trip():
    tree = PartitionTree(5, TreeConfig(tau0=1.0))
    for _ in range(6):
        tree.visit(int(tree.leaves[-1]))
    assert tree.size > 3
    with pytest.raises(ValueError, match="node"):
        tree.visit(0)  # split long ago: no longer a leaf
    again = PartitionTree.from_state_dict(tree.state_dict())
    assert np.array_equal(again.candidates(3), tree.candidates(3))
    assert np.array_equal(again.leaves, tree.leaves)


@pytest.mark.parametrize("rho", [0.0, 1.0, -0.2, 1.5])
def test_rho_outside_unit_interval_rejected(rho):
    with pytest.raises(ValueError, match="rho"):
        TreeConfig(rho=rho)
