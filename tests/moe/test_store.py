"""Model cache: safetensors + JSON with checksums; truncated/altered files are refused by name."""

import json

import pytest
import torch

from tanbr_ray.moe.config import MoEConfig, load_config
from tanbr_ray.moe.store import CONFIG, STATS, WEIGHTS, load_moe, save_moe

from .conftest import random_stats


def _roundtrip(tiny_moe, tiny_cfg, d):
    tiny_moe.set_stats(random_stats(tiny_moe))
    save_moe(tiny_moe, tiny_cfg, d, {"build_seconds": 1.5})
    return load_moe(d)


def test_save_load_round_trip(tiny_moe, tiny_cfg, tmp_path):
    moe, cfg, meta = _roundtrip(tiny_moe, tiny_cfg, tmp_path)
    assert cfg == tiny_cfg and meta["build"]["build_seconds"] == 1.5
    for k, v in tiny_moe.state_dict().items():
        assert torch.equal(v, moe.state_dict()[k]), k
    for name, t in tiny_moe.stats.tensors().items():
        assert torch.equal(t, moe.stats.tensors()[name]), name
    for op in ("fisher", "regmean"):  # the statistics survive exactly, so do the merges
        for k, v in tiny_moe.merged_state([0.3, 0.7], op).items():
            assert torch.equal(v, moe.merged_state([0.3, 0.7], op)[k]), (op, k)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS, STATS]  # no temp files left
    assert len(meta["files"][WEIGHTS]["sha256"]) == 64 and len(meta["files"][STATS]["sha256"]) == 64


def test_corrupt_statistics_are_refused_by_name(tiny_moe, tiny_cfg, tmp_path):
    _roundtrip(tiny_moe, tiny_cfg, tmp_path)
    s = tmp_path / STATS
    data = bytearray(s.read_bytes())
    data[-10] ^= 0xFF
    s.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"stats\.safetensors: sha256 mismatch"):
        load_moe(tmp_path)
    s.unlink()
    with pytest.raises(ValueError, match=r"stats\.safetensors: file missing"):
        load_moe(tmp_path)


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
    assert MoEConfig().key() == MoEConfig(merge_operator="regmean", regmean_alpha=0.5).key()  # applied at merge time


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"merge_operator": "average"}, "merge_operator"),
        ({"regmean_alpha": -0.1}, "regmean_alpha"),
        ({"tasks": ["SST-2", "MNLI"], "budget": 3}, "budget"),
        ({"tasks": ["SST-2"], "expert_training": {"RTE": {"epochs": 2}}}, "expert_training"),
        ({"tasks": ["SST-2", "RTE"], "expert_training": {"RTE": {"init_from": "MNLI"}}}, "init_from"),
        ({"tasks": ["SST-2"], "expert_training": {"SST-2": {"epochs": 0}}}, "epochs"),
        ({"tasks": ["RTE", "MNLI"], "expert_training": {"RTE": {"init_from": "MNLI"}, "MNLI": {"init_from": "RTE"}}}, "cycle"),
        ({"tasks": ["RTE", "MNLI"], "expert_training": {"RTE": {"init_from": "MNLI", "label_map": [[0], [3]]}}}, "label_map"),
        ({"tasks": ["RTE", "MNLI"], "expert_training": {"RTE": {"label_map": [[0], [1]]}}}, "label_map"),
    ],
)
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**kw)


def test_expert_budgets_resolve_and_order():
    from tanbr_ray.moe.config import default_config

    cfg = default_config()
    assert cfg.expert_settings("RTE").init_from == "MNLI" and cfg.expert_settings("RTE").label_map == [[0], [1, 2]]
    assert cfg.expert_settings("SST-2").epochs == cfg.epochs and cfg.expert_settings("CoLA").balanced
    order = cfg.expert_order()
    assert sorted(order) == sorted(cfg.tasks)
    assert order.index("MNLI") < order.index("RTE") and order.index("QQP") < order.index("MRPC")


def test_presets_build_in_bf16_only_where_the_hardware_has_it(monkeypatch):
    """bf16 is in the cache key, so the preset's choice names a model of its own; an explicit
    setting wins. The bf16 default keeps the key the bf16-capable machines have always cached."""
    import torch

    from tanbr_ray.moe import precision
    from tanbr_ray.moe.config import default_config, quick_config

    for native in (False, True):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
        assert precision.native_bf16("cpu") is native
        assert default_config(device="cpu").bf16 is native and quick_config(device="cpu").bf16 is native
        assert default_config(device="cpu", bf16=True).bf16 is True
    assert default_config(device="cpu", bf16=False).key() != default_config(device="cpu", bf16=True).key()
    assert default_config(bf16=True).cache_dirname() == "minilm-task-moe-b41d8eec1eb3"


def _published(tmp_path, tiny_cfg, data_dir):
    from tanbr_ray.moe.build import load_or_build_info
    from tanbr_ray.moe.publish import publish

    built = load_or_build_info(tiny_cfg, tmp_path / "built", progress=False, data_dir=data_dir)
    publish(built.cache_dir, str(tmp_path / "storage"))
    return built, tmp_path / "storage" / tiny_cfg.cache_dirname()


def test_a_published_model_is_fetched_verified_into_another_machines_cache(tmp_path, tiny_cfg, data_dir):
    from tanbr_ray.moe.publish import load_model

    built, remote = _published(tmp_path, tiny_cfg, data_dir)
    assert sorted(p.name for p in remote.iterdir()) == ["config.json", "model.safetensors", "stats.safetensors"]
    moe, how = load_model(tiny_cfg.cache_names(), tmp_path / "other", str(tmp_path / "storage"))
    assert how == "fetched" and moe.identity == built.moe.identity
    for k, v in built.moe.state_dict().items():
        assert torch.equal(v, moe.state_dict()[k]), k
    assert load_model(tiny_cfg.cache_names(), tmp_path / "other", str(tmp_path / "nowhere"))[1] == "cache"  # no second fetch
    with pytest.raises(ValueError, match=r"not in this machine's cache .*third.*tanbr build-moe .*--publish"):
        load_model(tiny_cfg.cache_names(), tmp_path / "third", None)  # never built here, nothing to fetch: no build either


@pytest.mark.parametrize("damage", ["truncate", "alter", "missing"])
def test_a_corrupt_published_model_is_refused_naming_the_file(tmp_path, tiny_cfg, data_dir, damage):
    from tanbr_ray.moe.publish import load_model

    _, remote = _published(tmp_path, tiny_cfg, data_dir)
    victim = remote / "model.safetensors"
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[:1000])
    elif damage == "alter":
        data = bytearray(victim.read_bytes())
        data[-5] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.unlink()
    cache = tmp_path / "other"
    with pytest.raises(ValueError, match=r"published model file .*model\.safetensors"):
        load_model(tiny_cfg.cache_names(), cache, str(tmp_path / "storage"))
    assert not cache.exists() or not any(p.name == tiny_cfg.cache_dirname() for p in cache.iterdir())
    assert not list(cache.glob(".fetch-*"))  # the partial download is gone; nothing cached was touched


def test_two_processes_of_one_machine_fetching_at_once_both_get_the_model(tmp_path, tiny_cfg, data_dir):
    """Two mergers on one machine fetch together: the second rename finds the first one's copy."""
    import threading

    from tanbr_ray.moe.publish import fetch

    _published(tmp_path, tiny_cfg, data_dir)
    barrier, errors, out = threading.Barrier(2), [], []

    def one():
        barrier.wait()
        try:
            out.append(fetch(tiny_cfg.cache_dirname(), str(tmp_path / "storage"), tmp_path / "machine"))
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 2 and out[0] == out[1]
    assert sorted(p.name for p in (tmp_path / "machine").iterdir()) == [tiny_cfg.cache_dirname()]
    load_moe(out[0])


def test_a_process_finds_the_model_built_at_another_precision(tmp_path, tiny_cfg, data_dir):
    """A GPU (bf16) build published, a CPU-only process asking for the fp32 key still gets it."""
    from tanbr_ray.moe.publish import load_model

    built, _ = _published(tmp_path, tiny_cfg, data_dir)
    other = tiny_cfg.model_copy(update={"bf16": not tiny_cfg.bf16})
    assert other.cache_dirname() != tiny_cfg.cache_dirname()
    moe, how = load_model(other.cache_names(), tmp_path / "cpu-machine", str(tmp_path / "storage"))
    assert how == "fetched" and moe.identity == built.moe.identity


@pytest.mark.parametrize("name", ["../escape", "", ".", "config.json", "/abs/path"])
def test_a_model_config_naming_a_file_it_may_not_is_refused(name):
    from tanbr_ray.moe.publish import stored_files

    meta = {"files": {"model.safetensors": {"bytes": 1, "sha256": "0" * 64}, name: {"bytes": 1, "sha256": "0" * 64}}}
    with pytest.raises(ValueError, match="may not name"):
        stored_files(meta)


def test_model_names_are_checked_before_any_path_is_built(tmp_path):
    from tanbr_ray.moe.publish import fetch, load_model

    with pytest.raises(TypeError, match="list of cache folder names"):
        load_model("minilm-task-moe-0123456789ab", tmp_path)  # a string is not a list of names
    with pytest.raises(ValueError, match="not a built model's cache folder name"):
        fetch("../../etc-0123456789ab", str(tmp_path / "storage"), tmp_path)
    assert not any(tmp_path.iterdir())
