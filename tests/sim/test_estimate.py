"""What a run says it will cost before it starts."""

import pytest

from tanbr_ray.sim.config import load_config
from tanbr_ray.sim.costs import Costs
from tanbr_ray.sim.estimate import MERGE_SHARE, build_line, estimate


def test_estimate_counts_the_run_and_prices_it_by_the_measured_costs():
    cfg = load_config("default", ["seeds=2", "policies=[Tanbr,RegMean]", "slots=10", "slot_seconds=10"])
    costs = Costs({"merged": [2.0 + 2.0 * b for b in range(16)]}, {"merged": 1}, 1, 1)  # 2 ms per request at batch 16
    rates = [10.0, 10.0, 1.0]  # the third node receives 10 requests a slot: fewer than 24 to score
    e = estimate(cfg, costs, rates, merge_s=0.2, memo_entries=0)
    assert e.scored == 2 * 10 * (24 + 24 + 10) * 2
    merges = 1 * 10 * 3 * 2  # Tanbr merges; RegMean serves one static merge
    assert e.seconds == pytest.approx(e.scored * 0.002 + merges * MERGE_SHARE * 0.2)
    assert "2 policies × 10 slots × 3 nodes × 2 seed(s) ≈ 2,320 scored requests" in e.lines()[0]
    assert len(e.lines()) == 1 and len(estimate(cfg, costs, rates, 0.2, memo_entries=500).lines()) == 2
    one_thread = Costs(costs.batch_ms, {"merged": 1}, 1, 1, threads=1)  # a 1-thread replica's calibration
    on_two = estimate(cfg, one_thread, rates, 0.2, 0, threads=2)  # priced for a run on 2 threads
    assert on_two.seconds == pytest.approx(e.scored * 0.001 + merges * MERGE_SHARE * 0.2)


def test_build_line_says_whether_the_model_is_built_and_points_to_quick():
    assert "found in the models cache" in build_line("default", cached=True)
    line = build_line("default", cached=False)
    assert "building it first" in line and "--quick" in line
    assert "--quick" not in build_line("quick", cached=False)
