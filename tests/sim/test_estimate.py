"""What a run says it will cost before it starts."""

from tanbr_ray.sim.config import load_config
from tanbr_ray.sim.costs import Costs
from tanbr_ray.sim.estimate import COLD_FACTOR, build_line, estimate


def test_estimate_counts_the_run_and_prices_it_by_the_measured_service_time():
    cfg = load_config("default", ["seeds=2", "policies=[Tanbr,RegMean]", "slots=10"])
    costs = Costs({"merged": [2.0, 5.0, 32.0]}, {"merged": 1}, 1, 1)  # 2 ms per request at batch 16
    e = estimate(cfg, costs, nodes=9, memo_entries=0)
    assert e.scored == 2 * 10 * 9 * 24 * 2
    assert abs(e.seconds - e.scored * 0.002 * COLD_FACTOR) < 1e-9
    assert "2 policies × 10 slots × 9 nodes × 2 seed(s) = 8,640 scored requests" in e.lines()[0]
    assert len(e.lines()) == 1 and len(estimate(cfg, costs, 9, memo_entries=500).lines()) == 2


def test_build_line_says_whether_the_model_is_built_and_points_to_quick():
    assert "found in the models cache" in build_line("default", cached=True)
    line = build_line("default", cached=False)
    assert "building it first" in line and "--quick" in line
    assert "--quick" not in build_line("quick", cached=False)
