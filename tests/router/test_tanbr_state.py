import json

import numpy as np
import pytest

from tanbr_ray.router import Tanbr, TanbrConfig, TreeConfig
from tanbr_ray.router.synthetic import SyntheticConfig, SyntheticEnv


def _play(router, env, start, rounds, pending_last=False):
    chosen = []
    for t in range(start, start + rounds):
        psi = env.psi(t)
        x = router.select(psi, 6)
        chosen.append(x)
        if not (pending_last and t == start + rounds - 1):
            router.update(x, psi, env.mean_rewards(x))
    return chosen


def test_save_load_reproduces_next_selections(tmp_path):
    cfg = TanbrConfig(tree=TreeConfig(tau0=1.0))
    env = SyntheticEnv(SyntheticConfig(num_experts=6, num_tasks=4, budget=6, schedule="drifting",
                                       rounds=60, seed=2))
    router = Tanbr(6, 4, cfg)
    router.monitor.observe_many(["task0", "task1", "task1"])
    router.monitor.end_slot()
    _play(router, env, 0, 30, pending_last=True)  # one choice still awaiting its reward
    router.save(tmp_path)
    loaded = Tanbr.load(tmp_path)
    assert np.array_equal(loaded.monitor.psi(), router.monitor.psi())
    pending_x = np.frombuffer(next(iter(router.pending)), dtype=np.float64)
    for r in (router, loaded):
        r.update(pending_x, env.psi(29), env.mean_rewards(pending_x))
    a = _play(router, env, 30, 20)
    b = _play(loaded, env, 30, 20)
    assert np.array_equal(np.stack(a), np.stack(b))
    assert router.tree.size == loaded.tree.size > 1


def test_corrupt_state_is_refused(tmp_path):
    router = Tanbr(4, 2)
    router.update(router.select([0.5, 0.5], 4), [0.5, 0.5], [0.3, 0.4])
    router.save(tmp_path)
    blob = tmp_path / "bandit.safetensors"
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        Tanbr.load(tmp_path)
    (tmp_path / "state.json").write_text("{ not json")
    with pytest.raises(ValueError, match="state.json"):
        Tanbr.load(tmp_path)


def test_state_json_is_plain_json(tmp_path):
    Tanbr(3, 2).save(tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["policy"] == "Tanbr" and state["num_experts"] == 3


def test_state_written_before_probes_loads_with_centre_candidates(tmp_path):
    router = Tanbr(4, 2, TanbrConfig(tree=TreeConfig(tau0=1.0, probes=0)))
    for _ in range(6):
        x = router.select(np.array([0.5, 0.5]), 4)
        router.update(x, np.array([0.5, 0.5]), np.array([x[0], x[1]]))
    router.save(tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    del state["config"]["tree"]["probes"], state["tree"]["config"]["probes"]  # as the older code wrote it
    (tmp_path / "state.json").write_text(json.dumps(state))
    loaded = Tanbr.load(tmp_path)
    assert loaded.config.tree.probes == 0 and loaded.tree.config.probes == 0
    assert np.array_equal(loaded.tree.candidate_points(4)[0], router.tree.candidate_points(4)[0])
    assert np.array_equal(loaded.select(np.array([0.3, 0.7]), 4), router.select(np.array([0.3, 0.7]), 4))
