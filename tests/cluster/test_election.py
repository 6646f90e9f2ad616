"""Leadership by put-if-absent terms in Ray's GCS key-value store (no disk), fencing of a replaced
leader's writes, and the decision actor's import set: no model code."""

import json
import subprocess
import sys
import threading

import pytest
import ray

from tanbr_ray.cluster.checkpoint import CheckpointStore
from tanbr_ray.cluster.election import Election, NotLeader, Term


@pytest.fixture(scope="module")
def gcs():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Candidate:
    """A claimant with a directory of its own: only the GCS is shared."""

    def __init__(self, name, directory):
        self.name, self.store = name, CheckpointStore(directory)
        self.election = Election("router-under-test")

    def claim(self, term):
        return self.election.claim(term, self.name)

    def write(self, term):
        return self.store.save(lambda d: (d / "s.json").write_text("{}"), fence=lambda: self.election.fence(term))


def test_exactly_one_of_two_machines_leads_and_a_stale_leader_is_fenced(gcs, tmp_path):
    a, b = (Candidate.remote(n, str(tmp_path / n)) for n in ("a", "b"))
    wins = ray.get([a.claim.remote(1), b.claim.remote(1)])
    assert sorted(wins) == [False, True]
    leader, other = (a, b) if wins[0] else (b, a)
    e = Election("router-under-test")
    assert e.current().term == 1 and e.current().leader == ("a" if wins[0] else "b")
    assert ray.get(leader.write.remote(1)) == "ckpt-00000000"
    assert ray.get(other.claim.remote(2))  # the other takes over
    with pytest.raises(NotLeader, match="term 1 is not the newest"):
        ray.get(leader.write.remote(1))  # the replaced leader's write is refused, nothing committed
    leader_dir = tmp_path / ("a" if wins[0] else "b")
    assert CheckpointStore(str(leader_dir)).checkpoints() == ["ckpt-00000000"]
    e.forget()
    assert e.current() is None


def test_exactly_one_claimant_wins_a_term(gcs):
    e = Election("threads")
    assert e.current() is None
    wins = []
    barrier = threading.Barrier(8)

    def claim(i):
        barrier.wait()
        if Election("threads").claim(1, f"actor-{i}"):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert e.current() == Term(1, f"actor-{wins[0]}")
    assert not e.claim(1, "late") and e.claim(2, "next") and e.current() == Term(2, "next")
    assert Election("another-router").current() is None  # routers never share terms


def test_newest_term_wins_and_old_terms_are_pruned(gcs):
    e = Election("pruned")
    for n in range(1, 30):
        assert e.claim(n, f"a{n % 2}")
    assert e.current() == Term(29, "a1")
    assert len(e.kv.keys(e.prefix)) <= 16


DECISION_IMPORTS = """
import json, sys
from tanbr_ray.cluster import decision_actor, decision_client  # the actor's module and its callers' client
from tanbr_ray.cluster.decision_service import DecisionService, ModelMeta, RouterSpec
from tanbr_ray.sim.fleet import Fleet
fleet = Fleet(**json.loads(sys.argv[1]))
meta = ModelMeta(name="t", tasks=["SST-2", "MNLI"], pair=[False, True], num_experts=2, task_experts=[0, 1], merge_operator="linear")
svc = DecisionService(RouterSpec(storage=sys.argv[2]), meta, fleet)
xs = svc.decide(None, 0)
svc.update([(x, [0.5, 0.5], [1.0, 0.0], [True, True]) for x in xs], 0)
print(json.dumps(sorted(sys.modules)))
"""


def test_decision_actor_imports_no_model_code(fleet, tmp_path):
    """The decision side starts fast because it never imports transformers or the MoE: checked in a
    fresh interpreter, after a real decide and update."""
    out = subprocess.run([sys.executable, "-c", DECISION_IMPORTS, json.dumps(fleet.model_dump(mode="json")),
                          str(tmp_path)], capture_output=True, text=True, timeout=300, check=True)
    mods = json.loads(out.stdout.strip().splitlines()[-1])
    assert "tanbr_ray.cluster.decision_actor" in mods and "tanbr_ray.router.tanbr" in mods
    assert not [m for m in mods if m == "transformers" or m.startswith("transformers.")]
    assert not [m for m in mods if m.startswith("tanbr_ray.moe")]
