"""The reliability bench's accounting, without Ray: per fault, kill -> next decision and -> first answer
at the next decision's version, slots lost from the takeover records, errors inside and outside the
fault window; the JSON rows carry the issue's fields; the timeline plot is written; every malformed
config is refused with a ValueError."""

import math

import pytest

from tanbr_ray.bench import reliability as rb
from tanbr_ray.bench.malformed import REQUESTS, config_cases


def _load(records, nodes=("board-0",)):
    load = rb.LoadThread("http://127.0.0.1:1", [{}], concurrency=4)
    load.records = records
    load.node_ids = {n: i for i, n in enumerate(nodes)}
    return load


def _kill(t, version_before=5, updated_before=3, next_versions=None, to_next=1.5):
    return {"t_kill": t, "version_before": version_before, "updated_slot_before": updated_before,
            "kill_to_next_decision_s": to_next, "next_versions": next_versions or {"board-0": 9}}


def test_rows_have_the_issue_fields_and_attribute_errors_per_fault(tmp_path):
    # version 5 until 12.0 s, then 9 (the successor's re-stamp); one error at 10.5 (in the window of the
    # first fault), one at 25.0 (outside it, before the second fault), one at 41.0 (second fault's window)
    records = [(float(t), t + 0.2, 200, 5 if t < 12 else 9, 0) for t in range(60)]
    records += [(10.5, 10.9, 503, -1, -1), (25.0, 25.1, 0, -1, -1), (41.0, 41.3, 503, -1, -1)]
    takeovers = [{"at": 10.8, "updated_slot": 2}, {"at": 40.5, "updated_slot": 7}]
    ticks = [{"scheduled": float(s), "pushed": s + (4.0 if s == 12 else 0.5)} for s in range(0, 60, 3)]
    raw = [{"name": "kill leader under load", "kills": [_kill(10.0)], "takeovers": takeovers, "ticks": ticks},
           {"name": "kill merger under load", "kills": [_kill(40.0, 9, 7, {"board-0": 9})], "takeovers": takeovers,
            "ticks": ticks},
           {"final_state": {}}]
    rows = rb.summarize_faults(_load(records), raw, slot_seconds=3.0)
    assert [r["name"] for r in rows] == ["kill leader under load", "kill merger under load"]
    for r in rows:
        assert set(rb.ROW) <= set(r)
    lead, merge = rows
    assert lead["kill_to_next_decision_s"] == 1.5
    assert lead["kill_to_first_served_s"] == pytest.approx(12.2 - 10.0)  # first answer at version 9
    assert lead["slots_lost"] == 1  # the successor restored updated slot 2, the leader had done 3
    assert lead["errors_in_window"] == 1 and lead["errors_outside_window"] == 1
    assert lead["weights_late_max_s"] == pytest.approx(4.0)
    assert merge["slots_lost"] == 0 and merge["errors_in_window"] == 1 and merge["errors_outside_window"] == 0
    assert merge["kill_to_first_served_s"] == pytest.approx(40.2 - 40.0)  # version 9 already held: at once

    load = _load(records)
    s = rb.load_summary(load, raw)
    assert s["requests"] == 63 and s["errors"] == 3 and s["errors_outside_fault_windows"] == 1
    assert s["latency_ms_p50"] == pytest.approx(200.0)
    rb.plot_timeline(load, raw, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_a_fault_never_served_at_its_new_version_shows_nan():
    records = [(float(t), t + 0.2, 200, 5, 0) for t in range(30)]
    raw = [{"name": "kill leader under load", "kills": [_kill(10.0)], "takeovers": [], "ticks": []}]
    (row,) = rb.summarize_faults(_load(records), raw, slot_seconds=3.0)
    assert math.isnan(row["kill_to_first_served_s"]) and math.isnan(row["weights_late_max_s"])


def test_malformed_catalogue_and_configs(tmp_path):
    assert len(REQUESTS) >= 25 and len({name for name, _, _ in REQUESTS}) == len(REQUESTS)
    for name, call in config_cases(tmp_path):
        with pytest.raises(ValueError):
            call()
