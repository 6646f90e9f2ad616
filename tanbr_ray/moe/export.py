"""`tanbr export-pool`: the built-in MoE written as a pool of fine-tunes — K standalone
`BertForSequenceClassification` checkpoints (shared embeddings and attention, expert k's FFN in every
MoE layer, the pretrained FFN elsewhere), the base (the pretrained FFNs), the parts no single
fine-tune holds (`pool_parts.py`) and the pool YAML naming them. Built back (`model: OUT/pool.yaml`)
it predicts what the built-in model predicts: the proof, on real weights, that the pool path works.

Each checkpoint's trained head is a mean-pooled MLP (`model.Head`), which BERT's classifier (CLS →
tanh pooler → linear) cannot express; it is stored beside the standard classifier as `tanbr_head.*`
(declared in config.json), which the pool build reads. `from_pretrained` loads every checkpoint, with
its standard classifier zero (the trained head is the tanbr_head)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, BertModel

from tanbr_ray.fileio import atomic_write
from tanbr_ray.moe.data import NUM_LABELS
from tanbr_ray.moe.merge import FFN_KEYS, GRAM_OF
from tanbr_ray.moe.model import TaskMoE
from tanbr_ray.moe.pool_parts import HEAD_PREFIX, PoolParts

# the built-in FFN's parameters by their names in a BERT layer's FFN block (intermediate + output)
BERT_FFN = {"w1": "intermediate.dense.weight", "b1": "intermediate.dense.bias", "w2": "output.dense.weight",
            "b2": "output.dense.bias", "ln_w": "output.LayerNorm.weight", "ln_b": "output.LayerNorm.bias"}
BERT_GRAM = {"g1": "in", "g2": "act"}
assert set(BERT_FFN) == set(FFN_KEYS) and set(BERT_GRAM) == set(GRAM_OF.values())


def _config(moe: TaskMoE) -> BertConfig:
    cfg = copy.deepcopy(moe.bert_config)
    cfg._attn_implementation = "sdpa"
    return cfg


@torch.no_grad()
def _bert(moe: TaskMoE, ffn_of_layer) -> dict[str, torch.Tensor]:
    """A BertModel state: the MoE's embeddings and attention, `ffn_of_layer(l)` (FFN_KEYS) per layer."""
    state = {f"embeddings.{k}": v for k, v in moe.embeddings.state_dict().items()}
    for l in range(moe.bert_config.num_hidden_layers):
        state.update({f"encoder.layer.{l}.attention.{k}": v for k, v in moe.attn[l].state_dict().items()})
        state.update({f"encoder.layer.{l}.{BERT_FFN[k]}": v for k, v in ffn_of_layer(l).items()})
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _ffn(moe: TaskMoE, e: int | None):
    """Layer l's FFN: expert e in MoE layers (the pretrained FFN elsewhere, or everywhere if e is None)."""
    idx = {l: m for m, l in enumerate(moe.moe_layers)}
    return lambda l: {k: (moe.experts[k][idx[l], e] if e is not None and l in idx else moe.base[k][l]) for k in FFN_KEYS}


def _head_state(head) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()}


def _checkpoint(moe: TaskMoE, task: str, path: Path, ffn_of_layer=None, head=None, attn_ln=None) -> None:
    """Task `task`'s checkpoint: expert k's FFN (or `ffn_of_layer`'s), its head (or `head`), and the
    attention LayerNorms above the first MoE layer replaced by `attn_ln` (merge-aware adaptation)."""
    cfg = _config(moe)
    cfg.num_labels = NUM_LABELS[task]
    cfg.problem_type = "regression" if task == "STS-B" else "single_label_classification"
    head = head if head is not None else moe.heads[moe._hk(task)]
    cfg.tanbr_head = {"pooling": "mean", "inner": int(head.fc.out_features)}
    cfg.architectures = ["BertForSequenceClassification"]
    clf = BertForSequenceClassification(cfg)
    torch.nn.init.zeros_(clf.classifier.weight)
    torch.nn.init.zeros_(clf.classifier.bias)
    torch.nn.init.zeros_(clf.bert.pooler.dense.weight)
    torch.nn.init.zeros_(clf.bert.pooler.dense.bias)
    state = {f"bert.{k}": v for k, v in _bert(moe, ffn_of_layer or _ffn(moe, moe.task_index(task))).items()}
    if attn_ln is not None:
        for l in range(moe.first_moe + 1, moe.bert_config.num_hidden_layers):
            state[f"bert.encoder.layer.{l}.attention.output.LayerNorm.weight"] = attn_ln[0][l].detach().clone()
            state[f"bert.encoder.layer.{l}.attention.output.LayerNorm.bias"] = attn_ln[1][l].detach().clone()
    state.update({k: v.detach().clone() for k, v in clf.state_dict().items() if not k.startswith("bert.encoder")
                  and not k.startswith("bert.embeddings")})
    state.update({HEAD_PREFIX + k: v for k, v in _head_state(head).items()})
    clf.load_state_dict({k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)})
    path.mkdir(parents=True)
    clf.config.save_pretrained(path)
    atomic_write(path / "model.safetensors",
                 lambda p: save_file({k: v.contiguous() for k, v in state.items()}, p, metadata={"format": "pt"}))


def parts_of(moe: TaskMoE) -> PoolParts:
    """What no single checkpoint holds: router, dense heads, adapted heads and norms, statistics."""
    parts = PoolParts(moe.router_w.detach().clone(), moe.router_b.detach().clone())
    parts.dense_heads = {t: _head_state(moe.dense_heads[moe._hk(t)]) for t in moe.tasks}
    parts.dense_heads = {t: {f"mean_mlp.{k}": v for k, v in s.items()} for t, s in parts.dense_heads.items()}
    if bool(moe.adapted.item()):
        parts.merge_heads = {t: {f"mean_mlp.{k}": v for k, v in _head_state(moe.merge_heads[moe._hk(t)]).items()}
                             for t in moe.tasks}
        for l in range(moe.first_moe + 1, moe.bert_config.num_hidden_layers):  # as TaskMoE applies them
            parts.adapt[f"encoder.layer.{l}.attention.output.LayerNorm.weight"] = moe.merge_attn_ln_w[l].detach().clone()
            parts.adapt[f"encoder.layer.{l}.attention.output.LayerNorm.bias"] = moe.merge_attn_ln_b[l].detach().clone()
    if moe.stats is not None:
        t = moe.stats.tensors()
        parts.stats = {"tokens": t["tokens"]}
        parts.stats.update({f"fisher.{BERT_FFN[k]}": t[f"fisher.{k}"] for k in FFN_KEYS})
        parts.stats.update({f"gram.{BERT_GRAM[g]}": t[f"gram.{g}"] for g in GRAM_OF.values()})
    return parts


def export_pool(moe: TaskMoE, tokenizer, out: str | Path, name: str, max_len: tuple[int, int],
                progress: bool = True) -> Path:
    """Write the pool into `out` (which must not exist, or be empty); returns its pool.yaml."""
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar over the checkpoints, not one per file written
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"export-pool: {out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    base = BertModel(_config(moe), add_pooling_layer=False)
    base.load_state_dict(_bert(moe, _ffn(moe, None)))
    base.save_pretrained(out / "base")
    tokenizer.save_pretrained(out / "base", legacy_format=False)  # tokenizer.json: no vocab.txt
    for t in tqdm(moe.tasks, desc="export checkpoints", disable=not progress):
        _checkpoint(moe, t, out / t)
    parts_of(moe).save(out / "parts.safetensors")
    spec = {"kind": "pool", "name": f"{name}-pool", "base": "base", "parts": "parts.safetensors",
            "experts": [{"task": t, "checkpoint": t} for t in moe.tasks], "moe_layers": list(moe.moe_layers),
            "budget": int(moe.budget), "merge_operator": moe.merge_operator, "regmean_alpha": float(moe.regmean_alpha),
            "max_len_single": int(max_len[0]), "max_len_pair": int(max_len[1])}
    atomic_write(out / "pool.yaml", lambda p: Path(p).write_text(yaml.safe_dump(spec, sort_keys=False)))
    return out / "pool.yaml"


def write_builtin_merged(moe: TaskMoE, state, out: Path) -> list[Path]:
    """The built-in model merged (`state`: FFN_KEYS, [moe layers, ...]) as one BERT checkpoint per task,
    with the merged-mode heads and attention LayerNorms when the model is adapted."""
    idx = {l: m for m, l in enumerate(moe.moe_layers)}
    ffn = lambda l: {k: (state[k][idx[l]] if l in idx else moe.base[k][l]) for k in FFN_KEYS}  # noqa: E731
    adapted = bool(moe.adapted.item())
    out.mkdir(parents=True, exist_ok=True)
    for t in moe.tasks:
        head = (moe.merge_heads if adapted else moe.heads)[moe._hk(t)]
        _checkpoint(moe, t, out / t, ffn, head, (moe.merge_attn_ln_w, moe.merge_attn_ln_b) if adapted else None)
    return [out / t for t in moe.tasks]
