"""Leadership by atomic term files (Ray-free), and the decision actor's import set: no model code."""

import json
import subprocess
import sys
import threading

from tanbr_ray.cluster.election import Election, Term


def test_exactly_one_claimant_wins_a_term(tmp_path):
    e = Election(tmp_path)
    assert e.current() is None
    wins = []
    barrier = threading.Barrier(8)

    def claim(i):
        barrier.wait()
        if Election(tmp_path).claim(1, f"actor-{i}"):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert e.current() == Term(1, f"actor-{wins[0]}")
    assert not e.claim(1, "late") and e.claim(2, "next") and e.current() == Term(2, "next")


def test_newest_term_wins_and_old_terms_are_pruned(tmp_path):
    e = Election(tmp_path)
    for n in range(1, 30):
        assert e.claim(n, f"a{n % 2}")
    assert e.current() == Term(29, "a1")
    assert len(list((tmp_path / "leader").glob("term-*.json"))) <= 16
    (tmp_path / "leader" / "term-00000030.json").write_text("")  # a claim being written
    assert e.current() == Term(30, None)


DECISION_IMPORTS = """
import json, sys
from tanbr_ray.cluster import decision_actor, decision_client  # the actor's module and its callers' client
from tanbr_ray.cluster.decision_service import DecisionService, ModelMeta, RouterSpec
from tanbr_ray.sim.fleet import Fleet
fleet = Fleet(**json.loads(sys.argv[1]))
meta = ModelMeta(name="t", tasks=["SST-2", "MNLI"], num_experts=2, task_experts=[0, 1], merge_operator="linear")
svc = DecisionService(RouterSpec(checkpoint_dir=sys.argv[2]), meta, fleet)
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
