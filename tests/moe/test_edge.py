"""The edge node's model: built from a package (no experts), it matches the MoE's merged mode."""

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
    assert not edge.shell.ffn[l]["w1"].abs().sum()  # the shell itself is never written
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
