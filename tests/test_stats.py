import numpy as np

from tanbr_ray.stats import loglog_slope, recovery_slots


def test_recovery_counts_slots_until_the_gap_is_back_to_its_level_before_the_change():
    gap = np.array([0.1, 0.1, 0.1, 0.5, 0.4, 0.3, 0.1, 0.1, 0.1, 0.1])
    assert recovery_slots(gap, change=3, window=3) == 3  # slots 6-8 average 0.1 again
    assert recovery_slots(np.r_[gap[:6], [0.9] * 4], change=3, window=3) is None  # never recovers
    assert recovery_slots(gap, change=1, window=3) is None  # no window before the change
    assert recovery_slots(gap, change=3, window=3, tolerance=0.25) == 1  # slots 4-6 average 0.27: within 0.25


def test_loglog_slope_of_sqrt_and_linear_curves():
    t = np.arange(1, 1001)
    assert abs(loglog_slope(np.sqrt(t)) - 0.5) < 0.01
    assert abs(loglog_slope(3.0 * t) - 1.0) < 1e-9
    assert np.isnan(loglog_slope(np.zeros(10)))
