"""Tiny pools of fine-tunes for tests: a random-weight base of one family, fine-tuned a few steps per
task on the local GLUE copy, saved as `*ForSequenceClassification` checkpoints, and the pool YAML."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from tanbr_ray.moe.build import minilm_path
from tanbr_ray.moe.data import NUM_LABELS, bucket_batches, load_task
from tanbr_ray.moe.families import family_of

VOCAB = 30522  # the MiniLM tokenizer's


def tiny_config(family: str, num_labels: int = 2):
    import transformers as tf

    common = dict(vocab_size=VOCAB, num_labels=num_labels, pad_token_id=0)
    if family == "gpt2":
        return tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=160, **common)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
        return cls(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                   num_key_value_heads=2, max_position_embeddings=160, **common)
    cls = {"bert": tf.BertConfig, "roberta": tf.RobertaConfig, "distilbert": tf.DistilBertConfig}[family]
    if family == "distilbert":
        return cls(n_layers=2, dim=32, hidden_dim=64, n_heads=2, max_position_embeddings=160, **common)
    return cls(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
               max_position_embeddings=160, **common)


def _fine_tune(clf, params, tok, task: str, steps: int, seed: int, lr: float, token_types: bool = False) -> None:
    """A few AdamW steps of `params` on the task's training rows (batches of 16, 32 tokens)."""
    opt = torch.optim.AdamW(params, lr=lr)
    for b in bucket_batches(tok, load_task(task, "train").head(16 * steps, seed), 32, 16)[:steps]:
        kw = {"token_type_ids": b.token_type_ids} if token_types else {}
        loss = clf(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels, **kw).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def make_pool(root: Path, family: str, tasks=("SST-2", "RTE"), steps: int = 4, seed: int = 0, tune: str = "all",
              own: dict | None = None, **extra) -> Path:
    """Write base + one fine-tune per task under root; returns the pool YAML's path. `tune`: all
    parameters, or "mlp_head" (the MLP blocks and the head only: the shared parts stay the base's).
    `own`: tasks beyond GLUE, {task: {"data": {...}, "metric": ...}} (binary classification)."""
    from tanbr_ray.moe.data import TaskSource, register_task

    for t, spec in (own or {}).items():  # fine-tuning below reads their rows through load_task
        d = spec["data"]
        register_task(TaskSource(t, 2, spec.get("metric", "accuracy"), d["train"], d["dev"], d["text"],
                                 d.get("label", "label"), d.get("text_b")))
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    base = AutoModel.from_config(tiny_config(family))
    base.save_pretrained(root / "base")
    experts = []
    for i, t in enumerate(tasks):
        torch.manual_seed(seed + 1 + i)
        clf = AutoModelForSequenceClassification.from_config(tiny_config(family, NUM_LABELS[t]))
        bb = getattr(clf, clf.base_model_prefix)
        bb.load_state_dict(base.state_dict(), strict=False)
        params = list(clf.parameters())
        if tune == "mlp_head":
            fam = family_of(clf.config.model_type, "test")
            layers = fam.layer_list(getattr(clf, fam.backbone))
            params = [p for layer in layers for p in fam.get_mlp(layer).parameters()]
            params += list(fam.head_modules(clf).parameters())
        clf.train()
        _fine_tune(clf, params, tok, t, steps, seed, 3e-3, family == "bert")
        clf.eval().save_pretrained(root / t)
        experts.append({"task": t, "checkpoint": t, **(own or {}).get(t, {})})
    spec = {"name": f"tiny-{family}", "base": "base", "tokenizer": minilm_path(), "experts": experts,
            "max_len_single": 32, "max_len_pair": 48,
            "build": {"router_examples": 16, "router_steps": 20, "fisher_examples": 8, "regmean_examples": 16,
                      "batch_size": 8}}
    return _write_spec(root / "pool.yaml", spec, extra)


def make_native(root: Path, tasks=("SST-2", "RTE"), steps: int = 4, seed: int = 0, experts: int = 4,
                family: str = "mixtral", **extra) -> Path:
    """A tiny native MoE (Mixtral, or Qwen2-MoE with a shared expert and a dense layer, or Qwen3-MoE)
    with random weights and, per task, a classifier checkpoint of it whose head (only) was trained a
    few steps; returns the native YAML's path."""
    import transformers as tf

    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    def config(num_labels=2):
        common = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=160, vocab_size=VOCAB,
                      num_labels=num_labels, pad_token_id=0)
        if family == "qwen2_moe":
            return tf.Qwen2MoeConfig(num_experts=experts, moe_intermediate_size=48, shared_expert_intermediate_size=40,
                                     mlp_only_layers=[0], num_hidden_layers=3, **{k: v for k, v in common.items()
                                                                                   if k != "num_hidden_layers"})
        if family == "qwen3_moe":
            return tf.Qwen3MoeConfig(num_experts=experts, moe_intermediate_size=48, head_dim=16, **common)
        return tf.MixtralConfig(num_local_experts=experts, **common)

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    base = AutoModel.from_config(config())
    base.save_pretrained(root / "moe")
    entries = []
    for i, t in enumerate(tasks):
        torch.manual_seed(seed + 1 + i)
        clf = AutoModelForSequenceClassification.from_config(config(NUM_LABELS[t]))
        clf.model.load_state_dict(base.state_dict())
        _fine_tune(clf, list(clf.score.parameters()), tok, t, steps, seed, 1e-2)
        clf.eval().save_pretrained(root / t)
        entries.append({"task": t, "checkpoint": t})
    spec = {"kind": "native", "name": f"tiny-{family.replace('_', '-')}", "base": "moe", "tokenizer": minilm_path(), "tasks": entries,
            "max_len_single": 32, "max_len_pair": 48,
            "build": {"router_examples": 16, "fisher_examples": 8, "regmean_examples": 16, "batch_size": 8,
                      "adapt_steps": 4}}
    return _write_spec(root / "native.yaml", spec, extra)


def _write_spec(path: Path, spec: dict, extra: dict) -> Path:
    path.write_text(yaml.safe_dump({**spec, **extra}))
    return path
