"""Router durability without Ray: atomic checksummed checkpoints, restore, exactly-once slot calls."""

import json

import numpy as np
import pytest
import torch

from tanbr_ray.cluster.checkpoint import CheckpointStore
from tanbr_ray.cluster.router_service import RouterService, RouterSpec


def test_store_publishes_whole_checkpoints_and_prunes(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for i in range(4):
        store.save(lambda d, i=i: (d / "a.json").write_text(json.dumps({"i": i})))
    assert [p.name for p in store.checkpoints()] == ["ckpt-00000003", "ckpt-00000002"]
    assert not list(tmp_path.glob(".tmp-*"))
    path, errors = store.latest()
    assert path.name == "ckpt-00000003" and errors == []


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete", "manifest"])
def test_corrupt_newest_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    store = CheckpointStore(tmp_path)
    for i in range(2):
        store.save(lambda d, i=i: (d / "state.bin").write_bytes(bytes([i]) * 1000))
    newest = store.checkpoints()[0]
    f = newest / "state.bin"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:10])
    elif damage == "alter":
        f.write_bytes(b"\x07" + f.read_bytes()[1:])
    elif damage == "delete":
        f.unlink()
    else:
        (newest / "MANIFEST.json").write_text('{"seq": 1, "files": {}, "sha256": "0"}')
    path, errors = store.latest()
    assert path.name == "ckpt-00000000"
    assert len(errors) == 1 and str(newest) in errors[0]
    with pytest.raises(ValueError, match="ckpt-00000001"):
        store.verify(newest)


def _feedback(svc, xs, rng):
    V = len(svc.tasks)
    return [(x, np.full(V, 1 / V), rng.random(V), np.ones(V, dtype=bool)) for x in xs]


def _run(svc, slots, rng, start=0):
    for t in range(start, slots):
        xs = svc.decide(np.full((len(svc.nodes), len(svc.tasks)), 1 / len(svc.tasks)), slot=t)
        svc.update(_feedback(svc, xs, rng), slot=t)


def _same_state(a: RouterService, b: RouterService):
    assert a.slot == b.slot and a.updated_slot == b.updated_slot
    for x, y in zip(a.policy.bandit.tensors().values(), b.policy.bandit.tensors().values()):
        assert torch.equal(x, y)
    psi = np.full((len(a.nodes), len(a.tasks)), 0.5)
    assert np.array_equal(a.decide(psi), b.decide(psi))  # and so the next choices agree


def test_restart_restores_everything_and_retries_are_exactly_once(tiny, fleet, tmp_path):
    _, _, moe = tiny
    ref = RouterService(RouterSpec(policy="Tanbr"), moe, fleet)
    _run(ref, 5, np.random.default_rng(0))

    spec = RouterSpec(policy="Tanbr", checkpoint_dir=str(tmp_path))
    a = RouterService(spec, moe, fleet)
    rng = np.random.default_rng(0)
    _run(a, 3, rng)
    xs = a.decide(np.full((3, 2), 0.5), slot=3)  # ... the process dies between decide and update
    b = RouterService(spec, moe, fleet)  # a restart: restores the newest checkpoint
    assert b.restored_from and b.decided_slot == 3 and b.updated_slot == 2
    # versions jump past any a lost checkpoint could have issued, and every node is re-stamped
    assert b.version > a.version + 1 and {x.version for x in b.assign.values()} == {b.version}
    assert np.array_equal(b.decide(np.full((3, 2), 0.5), slot=3), xs)  # retried decide: same answer
    fb = _feedback(b, xs, rng)
    b.update(fb, slot=3)
    b.update(fb, slot=3)  # retried update: applied once
    assert b.slot == 4
    _run(b, 5, rng, start=4)
    _same_state(ref, b)


def test_corrupt_newest_checkpoint_loses_exactly_one_step(tiny, fleet, tmp_path):
    _, _, moe = tiny
    spec = RouterSpec(policy="Tanbr", checkpoint_dir=str(tmp_path))
    a = RouterService(spec, moe, fleet)
    _run(a, 3, np.random.default_rng(0))
    newest = CheckpointStore(tmp_path).checkpoints()[0]
    (newest / "policy" / "bandit.safetensors").write_bytes(b"garbage")
    b = RouterService(spec, moe, fleet)
    assert b.updated_slot == 1 and b.decided_slot == 2  # the step before the corrupt one
    assert "bandit.safetensors" in b.refused[0] and b.state()["refused_checkpoints"] == b.refused


def test_checkpointing_refuses_policies_it_cannot_persist(tiny, fleet, tmp_path):
    _, _, moe = tiny
    with pytest.raises(ValueError, match="cannot be checkpointed"):
        RouterService(RouterSpec(policy="Random", checkpoint_dir=str(tmp_path)), moe, fleet)
    with pytest.raises(ValueError, match="not a router policy"):
        RouterService(RouterSpec(policy="Switch-top2"), moe, fleet)
