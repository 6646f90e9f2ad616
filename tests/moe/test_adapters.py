"""HF MoE adapters on tiny random Mixtral / Qwen2-MoE / OLMoE models built from configs (no downloads):
a one-hot merge equals the MoE forward with its router forced to that expert."""

import numpy as np
import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from tanbr_ray.moe.adapters import (
    MergedMLP,
    extract_experts,
    find_moe_blocks,
    force_expert,
    load_hf_moe,
    merge_hf_checkpoint,
    merge_hf_moe,
    param_bytes,
)

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _mixtral():
    return MixtralForCausalLM(MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2))


def _qwen2():
    return Qwen2MoeForCausalLM(
        Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40)
    )


def _olmoe():
    return OlmoeForCausalLM(OlmoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2))


def _init(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(params=["mixtral", "qwen2_moe", "olmoe"])
def hf_moe(request):
    return _init({"mixtral": _mixtral, "qwen2_moe": _qwen2, "olmoe": _olmoe}[request.param]())


IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def test_extract_experts_shapes(hf_moe):
    layers = extract_experts(hf_moe)
    assert len(layers) == 2 and all(l.num_experts == 4 for l in layers)
    blk = find_moe_blocks(hf_moe)[0][1]
    assert torch.equal(layers[0].gate_up, blk.experts.gate_up_proj)


@torch.no_grad()
def test_one_hot_merge_equals_forced_routing(hf_moe):
    for e in range(4):
        dense = merge_hf_moe(hf_moe, np.eye(4)[e])
        with force_expert(hf_moe, e):
            want = hf_moe(IDS).logits
        got = dense(IDS).logits
        assert torch.allclose(got, want, atol=1e-5), e
    normal = hf_moe(IDS).logits  # forcing is undone afterwards
    assert not torch.allclose(normal, want, atol=1e-4)


@torch.no_grad()
def test_mixed_merge_is_weighted_parameters_and_smaller(hf_moe):
    x = [0.1, 0.2, 0.3, 0.4]
    dense = merge_hf_moe(hf_moe, x)
    name, blk = find_moe_blocks(hf_moe)[0]
    merged = dense.get_submodule(name)
    assert isinstance(merged, MergedMLP)
    want = sum(w * blk.experts.gate_up_proj[k] for k, w in enumerate(x))
    assert torch.allclose(merged.gate_up_proj, want, atol=1e-6)
    assert param_bytes(dense) < param_bytes(hf_moe)
    assert dense(IDS).logits.shape == hf_moe(IDS).logits.shape


def test_bad_x_and_non_moe_model(hf_moe):
    with pytest.raises(ValueError, match="length 4"):
        merge_hf_moe(hf_moe, [0.5, 0.5])
    with pytest.raises(ValueError, match="budget"):
        merge_hf_moe(hf_moe, [0.25] * 4, budget=2)
    with pytest.raises(ValueError, match="no fused-expert MoE blocks"):
        merge_hf_moe(torch.nn.Linear(2, 2), [1.0])


def test_checkpoint_round_trip(tmp_path):
    model = _init(_mixtral())
    model.save_pretrained(tmp_path / "mixtral", safe_serialization=True)
    loaded = load_hf_moe(tmp_path / "mixtral")
    dense = merge_hf_checkpoint(tmp_path / "mixtral", [0, 0, 1, 0], tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with torch.no_grad(), force_expert(loaded, 2):
        assert torch.allclose(dense(IDS).logits, loaded(IDS).logits, atol=1e-5)
    with pytest.raises(ValueError, match="not a local model folder"):
        load_hf_moe(tmp_path / "missing")
