"""What a pool is made of, checked before anything runs: every checkpoint's config (no weights), each
task's data, the tokenizer; then the checkpoints themselves, and the token batches the build reads."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tanbr_ray.moe.data import NUM_LABELS, PAIR, TaskSplit, bucket_batches, load_task
from tanbr_ray.moe.families import Family, family_of
from tanbr_ray.moe.pool_config import PoolConfig, register_tasks


def _hub_error(ref: str, what: str, exc: Exception) -> ValueError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = "the hub is switched off here (HF_HUB_OFFLINE=1)" if offline else f"it could not be fetched ({exc})"
    return ValueError(f"{what} {ref!r}: not a local checkpoint folder, and {why}")


def load_configs(cfg: PoolConfig) -> tuple[Family, object, dict[str, object]]:
    """Every checkpoint's config, checked against the base: one family, the same shapes, a head with
    the task's label count. Reads no weights, so a bad pool is refused before anything runs."""
    from transformers import AutoConfig

    def config_of(ref: str, what: str):
        try:
            return AutoConfig.from_pretrained(ref)
        except (OSError, ValueError) as e:
            if Path(ref).is_dir():
                raise ValueError(f"{what} {ref}: unreadable checkpoint config ({e})") from e
            raise _hub_error(ref, what, e) from e

    base = config_of(cfg.base, "base")
    family = family_of(base.model_type, f"base {cfg.base}")
    shape_keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size",
                  "num_local_experts", "num_experts", "moe_intermediate_size")
    if (cfg.kind == "native") != family.native:
        raise ValueError(f"base {cfg.base}: model_type {base.model_type!r} is {'a' if family.native else 'not a'} "
                         f"native MoE; use kind: {'native' if family.native else 'pool'}")
    experts = getattr(base, "num_local_experts", None) or getattr(base, "num_experts", None)
    if family.native and cfg.budget is not None and cfg.budget > experts:
        raise ValueError(f"budget: {cfg.budget} exceeds the MoE's {experts} experts")
    configs = {}
    for e in cfg.experts:
        c = config_of(e.checkpoint, f"checkpoint of {e.task}")
        where = f"checkpoint {e.checkpoint} (task {e.task})"
        family_of(c.model_type, where)
        if c.model_type != base.model_type:
            raise ValueError(f"{where}: model_type {c.model_type!r} differs from the base's {base.model_type!r}")
        for k in shape_keys:
            if getattr(c, k, None) != getattr(base, k, None):
                raise ValueError(f"{where}: {k} = {getattr(c, k, None)} differs from the base's {getattr(base, k, None)}")
        if e.data is not None:  # a task beyond GLUE: its label count is the checkpoint's
            register_tasks(cfg.model_copy(update={"experts": [e]}), {e.task: c.num_labels})
        if c.num_labels != NUM_LABELS[e.task]:
            raise ValueError(f"{where}: num_labels = {c.num_labels}, but {e.task} has {NUM_LABELS[e.task]} labels")
        configs[e.task] = c
    return family, base, configs


def load_data(cfg: PoolConfig, data_dir=None) -> dict[str, TaskSplit]:
    """Each task's train split (the statistics and the router read it), refused by task name if absent."""
    out = {}
    for t in cfg.tasks:
        try:
            out[t] = load_task(t, "train", data_dir)
        except (OSError, ValueError) as e:
            raise ValueError(f"task {t}: no training data ({e})") from e
        if len(out[t]) == 0:
            raise ValueError(f"task {t}: its training split is empty")
    return out


def load_tokenizer(cfg: PoolConfig):
    from transformers import AutoTokenizer

    ref = cfg.tokenizer or cfg.base
    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise _hub_error(ref, "tokenizer", e) from e
    if tok.pad_token is None:  # GPT-2 / Llama tokenizers: pad with EOS (masked out anyway)
        tok.pad_token = tok.eos_token
    return tok


def load_checkpoints(cfg: PoolConfig, family: Family, progress: bool):
    """(base backbone, {task: classifier model}); shapes of every backbone tensor checked against the base."""
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar over the checkpoints instead of one per file
    hf_logging.set_verbosity_error()  # a pooler the base lacks, a tanbr_head beside the classifier: expected
    base = AutoModel.from_pretrained(cfg.base, dtype=torch.float32)  # fp32 whatever the stored dtype
    want = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    clfs = {}
    for e in tqdm(cfg.experts, desc="load fine-tunes", disable=not progress, leave=False):
        clf = AutoModelForSequenceClassification.from_pretrained(e.checkpoint, dtype=torch.float32).eval()
        got = {k: tuple(v.shape) for k, v in getattr(clf, family.backbone).state_dict().items()}
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k) and "pooler" not in k)
        if diff:
            raise ValueError(f"checkpoint {e.checkpoint} (task {e.task}): tensor {diff[0]} is "
                             f"{got.get(diff[0])} against the base's {want.get(diff[0])}")
        clfs[e.task] = clf
    return base, clfs


def max_len(cfg: PoolConfig, task: str) -> int:
    return cfg.max_len_pair if PAIR[task] else cfg.max_len_single


def batches(moe, cfg: PoolConfig, split: TaskSplit):
    return bucket_batches(moe.tokenizer, split, max_len(cfg, split.task), cfg.build.batch_size)


@torch.no_grad()
def record_inputs(moe, cfg: PoolConfig, split: TaskSplit, mode: str = "oracle") -> list:
    """(moe layer, MLP input of the real tokens) of a split's forward in `mode`."""
    out = []
    for b in batches(moe, cfg, split):
        b = b.to(moe.device)
        rec: list = []
        moe.pooled_from_first_moe(moe.embed_to_first_moe(b.input_ids, b.attention_mask, b.token_type_ids),
                                  b.attention_mask, split.task, mode, record=rec)
        keep = b.attention_mask.bool()
        out.extend((moe.moe_layers.index(l), h[keep]) for l, h in rec)
    return out

