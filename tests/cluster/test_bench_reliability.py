"""The reliability bench's accounting, without Ray: errors are attributed to fault windows, latency
percentiles come from successful requests, the timeline plot is written; every malformed config is
refused with a ValueError."""

import pytest

from tanbr_ray.bench import reliability as rb
from tanbr_ray.bench.malformed import REQUESTS, config_cases


def _load(records):
    load = rb.LoadThread("http://127.0.0.1:1", [{}], concurrency=4)
    load.records = records
    return load


def test_errors_are_attributed_to_fault_windows_and_plotted(tmp_path):
    records = [(float(t), t + 0.2, 200) for t in range(40)]
    records += [(10.5, 10.9, 503), (30.0, 30.1, 0)]  # one inside the fault window, one outside
    faults = [{"fault": "kill_router", "t_kill": 10.0}]
    rb.plot_timeline(_load(records), faults, tmp_path / "t.png")
    s = rb.load_summary(_load(records), faults)
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert s["requests"] == 42 and s["errors"] == 2 and s["errors_outside_fault_windows"] == 1
    assert faults[0]["client_errors_in_window"] == 1 and "t_kill" not in faults[0]
    assert s["latency_ms_p50"] == pytest.approx(200.0)
    assert s["statuses"] == {"0": 1, "200": 40, "503": 1}


def test_malformed_catalogue_and_configs(tmp_path):
    assert len(REQUESTS) >= 25 and len({name for name, _, _ in REQUESTS}) == len(REQUESTS)
    for name, call in config_cases(tmp_path):
        with pytest.raises(ValueError):
            call()
