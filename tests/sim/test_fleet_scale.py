"""Fleet scale: packaged 8 / 32 / 128-node fleets, a 32-node tiny fleet through the slot loop, the
fleet benchmark's pieces, and fleet files that cannot be simulated."""

import numpy as np
import pytest

from tanbr_ray.bench import fleet as bench
from tanbr_ray.sim.fleet import Fleet, load_fleet
from tanbr_ray.sim.loop import run_simulation

from tests.sim.test_loop import _cfg, tiny_moe  # noqa: F401  (module fixture)

def test_packaged_fleets_keep_the_default_classes_and_per_node_rates():
    default = load_fleet("default")
    by_name = {c.name: c for c in default.classes}
    for name, n in (("8", 8), ("32", 32), ("128", 128)):
        f = load_fleet(name)
        assert len(f.nodes()) == n
        assert [c.name for c in f.classes] == list(by_name)
        for c in f.classes:  # only the counts differ
            assert c.model_dump(exclude={"count"}) == by_name[c.name].model_dump(exclude={"count"})
        counts = np.array([c.count for c in f.classes])
        assert np.all(np.abs(counts / n - np.array([4, 3, 2]) / 9) < 0.07)  # the default's 4 : 3 : 2


def test_a_32_node_tiny_fleet_runs_a_few_slots(tiny_moe):
    """Every node decided each slot by one batched call; the slot's wall time split adds up."""
    cfg = _cfg(slots=3, policies=["Tanbr"], scored_per_slot=2, slot_seconds=30)  # a board: ~15 requests a slot
    r = bench.slot_costs(tiny_moe, cfg, load_fleet("32"), progress=False)
    assert r["nodes"] == 32 and r["slots"] == 3
    assert r["scored_per_slot"] == 64  # 2 per node-slot
    assert r["seconds_per_slot"] > 0 and all(v >= 0 for k, v in r["split"].items() if k != "rest")
    assert sum(r["split"].values()) == pytest.approx(r["seconds_per_slot"])
    out = run_simulation(cfg, tiny_moe, fleet=load_fleet("32"), progress=False)
    choices = out.series["Tanbr"].choices
    assert choices.shape == (3, 32, 2) and np.allclose(choices.sum(-1), 1.0)
    distinct = [len({x.tobytes() for x in choices[t]}) for t in (1, 2)]  # the same seeded run: same choices
    assert r["distinct_x_per_slot"] == np.mean(distinct) and max(distinct) > 1  # nodes' mixes differ
    split = out.summary["policies"]["Tanbr"]["wall_seconds_split"]
    assert split["total"] == pytest.approx(sum(split[k] for k in bench.PARTS))


def test_decision_timing_reports_from_the_grown_tree():
    t = bench.decision_timing(8, nodes=16, budget=8, grow=30, calls=2)
    grown, _ = bench.grown_tanbr(8, 8, 30)
    assert t["candidates"] == len(grown.tree.candidate_points(8)[0]) > 8  # the tree split while growing
    assert t["nodes"] == 16 and t["grown_rounds"] == 30
    assert 0 < t["select_ms_p50"] <= t["select_ms_p99"]
    assert t["select_many_ms_p50"] > 0 and t["update_many_ms_p50"] > 0


def test_targets_and_plot(tmp_path):
    out = {"nodes": [8, 32, 128], "seconds_per_slot": [1.0, 4.0, 16.0], "cost_slope": 1.0,
           "split": {p: [0.25, 1.0, 4.0] for p in bench.PARTS}, "decide_share_at_max": 0.25,
           "select_many_ms": {"K8_N128": 10.0, "K192_N128": 200.0}, "update_many_ms": {"N128": 20.0},
           "select_ms_p50_K8": 0.5}
    verdict = {row[0]: row[3] for row in bench.targets(out)}
    assert verdict["select_many K=8, 128 nodes (ms)"] == "met"
    assert verdict["select_many K=192, 128 nodes (ms)"] == "MISSED"
    assert verdict["decide share at the largest fleet"] == "MISSED"
    bench.plot(out, str(tmp_path / "fleet.png"))
    assert (tmp_path / "fleet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("text, field", [
    ("classes: []\n", "classes"),
    ("classes:\n  - {name: board, count: 0, slowdown: 1, memory_x_dense: 1, bandwidth_mbps: 1, rtt_ms: 1, rate: 1}\n", "count"),
    ("classes:\n  - {name: board, count: -3, slowdown: 1, memory_x_dense: 1, bandwidth_mbps: 1, rtt_ms: 1, rate: 1}\n", "count"),
])
def test_fleet_files_that_cannot_be_simulated_name_the_field(tmp_path, text, field):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=field) as err:
        load_fleet(path)
    assert "fleet.yaml" in str(err.value)
    assert path.read_text() == text  # refused, not rewritten


def test_budgets_above_k_are_refused_before_anything_runs(tiny_moe):
    big = Fleet(classes=[load_fleet("32").classes[0].model_copy(update={"budget": 3})])  # the tiny MoE has 2 experts
    with pytest.raises(ValueError, match="budget 3 > 2 experts"):
        bench.slot_costs(tiny_moe, _cfg(slots=2, policies=["Tanbr"]), big, progress=False)
    with pytest.raises(ValueError, match="fleet"):
        load_fleet("64")  # not a packaged fleet, and no such file
