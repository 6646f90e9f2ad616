"""bf16 serving: the token-routed, soft and oracle modes read experts cast once, bit-identical to
what autocast makes of the fp32 experts at every pass."""

import pytest
import torch

from tanbr_ray.moe.precision import bf16


def _logits(moe, mode):
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return moe(ids, mask, torch.zeros_like(ids), "SST-2", mode=mode)


@pytest.mark.parametrize("mode", ["top1", "top2", "soft", "oracle"])
def test_bf16_serving_casts_the_experts_once_and_changes_no_output(tiny_moe, monkeypatch, mode):
    with torch.no_grad(), bf16("cpu"):
        cast = _logits(tiny_moe, mode)
        kept = tiny_moe.serving_experts()
        assert kept["w1"].dtype == torch.bfloat16 and kept["w2"].dtype == torch.bfloat16
        assert kept["b1"].dtype == torch.float32 and tiny_moe.serving_experts() is kept  # made once
        with monkeypatch.context() as m:  # autocast casting the fp32 experts itself, at this pass
            m.setattr(tiny_moe, "serving_experts", lambda: tiny_moe.experts)
            per_pass = _logits(tiny_moe, mode)
    assert torch.equal(cast, per_pass)
    with torch.no_grad():
        assert tiny_moe.serving_experts()["w1"].dtype == torch.float32  # outside autocast: the fp32 experts


def test_the_cast_follows_changes_to_the_experts(tiny_moe):
    with torch.no_grad(), bf16("cpu"):
        before = tiny_moe.serving_experts()["w1"].clone()
        tiny_moe.experts["w1"].mul_(2.0)
        after = tiny_moe.serving_experts()["w1"]
        assert torch.equal(after, tiny_moe.experts["w1"].to(torch.bfloat16)) and not torch.equal(after, before)
    with bf16("cpu"):  # training (grad on): autocast handles the leaves itself, no stale copy
        assert tiny_moe.serving_experts() is tiny_moe.experts


def _dense_logits(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return model(ids, mask, torch.zeros_like(ids), "SST-2")


def test_merged_models_cast_their_ffns_once_and_change_no_output(tiny_moe, monkeypatch):
    """The dense model a node serves (its shell, and a merged version on it) reads bf16 w1/w2 made
    once, bit-identical to autocast casting the fp32 FFNs at every pass; fp32 passes them through."""
    shell = tiny_moe.dense_model(x=[0.3, 0.7])
    version = shell.with_ffn(tiny_moe.merged_state([0.6, 0.4]))
    for model, owner, layers in ((shell, shell, list(shell.ffn)), (version, version, version.ffn_layers)):
        with torch.no_grad(), bf16("cpu"):
            cast = _dense_logits(model)
            kept = owner._cast.get(layers)
            assert all(p["w1"].dtype == torch.bfloat16 and p["b1"].dtype == torch.float32 for p in kept)
            assert owner._cast.get(layers) is kept  # made once
            with monkeypatch.context() as m:
                m.setattr(owner._cast, "get", lambda ffns: ffns)
                per_pass = _dense_logits(model)
        assert torch.equal(cast, per_pass)
        with torch.no_grad():
            assert owner._cast.get(layers) is layers


def test_a_reloaded_shell_serves_its_new_ffns(tiny_moe):
    shell = tiny_moe.dense_model(x=[0.3, 0.7])
    other = tiny_moe.dense_model(x=[0.9, 0.1])
    with torch.no_grad(), bf16("cpu"):
        before = _dense_logits(shell)
        shell.load_state_dict(other.state_dict())
        assert torch.equal(_dense_logits(shell), _dense_logits(other)) and not torch.equal(before, _dense_logits(shell))
