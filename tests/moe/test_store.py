"""Model cache: safetensors + JSON with checksums; truncated/altered files are refused by name."""

import json

import pytest
import torch

from tanbr_ray.moe.config import MoEConfig, load_config
from tanbr_ray.moe.store import CONFIG, WEIGHTS, load_moe, save_moe


def _roundtrip(tiny_moe, tiny_cfg, d):
    tiny_moe.static_merges = {"fisher": tiny_moe.merged_state([0.2, 0.8])}
    save_moe(tiny_moe, tiny_cfg, d, {"build_seconds": 1.5})
    return load_moe(d)


def test_save_load_round_trip(tiny_moe, tiny_cfg, tmp_path):
    moe, cfg, meta = _roundtrip(tiny_moe, tiny_cfg, tmp_path)
    assert cfg == tiny_cfg and meta["build"]["build_seconds"] == 1.5
    for k, v in tiny_moe.state_dict().items():
        assert torch.equal(v, moe.state_dict()[k]), k
    assert torch.equal(moe.static_state("fisher")["w1"], tiny_moe.static_merges["fisher"]["w1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]  # no temp files left
    assert len(meta["files"][WEIGHTS]["sha256"]) == 64


def test_truncated_or_altered_weights_are_refused(tiny_moe, tiny_cfg, tmp_path):
    _roundtrip(tiny_moe, tiny_cfg, tmp_path)
    w = tmp_path / WEIGHTS
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: sha256 mismatch"):
        load_moe(tmp_path)
    w.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ValueError, match=r"model\.safetensors: size .*truncated"):
        load_moe(tmp_path)


def test_corrupt_or_missing_config_is_refused(tiny_moe, tiny_cfg, tmp_path):
    _roundtrip(tiny_moe, tiny_cfg, tmp_path)
    (tmp_path / CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: corrupt"):
        load_moe(tmp_path)
    (tmp_path / CONFIG).unlink()
    with pytest.raises(ValueError, match=r"config\.json: no model config"):
        load_moe(tmp_path)


def test_config_validation_names_field_and_file(tmp_path):
    with pytest.raises(ValueError, match="tasks"):
        MoEConfig(tasks=["SST-2", "SQuAD"])
    with pytest.raises(ValueError, match="budget"):
        MoEConfig(tasks=["SST-2"], budget=3)
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        MoEConfig(lr_typo=1e-3)
    p = tmp_path / "moe.yaml"
    p.write_text("lr: -1\n")
    with pytest.raises(ValueError, match=r"(?s)moe\.yaml.*lr"):
        load_config(p)
    p.write_text(json.dumps({"tasks": ["QNLI"], "train_examples": 10}))
    assert load_config(p).tasks == ["QNLI"]
    assert MoEConfig().key() != MoEConfig(lr=1e-4).key()
