"""Calibrated service times: stored, loaded back, refused with the reason, and what the slot loop queues on."""

import json
import os

import numpy as np
import pytest

from tanbr_ray.moe import MoEConfig, load_or_build
from tanbr_ray.moe.config import TinyBase
from tanbr_ray.moe.store import model_identity
from tanbr_ray.sim.calibration import (MODES, Calibration, CalibrationError, calibration_for, calibration_path,
                                       host_identity, load_calibration, measure_in_process)
from tanbr_ray.sim.costs import costs_from, host_costs

TINY = dict(name="tiny-cal", tiny_base=TinyBase(), tasks=["SST-2", "MNLI"], train_examples=32, batch_size=16,
            max_len_single=16, max_len_pair=24, head_hidden=16, heads_only_examples=32, heads_only_epochs=2,
            router_examples=8, router_steps=10, fisher_examples=8, regmean_examples=8, adapt_steps=3)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    assert os.environ.get("TANBR_DATA_DIR"), "set TANBR_DATA_DIR to the GLUE copy (e.g. ../shared/data/glue)"
    return load_or_build(MoEConfig(**TINY), models_dir=tmp_path_factory.mktemp("models"), progress=False)


@pytest.fixture(scope="module")
def measured(moe):
    return measure_in_process(moe, bf16=False, max_batch=4, runs=1)


def test_in_process_calibration_times_every_mode_at_every_batch_size(moe, measured):
    assert set(measured.batch_ms) == set(MODES) and all(len(v) == 4 and min(v) > 0 for v in measured.batch_ms.values())
    assert measured.source == "in-process" and measured.overhead_ms == 0.0 and measured.host == host_identity()
    assert measured.model_sha256 == model_identity(moe)["weights_sha256"]


def test_round_trip(moe, measured, tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(measured.model_dump()))
    back = load_calibration(path, measured.model_sha256, bf16=False, max_batch=4)
    assert back == measured
    assert load_calibration(path, measured.model_sha256, bf16=False, max_batch=2).max_batch == 4  # covers a smaller queue


@pytest.mark.parametrize("spoil,reason", [
    (lambda d: "{not json", "corrupt JSON"),
    (lambda d: {**d, "batch_ms": {**d["batch_ms"], "merged": [1.0]}}, "batch_ms.merged"),
    (lambda d: {**d, "host": {**d["host"], "cpu": "Some Other CPU"}}, "another host"),
    (lambda d: {**d, "model_sha256": "0" * 64}, "model"),
    (lambda d: {**d, "bf16": True}, "bf16"),
    (lambda d: {**d, "max_batch": 2, "batch_ms": {m: v[:2] for m, v in d["batch_ms"].items()}}, "max_batch is 4"),
    (lambda d: {**d, "batch_ms": {"merged": d["batch_ms"]["merged"]}}, "no times for modes"),
])
def test_a_bad_calibration_is_refused_and_the_run_measures_its_own(moe, measured, tmp_path, spoil, reason):
    bad = spoil(measured.model_dump())
    path = tmp_path / "cal.json"
    path.write_text(bad if isinstance(bad, str) else json.dumps(bad))
    stored = path.read_bytes()
    with pytest.raises(CalibrationError, match=reason):
        load_calibration(path, measured.model_sha256, bf16=False, max_batch=4)
    with pytest.warns(UserWarning, match="measuring this host's own"):
        cal, where = calibration_for(moe, False, str(path), 4)
    assert cal.source == "in-process" and "refused" in where
    assert path.read_bytes() == stored  # the refused file is left as it was


def test_auto_stores_one_calibration_beside_the_model_and_reuses_it(moe):
    path = calibration_path(moe.cache_dir, bf16=False)
    assert not path.exists() and moe.cache_dir.name == model_identity(moe)["key"]
    first, where = calibration_for(moe, False, "auto", 3)
    assert path.exists() and "stored" in where
    again, where = calibration_for(moe, False, "auto", 3)
    assert again == first and str(path) in where


def test_costs_queue_on_the_calibrated_times_plus_the_overhead(moe, measured):
    from tanbr_ray.sim.fleet import NodeClass
    from tanbr_ray.sim.queueing import QueueConfig

    cal = measured.model_copy(update={"batch_ms": {m: [10.0, 12.0, 14.0, 16.0] for m in MODES}, "overhead_ms": 3.0})
    costs = costs_from(moe, cal, "test")
    node = NodeClass(name="n", count=1, slowdown=2.0, memory_x_dense=100, bandwidth_mbps=100, rtt_ms=5, rate=1)
    assert costs.service("merged", node)(3) == pytest.approx(0.028)  # 14 ms x slowdown 2, nothing swapped
    (lat, dropped, _), = costs.queue([("n0", node)], [np.array([0.0])], "merged", QueueConfig(max_wait_ms=20), 10.0)
    assert lat[0] == pytest.approx(20 + 20 + 3 + 5)  # wait for the batch, batch of 1 x 2, overhead, RTT
    assert host_costs(moe, False, "measure", 4) is host_costs(moe, False, "measure", 4)
