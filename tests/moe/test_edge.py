"""The edge node's model: built from a package (no experts), it matches the MoE's merged mode."""

import dataclasses

import numpy as np
import pytest
import torch

from tanbr_ray.moe.edge import EdgeModel, edge_package
from tanbr_ray.moe.infer import prepare, predict
from tanbr_ray.moe.merge import FFN_KEYS

from .test_merge import _splits


def test_edge_model_predicts_like_merged_mode(tiny_moe):
    with torch.no_grad():  # adapted merging: heads and attention norms of the package must follow
        tiny_moe.adapted.fill_(1)
        tiny_moe.merge_attn_ln_w.mul_(1.2)
    pkg = edge_package(tiny_moe)
    assert not any(k.startswith(f"ffn.{l}.") for l in tiny_moe.moe_layers for k in pkg.tensors)
    edge = EdgeModel(pkg)
    splits = _splits()
    for x in ([0.3, 0.7], [1.0, 0.0]):
        edge.load_ffn(tiny_moe.merged_state(x))
        want = predict(tiny_moe, prepare(tiny_moe, splits), "merged", x=x)
        for task, sp in splits.items():
            got = edge.predict(task, sp.text_a, sp.text_b)
            assert np.array_equal(got, want[task]), (task, x)
    assert edge.resident_bytes() == tiny_moe.resident_bytes("merged")


def test_swap_shares_the_shell_and_keeps_running_models(tiny_moe):
    edge = EdgeModel(edge_package(tiny_moe))
    edge.load_ffn(tiny_moe.merged_state([0.5, 0.5]))
    old = edge.model
    edge.load_ffn(tiny_moe.merged_state([0.0, 1.0]))
    assert edge.model is not old and edge.model.shell is old.shell  # one shell, nothing copied
    l = tiny_moe.moe_layers[0]
    assert not torch.equal(edge.model.ffn_layers[l]["w1"], old.ffn_layers[l]["w1"])
    assert torch.equal(old.ffn_layers[l]["w1"], tiny_moe.merged_state([0.5, 0.5])["w1"][0])
    assert not len(edge.shell.ffn[l])  # the shell holds no FFN of its own where versions bring theirs
    sp = _splits()["SST-2"]
    want = predict(tiny_moe, prepare(tiny_moe, {"SST-2": sp}), "merged", x=[0.5, 0.5])["SST-2"]
    assert np.array_equal(edge.predict("SST-2", sp.text_a, model=old), want)  # the old version still serves


def test_edge_model_refuses_bad_input(tiny_moe):
    edge = EdgeModel(edge_package(tiny_moe))
    with pytest.raises(RuntimeError, match="no merged model"):
        edge.predict("SST-2", ["fine"])
    with pytest.raises(ValueError, match="shaped"):
        edge.load_ffn({k: v[:1] for k, v in tiny_moe.merged_state([0.5, 0.5]).items()})
    edge.load_ffn(tiny_moe.merged_state([0.5, 0.5]))
    with pytest.raises(ValueError, match="unknown head"):
        edge.predict("QQP", ["a"], ["b"])
    with pytest.raises(ValueError, match="needs text_b"):
        edge.predict("MNLI", ["a premise"])
    assert set(FFN_KEYS) <= set(tiny_moe.merged_state([0.5, 0.5]))


def test_versions_on_one_shell_serve_at_once_from_threads(tiny_moe):
    """A replica serving several nodes runs their versions concurrently on one shell: each thread
    gets its own version's logits (a forward that swapped the shell's parameters would mix them)."""
    from concurrent.futures import ThreadPoolExecutor

    from tanbr_ray.moe.data import TaskSplit, bucket_batches

    edge = EdgeModel(edge_package(tiny_moe))
    versions = {x: edge.shell.with_ffn(tiny_moe.merged_state(list(x))) for x in [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]}
    sp = _splits()["MNLI"]
    split = TaskSplit("MNLI", list(sp.text_a), list(sp.text_b), np.zeros(len(sp.text_a)))
    b = next(iter(bucket_batches(edge.tokenizer, split, edge.max_len["MNLI"], batch_size=32)))

    def logits(x):
        with torch.no_grad():
            return versions[x](b.input_ids, b.attention_mask, b.token_type_ids, "MNLI")

    want = {x: logits(x) for x in versions}
    assert not torch.allclose(want[(1.0, 0.0)], want[(0.0, 1.0)])  # the versions answer differently
    jobs = [x for _ in range(30) for x in versions]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(logits, jobs))
    for x, g in zip(jobs, got):
        assert torch.equal(g, want[x]), x


def test_edge_model_serves_under_bf16_autocast_when_asked(tiny_moe):
    """bf16=True (the simulation's `bf16`, replicas included): the forward runs under autocast, and
    its labels stay those of the fp32 forward on nearly every row."""
    pkg, x = edge_package(tiny_moe), [0.3, 0.7]
    exact, fast = EdgeModel(pkg), EdgeModel(pkg, bf16=True)
    seen = []
    for e in (exact, fast):
        e.load_ffn(tiny_moe.merged_state(x))
        e.shell.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    for task, sp in _splits().items():
        seen.clear()
        a, b = exact.predict(task, sp.text_a, sp.text_b), fast.predict(task, sp.text_a, sp.text_b)
        assert not any(seen[: len(seen) // 2]) and all(seen[len(seen) // 2:]), task
        assert np.mean(a == b) >= 0.9, task


@pytest.fixture(scope="module")
def pools(tmp_path_factory, data_dir):
    """A GPT-2 pool (merge-aware adaptation on), a BERT pool and a Qwen2-MoE with a shared expert and a
    dense layer: the three shapes of shell an edge node builds for a model that is not the built-in."""
    from tanbr_ray.moe.resolve import open_model

    from .tiny_pools import make_native, make_pool

    root = tmp_path_factory.mktemp("edgepools")
    specs = {"gpt2": make_pool(root / "gpt2", "gpt2"), "bert": make_pool(root / "bert", "bert"),
             "qwen2_moe": make_native(root / "qwen", family="qwen2_moe")}
    return {k: open_model(str(v), root / "models", progress=False).moe for k, v in specs.items()}


ITEMS = [("SST-2", "a gripping, well acted film", None), ("RTE", "The cat sat on the mat.", "A cat sat."),
         ("SST-2", "dull and far too long", None), ("RTE", "Rain fell all day.", "It was dry.")]


@pytest.mark.parametrize("family", ["gpt2", "bert", "qwen2_moe"])
def test_a_pools_edge_model_is_its_merged_mode_without_the_experts(pools, family):
    from tanbr_ray.moe.serving import moe_server

    pool = pools[family]
    pkg = edge_package(pool)
    assert pkg.shell.endswith(":PoolShell") and not any(".template." in k or k.startswith(("experts", "router")) for k in pkg.tensors)
    edge = EdgeModel(pkg)
    ids = torch.tensor([[5, 17, 9, 3]]), torch.ones(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
    for x in (np.array([0.3, 0.7]), np.array([1.0, 0.0])) if pool.num_experts == 2 else (np.full(4, 0.25),):
        edge.load_ffn(pool.merged_state(x))
        for task in pool.tasks:  # the same logits as the pool's merged mode (adapted where the pool adapts)
            assert torch.equal(edge.model(*ids, task), pool(*ids, task, mode="merged", x=x)), (task, x)
        assert np.array_equal(edge.predict_items(ITEMS), moe_server(pool, "merged", x)(ITEMS))
    assert edge.resident_bytes() == pool.resident_bytes("merged") < pool.resident_bytes("top2")
    if family == "gpt2":
        assert bool(pool.adapted.item())  # so the package carried the adapted norms and heads


def test_versions_on_one_pool_shell_run_from_threads_at_once(pools):
    """A replica serving several nodes runs their versions concurrently on one shell: each thread
    gets its own version's predictions (no version's weights swapped into the shell)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = pools["gpt2"]
    edge = EdgeModel(edge_package(pool))
    xs = [np.array([1.0, 0.0]), np.array([0.0, 1.0])]
    versions = [edge.shell.with_ffn(pool.merged_state(x)) for x in xs]
    ids = torch.randint(3, 500, (8, 12)), torch.ones(8, 12, dtype=torch.long), torch.zeros(8, 12, dtype=torch.long)
    want = [v(*ids, "SST-2") for v in versions]
    assert not torch.equal(want[0], want[1])
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda i: versions[i % 2](*ids, "SST-2"), range(40)))
    assert all(torch.equal(g, want[i % 2]) for i, g in enumerate(got))


def test_a_pool_package_that_does_not_match_its_config_is_refused(pools):
    pool = pools["bert"]
    pkg = edge_package(pool)
    key = next(k for k in pkg.tensors if k.startswith("backbone."))
    pkg.tensors[key] = pkg.tensors[key][..., :-1]
    with pytest.raises(ValueError, match="edge package does not match its config"):
        EdgeModel(pkg)
    for shell, why in (("tanbr_ray.moe.nowhere:Shell", "cannot import"), ("collections:OrderedDict", "no edge shell")):
        with pytest.raises(ValueError, match=why):
            EdgeModel(dataclasses.replace(edge_package(pool), shell=shell))
    edge = EdgeModel(edge_package(pool))
    state = pool.merged_state(np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="merged MLP"):
        edge.load_ffn({k: v[:1] for k, v in state.items()})
