"""The model interface (`moe/interface.py`) is all the simulator and the benchmarks use: they run on
a fake model that implements only it, and nothing above `moe/` names a concrete model class."""

import ast
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tanbr_ray.moe.build import minilm_path
from tanbr_ray.moe.data import NUM_LABELS
from tanbr_ray.moe.infer import prepare
from tanbr_ray.moe.interface import MergeableMoE
from tanbr_ray.moe.merge import validate_x
from tanbr_ray.moe.model import mean_pool, mode_spec
from tanbr_ray.router import registry
from tanbr_ray.sim.config import SimConfig
from tanbr_ray.sim.fleet import Fleet
from tanbr_ray.sim.loop import run_simulation

ROOT = Path(__file__).resolve().parents[2] / "tanbr_ray"
CONCRETE = {"TaskMoE", "PoolMoE", "DenseModel", "MergedVersion", "PoolDense", "PoolShell", "PoolVersion"}


class FakeMoE:
    """Bag of embeddings, K linear 'experts' merged linearly, one linear head per task: the interface
    and nothing else (no torch Module, no layers, no router)."""

    def __init__(self, tasks=("SST-2", "MNLI"), hidden=16, seed=0):
        from transformers import AutoTokenizer

        g = torch.Generator().manual_seed(seed)
        self.tasks, self.num_experts, self.budget = list(tasks), len(tasks), len(tasks)
        self.expert_of = {t: i for i, t in enumerate(self.tasks)}
        self.expert_map, self.expert_labels = "task", [f"expert:{t}" for t in self.tasks]
        self.merge_operator, self.stats = "linear", None
        self.moe_layers, self.adapted = [0], False
        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        self.max_len_single, self.max_len_pair = 16, 24
        self.identity = {"key": "fake", "weights_sha256": "fake-0"}
        self.emb = torch.randn(self.tokenizer.vocab_size, hidden, generator=g)
        self.experts = torch.randn(self.num_experts, hidden, hidden, generator=g)
        self.heads = {t: torch.randn(NUM_LABELS[t], hidden, generator=g) for t in self.tasks}

    @property
    def device(self):
        return torch.device("cpu")

    def eval(self):
        return self

    def task_index(self, task):
        return self.expert_of[task]

    def validate_x(self, x):
        return validate_x(x, self.num_experts, self.budget)

    def merged_state(self, x, op=None):
        x = torch.as_tensor(self.validate_x(x), dtype=torch.float32)
        return {"w": torch.einsum("k,kij->ij", x, self.experts)}

    def static_state(self, name):
        return self.merged_state(np.full(self.num_experts, 1.0 / self.num_experts))

    def prepare(self, splits, batch_size=32, progress=False):
        return prepare(self, splits, batch_size, progress)

    def embed_to_first_moe(self, input_ids, attention_mask, token_type_ids):
        return self.emb[input_ids]

    def pooled_from_first_moe(self, h, attention_mask, task, mode="oracle", x=None, state=None, adapted=None,
                              record=None):
        ffn = mode_spec(mode).ffn
        if ffn == "merged":
            w = (state or self.merged_state(x))["w"]
        elif ffn == "task":
            w = self.experts[self.task_index(task)]
        elif ffn == "base":
            w = torch.eye(self.experts.shape[1])
        else:
            w = self.experts.mean(0)
        return mean_pool(torch.tanh(h.float() @ w), attention_mask), False

    def head_for(self, mode, task, use_adapt):
        return lambda feats: F.linear(feats.float(), self.heads[task])

    def __call__(self, input_ids, attention_mask, token_type_ids, task, mode="oracle", x=None, state=None,
                 adapted=None):
        h = self.embed_to_first_moe(input_ids, attention_mask, token_type_ids)
        return self.head_for(mode, task, False)(self.pooled_from_first_moe(h, attention_mask, task, mode, x, state)[0])

    def dense_model(self, x=None, state=None, adapted=None):
        mode = "dense" if x is None and state is None else "merged"
        state = state if state is not None or x is None else self.merged_state(x)
        return lambda ids, am, tt, task: self(ids, am, tt, task, mode=mode, state=state)

    def resident_bytes(self, mode):
        per = self.experts[0].numel() * 4
        ffn = mode_spec(mode).ffn
        return int(self.emb.numel() * 4 + (per if ffn in ("base", "merged") else per * self.num_experts))

    def edge_parts(self):
        return f"{__name__}:FakeShell", {"hidden": self.emb.shape[1]}, {"emb": self.emb, **{
            f"head.{t}": h for t, h in self.heads.items()}}


class FakeShell(torch.nn.Module):
    """The fake's dense shell on an edge node: its embeddings and heads, no experts."""

    @classmethod
    def from_package(cls, config, tensors, tasks):
        shell = cls()
        shell.emb = torch.nn.Parameter(tensors["emb"], requires_grad=False)
        shell.heads = torch.nn.ParameterDict({t.replace("-", "_"): torch.nn.Parameter(tensors[f"head.{t}"],
                                              requires_grad=False) for t in tasks})
        return shell

    def with_ffn(self, state):
        return FakeVersion(self, state["w"])


class FakeVersion:
    def __init__(self, shell, w):
        self.shell, self.w = shell, w

    def __call__(self, input_ids, attention_mask, token_type_ids, task):
        feats = mean_pool(torch.tanh(self.shell.emb[input_ids] @ self.w), attention_mask)
        return F.linear(feats, self.shell.heads[task.replace("-", "_")])

    def tensors(self):
        return [self.w]

    def resident_bytes(self):
        return int(sum(p.numel() * 4 for p in self.shell.parameters()) + self.w.numel() * 4)


FLEET = dict(classes=[
    dict(name="board", count=2, slowdown=4, memory_x_dense=1.001, bandwidth_mbps=50, rtt_ms=20, budget=1, rate=1.0),
    dict(name="dc", count=1, slowdown=1, memory_x_dense=8, bandwidth_mbps=1000, rtt_ms=3, budget=2, rate=2.0),
])


def test_the_simulation_runs_on_a_model_that_implements_only_the_interface(data_dir):
    fake = FakeMoE()
    assert isinstance(fake, MergeableMoE)
    cfg = SimConfig(slots=3, slot_seconds=4, pool_per_task=12, fixed_candidates=1, wandb="disabled", seed=0,
                    bf16=False, calibration="measure")
    out = run_simulation(cfg, fake, fleet=Fleet(**FLEET), progress=False)
    s = out.summary
    assert set(s["policies"]) == set(registry.names("simulation"))
    assert s["policies"]["Oracle"]["regret_vs_oracle"] == 0.0
    for name, r in s["policies"].items():
        assert 0.0 <= r["score"] <= 1.0 and r["resident_bytes"] > 0, name
    assert s["model"]["key"] == "fake"


def test_the_landscape_bench_runs_on_the_fake_model(data_dir):
    from tanbr_ray.bench.model import run_bench

    res = run_bench(FakeMoE(), eval_examples=6, mixes=2, landscape_examples=8, random_candidates=2,
                    screen_examples=2, finalists=1, budget=2, runs=1, progress=False)
    assert set(res["modes"]) == {"dense", "merged", "top1", "top2", "soft", "oracle"}
    assert res["landscape_by_operator"]["linear"]["mean"]


def test_the_clusters_model_side_runs_on_the_fake_model(data_dir):
    """What the cluster asks of a model — a merger's merges, meta, edge package and label-free reward,
    an edge replica's shell and versions, the decision side's choice from the meta — on the fake. (A
    deployed model also travels between machines by its cache folder; the fake has none, so this runs
    in one process: `tests/cluster/test_pool_cluster.py` runs a pool through Ray itself.)"""
    from tanbr_ray.cluster.decision_service import DecisionService, RouterSpec
    from tanbr_ray.cluster.merge_service import MergeService
    from tanbr_ray.moe.edge import EdgeModel
    from tanbr_ray.moe.serving import moe_server

    fake = FakeMoE()
    svc = MergeService(fake, sample_per_slot=8)
    meta = svc.meta()
    assert (meta.name, meta.tasks, meta.pair, meta.task_experts) == ("fake", ["SST-2", "MNLI"], [False, True], [0, 1])
    x = [0.3, 0.7]
    assert svc.merge(x) is svc.merge(x) and svc.merges == 1  # one merge per distinct x
    assert torch.equal(svc.merge(x)["w"], fake.merged_state(x)["w"])
    edge = EdgeModel(svc.package())
    edge.load_ffn(svc.merge(x))
    items = [("SST-2", "a gripping, well acted film", None), ("MNLI", "A man sleeps.", "Nobody sleeps."),
             ("SST-2", "dull and far too long", None), ("MNLI", "It rains.", "The street is wet.")]
    assert np.array_equal(edge.predict_items(items), moe_server(fake, "merged", np.asarray(x))(items))
    assert fake.resident_bytes("merged") < edge.resident_bytes() < fake.resident_bytes("top2")  # + heads, no experts
    top2 = moe_server(fake, "top2")(items)
    served = [(h, a, b, float(p)) for (h, a, b), p in zip(items, top2)]
    assert svc.rewards({"n": served})["n"] == ([1.0, 1.0], [True, True])
    wrong = [(h, a, b, p + 1.0) for h, a, b, p in served[:2]]  # only SST-2 and MNLI's first rows, off by one
    assert svc.rewards({"n": wrong})["n"] == ([0.0, 0.0], [True, True])
    decision = DecisionService(RouterSpec(policy="Tanbr"), meta, Fleet(**FLEET), restore=False)
    xs = decision.decide(np.full((3, 2), 0.5), slot=0)
    assert xs.shape == (3, 2) and np.allclose(xs.sum(1), 1.0)


def test_nothing_above_moe_names_a_concrete_model_class():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.relative_to(ROOT).parts[0] == "moe":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Name):
                names = [node.id]
            elif isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n in CONCRETE]
    assert not offenders, offenders
