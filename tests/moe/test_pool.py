"""Pools of fine-tunes as the model: every family builds and serves every mode; the oracle is the
fine-tune itself when the shared parts agree; the operators are exact at vertices and uniform x;
bad pools are refused before any computation; the built-in MoE round-trips through export-pool."""

import json

import numpy as np
import pytest
import torch
import yaml

from tanbr_ray.moe.data import PAIR, bucket_batches, load_task
from tanbr_ray.moe.merge import Merger
from tanbr_ray.moe.merge import STATIC_MERGES
from tanbr_ray.moe.pool_store import load_or_build_pool
from tests.moe.tiny_pools import make_pool, tiny_config

FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama", "mistral", "qwen2"]
MODES = ["dense", "oracle", "top1", "top2", "soft"]


def _batches(moe, task, n=12, seed=1):
    sp = load_task(task, "dev").head(n, seed=seed)
    return bucket_batches(moe.tokenizer, sp, moe.max_len_pair if PAIR[task] else moe.max_len_single, 6)


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_is_the_fine_tune_when_only_mlps_and_heads_were_tuned(tmp_path, data_dir, family):
    """Shared parts equal in every checkpoint are kept as they are, so expert k + head k is fine-tune
    k itself: the pool's oracle logits equal the checkpoint's own forward."""
    from transformers import AutoModelForSequenceClassification

    path = make_pool(tmp_path, family, tune="mlp_head")
    built = load_or_build_pool(path, tmp_path / "models", progress=False)
    moe = built.moe
    assert built.build_info["shared"]["averaged"] == built.build_info["shared"]["regmean"] == 0
    for task in moe.tasks:
        clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / task).eval()
        for b in _batches(moe, task):
            kw = {"token_type_ids": b.token_type_ids} if family == "bert" else {}
            with torch.no_grad():
                want = clf(input_ids=b.input_ids, attention_mask=b.attention_mask, **kw).logits
                got = moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode="oracle")
            assert (got - want).abs().max() < 1e-5, (family, task)
            for mode in MODES:  # every mode serves and gives finite logits of the task's width
                out = moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode=mode)
                assert out.shape == want.shape and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def gpt2_pool(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("gpt2pool")
    return load_or_build_pool(make_pool(root, "gpt2"), root / "models", progress=False)


def test_pool_build_is_cached_by_content_and_verified(tmp_path, data_dir):
    path = make_pool(tmp_path, "llama")
    first = load_or_build_pool(path, tmp_path / "models", progress=False)
    again = load_or_build_pool(path, tmp_path / "models", progress=False)
    assert again.cache_dir == first.cache_dir and again.moe.identity == first.moe.identity
    assert set(first.build_info["stages"]) >= {"load", "shared_merge", "router", "expert_stats", "adaptation"}
    b = _batches(first.moe, "RTE")[0]
    for mode in MODES:
        a1 = first.moe(b.input_ids, b.attention_mask, b.token_type_ids, "RTE", mode=mode)
        a2 = again.moe(b.input_ids, b.attention_mask, b.token_type_ids, "RTE", mode=mode)
        assert torch.equal(a1, a2), mode
    # a changed checkpoint is another model (content-keyed), never a stale hit
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "RTE" / "model.safetensors"
    original = ckpt.read_bytes()
    t = load_file(str(ckpt))
    k = next(k for k in t if "mlp" in k)
    save_file({**t, k: t[k] + 0.01}, str(ckpt), metadata={"format": "pt"})
    assert load_or_build_pool(path, tmp_path / "models", progress=False).cache_dir != first.cache_dir
    ckpt.write_bytes(original)
    # a corrupt cached file is refused, naming it (never silently rebuilt over)
    w = first.cache_dir / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-7] + b"corrupt")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_or_build_pool(path, tmp_path / "models", progress=False)


@pytest.mark.parametrize("op", ["linear", "fisher", "regmean"])
def test_operators_exact_at_vertices_and_uniform(gpt2_pool, op):
    moe = gpt2_pool.moe
    K = moe.num_experts
    for e in range(K):
        st = moe.merged_state(np.eye(K)[e], op)
        for k, v in moe.expert_state(e).items():
            assert torch.equal(st[k], v), (op, e, k)
    uni = moe.merged_state(np.full(K, 1.0 / K), op)
    static = {v: n for n, v in STATIC_MERGES.items()}[op]
    for k, v in moe.static_state(static).items():
        assert torch.equal(uni[k], v)
    if op == "linear":
        for k, v in moe.expert_tensors().items():
            assert torch.allclose(uni[k], v.mean(1), atol=1e-7)
    if op == "regmean":  # GPT-2's Conv1D stores [in, out]: the same solve as on the [out, in] transpose
        ex = {k: (v.transpose(-1, -2) if k in moe.family.transposed else v) for k, v in moe.expert_tensors().items()}
        ref = Merger(ex, moe.stats, moe.regmean_alpha, moe.family.grams)(np.full(K, 1.0 / K), "regmean")
        for k in moe.family.transposed:
            assert torch.allclose(uni[k], ref[k].transpose(-1, -2), atol=1e-6)


def _spec(tmp_path, **changes):
    spec = yaml.safe_load((tmp_path / "pool.yaml").read_text())
    spec.update(changes)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def test_bad_pools_are_refused_before_anything_runs(tmp_path, data_dir, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    import tanbr_ray.moe.pool_build as pb

    make_pool(tmp_path, "llama", steps=1)
    ran = []
    monkeypatch.setattr(pb, "load_checkpoints", lambda *a, **k: ran.append(1))  # nothing may get this far
    models = tmp_path / "models"

    def refused(path, *needles, data_dir=None):
        with pytest.raises(ValueError) as err:
            load_or_build_pool(path, models, progress=False, data_dir=data_dir)
        for n in needles:
            assert n in str(err.value), (n, str(err.value))

    AutoModelForSequenceClassification.from_config(tiny_config("gpt2")).save_pretrained(tmp_path / "gpt2")
    refused(_spec(tmp_path, experts=[{"task": "SST-2", "checkpoint": "SST-2"}, {"task": "RTE", "checkpoint": "gpt2"}]),
            str(tmp_path / "gpt2"), "model_type 'gpt2'")
    wide = tiny_config("llama")
    wide.hidden_size, wide.head_dim = 48, 24
    AutoModelForSequenceClassification.from_config(wide).save_pretrained(tmp_path / "wide")
    refused(_spec(tmp_path, experts=[{"task": "SST-2", "checkpoint": "SST-2"}, {"task": "RTE", "checkpoint": "wide"}]),
            str(tmp_path / "wide"), "hidden_size = 48")
    refused(_spec(tmp_path, experts=[{"task": "SST-2", "checkpoint": "SST-2"}, {"task": "MNLI", "checkpoint": "RTE"}]),
            str(tmp_path / "RTE"), "num_labels = 2", "MNLI has 3")
    import transformers as tf

    tf.ElectraForSequenceClassification(tf.ElectraConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                         num_attention_heads=2, intermediate_size=64,
                                                         embedding_size=32)).save_pretrained(tmp_path / "electra")
    refused(_spec(tmp_path, base="electra"), "model_type 'electra'", "MLP layout")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(_spec(tmp_path, experts=[{"task": "SST-2", "checkpoint": "SST-2"},
                                     {"task": "RTE", "checkpoint": "some-org/not-here"}]),
            "some-org/not-here", "HF_HUB_OFFLINE=1")
    (tmp_path / "nodata").mkdir()
    refused(tmp_path / "pool.yaml", "task SST-2: no training data", data_dir=tmp_path / "nodata")
    with pytest.raises(ValueError, match="listed twice"):
        load_or_build_pool(_spec(tmp_path, experts=[{"task": "RTE", "checkpoint": "SST-2"},
                                                    {"task": "RTE", "checkpoint": "RTE"}]), models, progress=False)
    with pytest.raises(ValueError, match="budget"):
        load_or_build_pool(_spec(tmp_path, budget=3), models, progress=False)
    assert not ran and not models.exists()


def test_export_round_trip_is_exact_with_parts_and_oracle_exact_without(tmp_path, data_dir, tiny_moe_stats):
    """The built-in model (tiny, random, adapted) exported and built back: every mode's logits are the
    built-in's with the exported parts; from the checkpoints alone the oracle still is."""
    from tanbr_ray.bench.roundtrip import compare
    from tanbr_ray.moe.export import export_pool

    moe = tiny_moe_stats
    moe.adapted.fill_(1)
    moe.identity = {"key": "tiny-test", "weights_sha256": "x"}
    path = export_pool(moe, moe.tokenizer, tmp_path / "exp", "tiny", (16, 24), progress=False)
    from transformers import BertForSequenceClassification

    clf = BertForSequenceClassification.from_pretrained(tmp_path / "exp" / "MNLI")  # standalone checkpoints
    assert clf.config.num_labels == 3 and clf.config.tanbr_head["pooling"] == "mean"
    pool = load_or_build_pool(path, tmp_path / "models", progress=False)
    assert set(pool.build_info["from_parts"]) == {"adaptation", "dense_heads", "router", "statistics"}
    res = compare(moe, pool.moe, rows=10, seed=1)
    assert len(res) == 5 + 9 + 3
    for mode, r in res.items():
        assert r["max_abs_logit_diff"] <= 1e-5 and r["equal_predictions"] == 1.0, mode
    spec = yaml.safe_load(path.read_text())
    spec.pop("parts")
    spec["build"] = {"router_examples": 8, "router_steps": 5, "fisher_examples": 4, "regmean_examples": 8,
                     "adapt_steps": 2}
    (tmp_path / "exp" / "alone.yaml").write_text(yaml.safe_dump(spec))
    alone = load_or_build_pool(tmp_path / "exp" / "alone.yaml", tmp_path / "models", progress=False)
    res = compare(moe, alone.moe, rows=10, seed=1)
    assert res["oracle"]["max_abs_logit_diff"] <= 1e-5
    assert res["top1"]["max_abs_logit_diff"] > 1e-3  # the router was trained anew
    # a corrupt parts file is refused, naming it
    (tmp_path / "exp" / "parts.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="parts"):
        load_or_build_pool(path, tmp_path / "models", progress=False, rebuild=True)


def test_pool_yaml_paths_and_kinds(tmp_path):
    from tanbr_ray.moe.pool_config import load_pool_config

    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"kind": "pool", "name": "x", "base": "b",
                                                     "experts": [{"task": "SST-2", "checkpoint": "./a"},
                                                                 {"task": "RTE", "checkpoint": "org/model"}]}))
    cfg = load_pool_config(tmp_path / "p.yaml")
    assert cfg.experts[0].checkpoint == str((tmp_path / "a").resolve()) and cfg.experts[1].checkpoint == "org/model"
    (tmp_path / "q.yaml").write_text(json.dumps({"kind": "pool", "name": "x", "base": "b", "experts": [
        {"task": "SQuAD", "checkpoint": "a"}, {"task": "RTE", "checkpoint": "b"}]}))
    with pytest.raises(ValueError, match="SQuAD"):
        load_pool_config(tmp_path / "q.yaml")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_native_moe_serves_its_own_routing_and_measures_its_expert_map(tmp_path, data_dir, family):
    """A tiny native MoE: top-2 through the model's own router (Qwen2-MoE's shared expert kept, its dense
    layer left dense) is the checkpoint's forward; merged is one dense MLP per layer from x over its
    experts; tasks map to experts by measured router usage."""
    from transformers import AutoModelForSequenceClassification

    from tests.moe.tiny_pools import make_native

    built = load_or_build_pool(make_native(tmp_path, family=family), tmp_path / "models", progress=False)
    moe = built.moe
    assert moe.num_experts == 4 and moe.expert_map == "router usage"
    shares = built.build_info["expert_map"]["shares"]
    assert {t: int(np.argmax(shares[t])) for t in moe.tasks} == moe.expert_of
    assert moe.expert_labels == [f"expert {e}" for e in range(4)]
    for task in moe.tasks:
        clf = AutoModelForSequenceClassification.from_pretrained(tmp_path / task).eval()
        for b in _batches(moe, task):
            with torch.no_grad():
                want = clf(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
                got = moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode="top2")
            assert (got - want).abs().max() < 1e-5, task
    K = moe.num_experts
    for op in ("linear", "fisher", "regmean"):
        for e in range(K):
            st = moe.merged_state(np.eye(K)[e], op)
            assert all(torch.equal(st[k], v) for k, v in moe.expert_state(e).items()), (op, e)
        uni = moe.merged_state(np.full(K, 1.0 / K), op)
        static = {v: n for n, v in STATIC_MERGES.items()}[op]
        assert all(torch.equal(uni[k], v) for k, v in moe.static_state(static).items())
    # the dense mode's MLP is the experts' uniform average
    lin = moe.merged_state(np.full(K, 1.0 / K), "linear")
    for k, v in moe.base_state().items():
        assert torch.allclose(v, lin[k], atol=1e-6)
    again = load_or_build_pool(tmp_path / "native.yaml", tmp_path / "models", progress=False)
    assert again.moe.expert_of == moe.expert_of and again.moe.num_experts == 4
    assert again.moe.moe_layers == moe.moe_layers == ([1, 2] if family == "qwen2_moe" else [0, 1])


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "native"])
def test_merged_checkpoints_load_with_from_pretrained_and_predict_the_merge(tmp_path, data_dir, family):
    from transformers import AutoModelForSequenceClassification

    from tanbr_ray.moe.merged_checkpoint import write_merged
    from tests.moe.tiny_pools import make_native

    path = make_native(tmp_path) if family == "native" else make_pool(tmp_path, family)
    moe = load_or_build_pool(path, tmp_path / "models", progress=False).moe
    x = np.zeros(moe.num_experts)
    x[:2] = [0.3, 0.7]
    paths = write_merged(moe, x, "regmean", tmp_path / "merged")
    assert [p.name for p in paths] == moe.tasks
    for task, p in zip(moe.tasks, paths):
        clf = AutoModelForSequenceClassification.from_pretrained(p).eval()
        if family == "native":
            assert clf.config.model_type == "mistral"
        for b in _batches(moe, task):
            kw = {"token_type_ids": b.token_type_ids} if family == "bert" else {}
            with torch.no_grad():
                want = moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode="merged",
                           state=moe.merged_state(x, "regmean"))
                got = clf(input_ids=b.input_ids, attention_mask=b.attention_mask, **kw).logits
            assert (got - want).abs().max() < 1e-5, (family, task)
    with pytest.raises(ValueError, match="not empty"):
        write_merged(moe, x, "linear", tmp_path / "merged")


def test_builtin_merged_checkpoints_carry_the_merge(tmp_path, data_dir, tiny_moe_stats):
    """The built-in model merged at x, as BERT checkpoints: the body's mean-pooled output through the
    checkpoint's tanbr_head is the built-in merged mode's logits (adaptation included)."""
    from safetensors.torch import load_file
    from transformers import BertForSequenceClassification

    from tanbr_ray.moe.merged_checkpoint import write_merged
    from tanbr_ray.moe.model import Head, mean_pool

    moe = tiny_moe_stats
    moe.adapted.fill_(1)
    moe.identity = {"key": "tiny-test", "weights_sha256": "x"}
    x = np.array([0.25, 0.75])
    write_merged(moe, x, "fisher", tmp_path / "m")
    for task in moe.tasks:
        clf = BertForSequenceClassification.from_pretrained(tmp_path / "m" / task).eval()
        t = load_file(str(tmp_path / "m" / task / "model.safetensors"))
        head = Head(clf.config.hidden_size, clf.config.tanbr_head["inner"], clf.config.num_labels, 0.0).eval()
        head.load_state_dict({k[len("tanbr_head."):]: v for k, v in t.items() if k.startswith("tanbr_head.")})
        sp = load_task(task, "dev").head(8, seed=1)
        for b in bucket_batches(moe.tokenizer, sp, 24 if PAIR[task] else 16, 4):
            with torch.no_grad():
                hidden = clf.bert(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                  token_type_ids=b.token_type_ids).last_hidden_state
                got = head(mean_pool(hidden, b.attention_mask))
                want = moe(b.input_ids, b.attention_mask, b.token_type_ids, task, mode="merged",
                           state=moe.merged_state(x, "fisher"))
            assert (got - want).abs().max() < 1e-5, task


def test_a_task_beyond_glue_reads_its_own_files(tmp_path, data_dir):
    """A task named by the pool, its rows in local CSV / JSONL files with named fields and its own
    metric: built, scored and simulated like a GLUE task; bad data refused before any weights load."""
    import csv

    from typer.testing import CliRunner

    import tanbr_ray.cli  # noqa: F401
    from tanbr_ray.cli.app import app
    from tanbr_ray.moe.data import CUSTOM

    for split, n in (("train", 96), ("dev", 40)):
        sp = load_task("SST-2", split).head(n, seed=3)
        with open(tmp_path / f"reviews-{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["review", "positive"])
            w.writerows(zip(sp.text_a, sp.labels.tolist()))
        rte = load_task("RTE", split).head(n, seed=3)
        with open(tmp_path / f"entail-{split}.jsonl", "w") as f:
            for a, b, y in zip(rte.text_a, rte.text_b, rte.labels.tolist()):
                f.write(json.dumps({"premise": a, "claim": b, "y": y}) + "\n")
    own = {"reviews": {"data": {"train": str(tmp_path / "reviews-train.csv"), "dev": str(tmp_path / "reviews-dev.csv"),
                                "text": "review", "label": "positive"}, "metric": "f1"},
           "entail": {"data": {"train": str(tmp_path / "entail-train.jsonl"), "dev": str(tmp_path / "entail-dev.jsonl"),
                               "text": "premise", "text_b": "claim", "label": "y"}}}
    path = make_pool(tmp_path, "gpt2", tasks=("reviews", "entail"), own=own)
    CUSTOM.clear()  # a fresh process knows them only through the pool
    built = load_or_build_pool(path, tmp_path / "models", progress=False)
    assert built.moe.tasks == ["reviews", "entail"] and set(CUSTOM) == {"reviews", "entail"}
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump({"classes": [
        {"name": "dc", "count": 2, "slowdown": 1, "memory_x_dense": 8, "bandwidth_mbps": 1000, "rtt_ms": 3,
         "budget": 2, "rate": 2.0, "mix": {"reviews": 0.7, "entail": 0.3}}]}))
    r = CliRunner().invoke(app, ["simulate", f"model={path}", "slots=2", "slot_seconds=4", "pool_per_task=10",
                                 "fixed_candidates=1", f"fleet={tmp_path / 'fleet.yaml'}",
                                 f"models_dir={tmp_path / 'models'}", f"out={tmp_path / 'out'}", "wandb=disabled",
                                 "bf16=false", "calibration=measure", "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["policies"]["Tanbr"]["scores"]) == {"reviews", "entail"}
    # refusals, naming the task and the field, before any weights are read
    spec = yaml.safe_load(path.read_text())
    spec["experts"][0]["data"]["text"] = "body"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"task reviews: .*no field\(s\) \['body'\]"):
        load_or_build_pool(tmp_path / "bad.yaml", tmp_path / "models2", progress=False)
    spec = yaml.safe_load(path.read_text())
    spec["experts"][1].pop("data")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="entail.*needs `data:`"):
        load_or_build_pool(tmp_path / "bad.yaml", tmp_path / "models2", progress=False)
    assert not (tmp_path / "models2").exists()


def test_each_layers_grams_come_from_that_layers_inputs(gpt2_pool):
    """RegMean's statistics: expert e's Gram of layer m is the Gram of layer m's own MLP inputs."""
    from tanbr_ray.moe.pool_config import load_pool_config
    from tanbr_ray.moe.pool_load import record_inputs

    moe = gpt2_pool.moe
    cfg = load_pool_config(next(gpt2_pool.cache_dir.parent.parent.glob("pool.yaml")))
    for e, task in enumerate(moe.tasks):
        sp = load_task(task, "train").head(cfg.build.regmean_examples, cfg.build.seed)
        want = {m: 0 for m in range(len(moe.moe_layers))}
        for m, x in record_inputs(moe, cfg, sp):
            want[m] = want[m] + x.float().T @ x.float()
        for m in want:
            got = moe.stats.grams["in"][m, e].float() * moe.stats.tokens[e]
            assert torch.allclose(got, want[m], rtol=1e-2, atol=1e-2), (task, m)
    assert not torch.equal(moe.stats.grams["in"][0], moe.stats.grams["in"][1])


def test_model_commands_take_a_pool(tmp_path, data_dir):
    """build-moe, bench model, bench merge and merge through the real CLI on a tiny Llama pool."""
    from typer.testing import CliRunner

    import tanbr_ray.cli  # noqa: F401
    from tanbr_ray.cli.app import app

    path = make_pool(tmp_path, "llama")
    models = str(tmp_path / "models")
    run = CliRunner().invoke
    r = run(app, ["build-moe", "--model", str(path), "--models-dir", models, "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "pool-tiny-llama-" in r.output and "2 experts in layers [0, 1]" in r.output
    r = run(app, ["bench", "model", "--model", str(path), "--models-dir", models, "--json", str(tmp_path / "b.json"),
                  "--eval-examples", "6", "--mixes", "2", "--random-candidates", "2", "--landscape-examples", "8",
                  "--screen-examples", "2", "--finalists", "1", "--budget", "2", "--runs", "1", "--no-progress"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b.json").read_text())
    assert set(res["modes"]) == {"dense", "merged", "top1", "top2", "soft", "oracle"}
    assert set(res["landscape_by_operator"]) == {"linear", "fisher", "regmean"}
    r = run(app, ["bench", "merge", "--model", str(path), "--models-dir", models, "--runs", "2"])
    assert r.exit_code == 0 and "regmean" in r.output, r.output
    r = run(app, ["merge", str(tmp_path / "m"), "--model", str(path), "--x", "0.5,0.5", "--models-dir", models,
                  "--no-progress"])
    assert r.exit_code == 0 and (tmp_path / "m" / "RTE" / "config.json").exists(), r.output
    r = run(app, ["merge", str(tmp_path / "m2"), "--model", str(path), "--x", "0.5,0.6", "--models-dir", models])
    assert r.exit_code != 0 and "x" in r.output
    r = run(app, ["build-moe", "--model", str(path), "--quick"])
    assert r.exit_code != 0 and "drop --quick" in r.output


def test_a_published_pool_is_fetched_whole_into_another_machines_cache(gpt2_pool, tmp_path):
    """A pool travels as the built-in model does: published to storage, fetched and verified file by
    file (its tokenizer folder included) by a process that never saw its checkpoints; one altered
    file in storage is refused by name and leaves that machine's cache untouched."""
    from tanbr_ray.moe.publish import load_model, publish

    name = gpt2_pool.cache_dir.name
    where = publish(gpt2_pool.cache_dir, str(tmp_path / "storage"))
    remote = tmp_path / "storage" / name
    assert where.endswith(name) and (remote / "tokenizer" / "tokenizer.json").is_file()
    moe, how = load_model([name], tmp_path / "machine", str(tmp_path / "storage"))
    assert how == "fetched" and moe.identity == gpt2_pool.moe.identity and moe.tasks == gpt2_pool.moe.tasks
    b = _batches(moe, "SST-2")[0]
    x = np.array([0.4, 0.6])
    assert torch.equal(moe(b.input_ids, b.attention_mask, b.token_type_ids, "SST-2", mode="merged", x=x),
                       gpt2_pool.moe(b.input_ids, b.attention_mask, b.token_type_ids, "SST-2", mode="merged", x=x))
    tok = remote / "tokenizer" / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"[UNK]"', '"[UNK2]"', 1))
    with pytest.raises(ValueError, match=r"published model file .*tokenizer/tokenizer\.json: sha256 mismatch"):
        load_model([name], tmp_path / "other", str(tmp_path / "storage"))
    assert not (tmp_path / "other" / name).exists() and not list((tmp_path / "other").glob(".fetch-*"))
