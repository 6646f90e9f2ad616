"""The registry is the one list of policy names: every consumer takes its names from it."""

import ast
from pathlib import Path

import pytest

from tanbr_ray.router import registry

PACKAGE = Path(__file__).resolve().parents[2] / "tanbr_ray"


def test_no_other_module_lists_policy_names():
    """No module but the registry holds a literal list, tuple, set or dict of two or more policy names."""
    names = set(registry.POLICIES)
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "registry.py" and path.parent.name == "router":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            elts = node.elts if isinstance(node, (ast.List, ast.Tuple, ast.Set)) else (
                node.keys if isinstance(node, ast.Dict) else [])
            hits = [e.value for e in elts if isinstance(e, ast.Constant) and e.value in names]
            if len(hits) >= 2:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {hits}")
    assert not found, found


def test_consumers_take_their_names_from_the_registry():
    from tanbr_ray.bench import regret
    from tanbr_ray.sim.config import SimConfig
    from tanbr_ray.tune import trainable

    assert SimConfig().policies == registry.names("simulation")
    out, _ = regret.run(rounds=10, seeds=1, policies=None, num_experts=3, num_tasks=2, budget=2, progress=False)
    assert list(out["policies"]) == registry.names("picks_x")
    assert trainable.POLICY in registry.names("served")
    for name in registry.names("simulation"):
        info = registry.info(name, "simulation")
        assert info.picks_x == (info.serving is None) and info.description


def test_oracle_names_one_thing():
    """"Oracle" is the task-tagged serving mode; the reward's argmax of the regret bench is "Best-x"."""
    assert registry.POLICIES["Oracle"].serving == ("oracle",) and registry.POLICIES["Oracle"].kind == "tagged"
    assert "Best-x" not in registry.names("simulation") and "Best-x" in registry.names("picks_x")
    with pytest.raises(ValueError, match="Best-x"):
        registry.make_policy("Best-x", 3, 2)  # needs the reward's argmax
    with pytest.raises(ValueError, match="unknown policy 'Oracle'.*Tanbr"):
        registry.info("Oracle", "served")


def test_decision_service_accepts_exactly_the_served_policies():
    from tanbr_ray.sim.config import SimConfig

    with pytest.raises(ValueError, match="unknown policy 'Best-x'"):
        SimConfig(policies=["Best-x"])
    assert [p for p in registry.names("served") if registry.POLICIES[p].checkpointable] == ["Tanbr", "Uniform", "psi-merge"]
