import numpy as np
import pytest

from tanbr_ray.router.monitor import CountMinSketch, MonitorConfig, TaskMonitor


def test_cms_never_undercounts_and_respects_bound():
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(500)]
    truth = {}
    sk = CountMinSketch(width=64, depth=4, seed=3)
    for _ in range(5000):
        k = keys[int(rng.zipf(1.5)) % len(keys)]
        truth[k] = truth.get(k, 0) + 1
        sk.add(k)
    errors = [sk.estimate(k) - c for k, c in truth.items()]
    assert min(errors) >= 0  # never under-counts
    assert max(errors) > 0   # width 64 < 500 keys: collisions really happen
    assert np.mean(np.asarray(errors) <= sk.error_bound()) > 0.95


def test_conservative_update_beats_plain_update():
    rng = np.random.default_rng(1)
    stream = [f"k{int(i)}" for i in rng.integers(0, 300, 3000)]
    cons = CountMinSketch(32, 3, seed=0)
    for k in stream:
        cons.add(k)
    plain = CountMinSketch(32, 3, seed=0)
    for k in stream:  # plain CMS: increment every row
        cols = plain._cells(k).astype(np.int64)
        plain.table[np.arange(3), cols] += 1
    truth = {k: stream.count(k) for k in set(stream)}
    err_c = sum(cons.estimate(k) - c for k, c in truth.items())
    err_p = sum(plain.estimate(k) - c for k, c in truth.items())
    assert err_c < err_p


@pytest.mark.parametrize("kind", ["cms", "ema"])
def test_monitor_estimates_mix_and_tracks_change(kind):
    tasks = ["sst2", "qnli", "qqp", "mnli"]
    mon = TaskMonitor(tasks, MonitorConfig(kind=kind, window=2, ema_alpha=0.7, width=64))
    assert np.allclose(mon.psi(), 0.25)  # nothing seen yet: uniform
    rng = np.random.default_rng(0)
    true = np.array([0.7, 0.1, 0.1, 0.1])
    for _ in range(3):
        mon.observe_many(rng.choice(tasks, size=400, p=true))
        mon.end_slot()
    assert abs(mon.psi().sum() - 1) < 1e-12
    assert mon.estimation_error(true) < 0.05
    switched = np.array([0.05, 0.05, 0.1, 0.8])
    for _ in range(3):
        mon.observe_many(rng.choice(tasks, size=400, p=switched))
        mon.end_slot()
    assert mon.estimation_error(switched) < 0.06


def test_monitor_key_map_and_unknown_keys():
    mon = TaskMonitor(["a", "b"], key_to_task={"app1": "a", "app2": "a", "app3": "b"})
    for k in ["app1"] * 3 + ["app2"] + ["app3"] * 4 + ["nope"] * 5:
        mon.observe(k)
    mon.end_slot()
    assert np.allclose(mon.psi(), [0.5, 0.5])
    assert mon.unknown_keys == 5


def test_monitor_state_round_trip():
    mon = TaskMonitor(["a", "b", "c"], MonitorConfig(width=16, window=3))
    for k in "aabbbc":
        mon.observe(k)
    mon.end_slot()
    mon.observe("c")
    again = TaskMonitor.from_state_dict(mon.state_dict())
    assert np.array_equal(again.psi(), mon.psi())
    again.end_slot()
    mon.end_slot()
    assert np.array_equal(again.counts(), mon.counts())


def test_monitor_config_errors_name_field():
    with pytest.raises(ValueError, match="width"):
        MonitorConfig(width=0)
    with pytest.raises(ValueError, match="kind"):
        MonitorConfig(kind="exact")
    with pytest.raises(ValueError, match="key_to_task"):
        TaskMonitor(["a"], key_to_task={"k": "zzz"})
