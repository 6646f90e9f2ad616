"""Decision durability without Ray: atomic checksummed checkpoints, restore, exactly-once slot calls."""

import json

import numpy as np
import pytest
import torch

from tanbr_ray.cluster.checkpoint import CheckpointStore
from tanbr_ray.cluster.decision_service import DecisionService, ModelMeta, RouterSpec
from tanbr_ray.moe.data import PAIR


def _meta(moe) -> ModelMeta:
    return ModelMeta(name="tiny", tasks=list(moe.tasks), pair=[PAIR[t] for t in moe.tasks], num_experts=moe.num_experts,
                     task_experts=[moe.expert_of[t] for t in moe.tasks], merge_operator=moe.merge_operator)


def RouterService(spec, moe, fleet):  # noqa: N802 - the decision side of the old router, given the model's meta
    return DecisionService(spec, _meta(moe), fleet)


def test_store_publishes_whole_checkpoints_and_prunes(tmp_path):
    store = CheckpointStore(str(tmp_path), keep=2)
    for i in range(4):
        store.save(lambda d, i=i: (d / "a.json").write_text(json.dumps({"i": i})))
    assert store.checkpoints() == ["ckpt-00000003", "ckpt-00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000002", "ckpt-00000003"]
    path, errors = store.latest()
    assert path.name == "ckpt-00000003" and errors == [] and json.loads((path / "a.json").read_text()) == {"i": 3}


def test_an_object_store_without_rename_gets_whole_checkpoints_only():
    """pyarrow's in-memory filesystem stands in for s3:// or gs://: the manifest, written last, is the
    commit point; an upload that died before it is never restored, and is swept by the next save."""
    store = CheckpointStore("mock:///bucket/router", keep=2)
    store.save(lambda d: (d / "policy").mkdir() or (d / "policy" / "w.bin").write_bytes(b"\x01" * 64))
    store._put(store._path("ckpt-00000001", "policy", "w.bin"), b"\x02" * 10)  # died mid-upload: no manifest
    assert store.checkpoints() == ["ckpt-00000000"]
    path, errors = store.latest()
    assert path.name == "ckpt-00000000" and (path / "policy" / "w.bin").read_bytes() == b"\x01" * 64 and not errors
    assert store.save(lambda d: (d / "s.json").write_text("{}")) == "ckpt-00000002"  # never the dead one's number
    assert store.checkpoints() == ["ckpt-00000002", "ckpt-00000000"] and "ckpt-00000001" not in store._listed()


def test_a_fenced_writer_commits_nothing(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.save(lambda d: (d / "s.json").write_text("{}"))

    def fence():
        raise RuntimeError("term 3 supersedes 2")

    with pytest.raises(RuntimeError, match="supersedes"):
        store.save(lambda d: (d / "s.json").write_text('{"stale": true}'), fence=fence)
    assert store.checkpoints() == ["ckpt-00000000"] and store._listed() == ["ckpt-00000000"]


@pytest.mark.parametrize("damage", ["truncate", "alter", "delete", "manifest"])
def test_corrupt_newest_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    store = CheckpointStore(str(tmp_path))
    for i in range(2):
        store.save(lambda d, i=i: (d / "state.bin").write_bytes(bytes([i]) * 1000))
    newest = tmp_path / store.checkpoints()[0]
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
        store.verify("ckpt-00000001")


def test_storage_that_is_not_a_filesystem_is_refused():
    with pytest.raises(ValueError, match="storage 'nope://x'"):
        CheckpointStore("nope://x")


def _feedback(svc, xs, rng):
    V = len(svc.tasks)
    return [(x, np.full(V, 1 / V), rng.random(V), np.ones(V, dtype=bool)) for x in xs]


def _run(svc, slots, rng, start=0):
    for t in range(start, slots):
        xs = svc.decide(np.full((len(svc.nodes), len(svc.tasks)), 1 / len(svc.tasks)), slot=t)
        svc.update(_feedback(svc, xs, rng), slot=t)


def _same_state(a: DecisionService, b: DecisionService):
    assert a.slot == b.slot and a.updated_slot == b.updated_slot
    for x, y in zip(a.policy.bandit.tensors().values(), b.policy.bandit.tensors().values()):
        assert torch.equal(x, y)
    psi = np.full((len(a.nodes), len(a.tasks)), 0.5)
    assert np.array_equal(a.decide(psi), b.decide(psi))  # and so the next choices agree


def test_restart_restores_everything_and_retries_are_exactly_once(tiny, fleet, tmp_path):
    _, _, moe = tiny
    ref = RouterService(RouterSpec(policy="Tanbr"), moe, fleet)
    _run(ref, 5, np.random.default_rng(0))

    spec = RouterSpec(policy="Tanbr", storage=str(tmp_path))
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
    spec = RouterSpec(policy="Tanbr", storage=str(tmp_path))
    a = RouterService(spec, moe, fleet)
    _run(a, 3, np.random.default_rng(0))
    newest = CheckpointStore(str(tmp_path)).checkpoints()[0]
    (tmp_path / newest / "policy" / "bandit.safetensors").write_bytes(b"garbage")
    b = RouterService(spec, moe, fleet)
    assert b.updated_slot == 1 and b.decided_slot == 2  # the step before the corrupt one
    assert "bandit.safetensors" in b.refused[0] and b.state()["refused_checkpoints"] == b.refused


def test_checkpointing_refuses_policies_it_cannot_persist(tiny, fleet, tmp_path):
    _, _, moe = tiny
    with pytest.raises(ValueError, match="cannot be checkpointed"):
        RouterService(RouterSpec(policy="Random", storage=str(tmp_path)), moe, fleet)
    with pytest.raises(ValueError, match="not a router policy"):
        RouterService(RouterSpec(policy="Switch-top2"), moe, fleet)


def test_a_standby_restoring_the_checkpoints_replays_exactly_once(tiny, fleet, tmp_path):
    """Takeover by a second service on the same checkpoints: a replayed update is a no-op, and the run
    continues exactly as an uninterrupted one."""
    _, _, moe = tiny
    ref = RouterService(RouterSpec(policy="Tanbr"), moe, fleet)
    _run(ref, 5, np.random.default_rng(0))

    spec = RouterSpec(policy="Tanbr", storage=str(tmp_path))
    leader = RouterService(spec, moe, fleet)
    standby = DecisionService(spec, _meta(moe), fleet, restore=False)  # warm, restores only when it takes over
    assert standby.restored_from is None and standby.decided_slot == -1
    rng = np.random.default_rng(0)
    _run(leader, 3, rng)
    xs = leader.decide(np.full((3, 2), 0.5), slot=3)
    fb = _feedback(leader, xs, rng)
    assert leader.update(fb, slot=3)  # applied, checkpointed ... then the leader dies
    assert standby.restore() and standby.updated_slot == 3 and standby.slot == 4
    assert not standby.update(fb, slot=3)  # the update replayed after failover is applied once
    assert standby.slot == 4
    assert np.array_equal(standby.decide(np.full((3, 2), 0.5), slot=3), xs)  # a replayed decide re-answers
    _run(standby, 5, rng, start=4)
    _same_state(ref, standby)


def test_live_slots_observe_and_learn_once_per_slot_id(tiny, fleet, tmp_path):
    """Live order: slot 0 is observed, slot 1 decided, then slot 0 learned from with the x and psi it was
    decided with; each step is a no-op when replayed (a new leader closing the same slot)."""
    _, _, moe = tiny
    spec = RouterSpec(policy="Tanbr", storage=str(tmp_path))
    svc = RouterService(spec, moe, fleet)
    xs0 = svc.decide(None, 0)
    reports = [{"heads": {"board-0": ["SST-2"] * 5}, "sample": {"board-0": [("SST-2", "fine", None, 1.0)]}}]
    assert DecisionService.samples_of(reports) == {"board-0": [("SST-2", "fine", None, 1.0)]}
    assert svc.live_observe(0, reports)
    psi = svc.monitors[0].psi()
    assert psi[0] > 0.5 and not svc.live_observe(0, reports)  # replayed: not counted twice
    assert np.array_equal(svc.monitors[0].psi(), psi)
    svc.decide(None, 1)
    standby = DecisionService(spec, _meta(moe), fleet, restore=False)
    assert standby.restore() and standby.observed_slot == 0 and standby.updated_slot == -1  # 0 not learned yet
    assert np.array_equal(standby.history[0][0], xs0)  # ... but what it was decided with is kept
    rewards = {"board-0": ([1.0, 0.0], [True, False])}
    assert standby.live_learn(0, rewards) and standby.slot == 1
    assert not standby.live_learn(0, rewards) and standby.slot == 1  # replayed after failover: applied once
    assert not standby.live_observe(0, reports)


def test_router_spec_standby_needs_checkpoints(tmp_path):
    assert RouterSpec().decision_actors() == 1
    assert RouterSpec(storage=str(tmp_path)).decision_actors() == 2
    assert RouterSpec(storage=str(tmp_path), standby=False).decision_actors() == 1
    with pytest.raises(ValueError, match="standby"):
        RouterSpec(standby=True)
    with pytest.raises(ValueError, match="mergers"):
        RouterSpec(mergers=0)
