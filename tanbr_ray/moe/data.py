"""GLUE data: a local copy (layout of ../shared/data/glue) or the Hugging Face hub; tokenised,
length-bucketed batches (padding to the batch's longest example keeps CPU forwards cheap)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tanbr_ray.moe.config import GLUE_TASKS

# task -> (hub config, text_a field, text_b field or None, dev split)
_HUB = {
    "CoLA": ("cola", "sentence", None, "validation"),
    "SST-2": ("sst2", "sentence", None, "validation"),
    "MRPC": ("mrpc", "sentence1", "sentence2", "validation"),
    "QQP": ("qqp", "question1", "question2", "validation"),
    "STS-B": ("stsb", "sentence1", "sentence2", "validation"),
    "MNLI": ("mnli", "premise", "hypothesis", "validation_matched"),
    "QNLI": ("qnli", "question", "sentence", "validation"),
    "RTE": ("rte", "sentence1", "sentence2", "validation"),
}
NUM_LABELS = {"CoLA": 2, "SST-2": 2, "MRPC": 2, "QQP": 2, "STS-B": 1, "MNLI": 3, "QNLI": 2, "RTE": 2}
PAIR = {t: _HUB[t][2] is not None for t in GLUE_TASKS}


@dataclass
class TaskSplit:
    """One task's split: texts and labels (class index, or float for STS-B)."""

    task: str
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.text_a)

    def subset(self, idx) -> "TaskSplit":
        idx = list(idx)
        return TaskSplit(
            self.task,
            [self.text_a[i] for i in idx],
            None if self.text_b is None else [self.text_b[i] for i in idx],
            self.labels[idx],
        )

    def head(self, n: int | None, seed: int = 0) -> "TaskSplit":
        """A seeded random subset of n examples (all when n is None or larger)."""
        if n is None or n >= len(self):
            return self
        rng = random.Random(seed)
        return self.subset(sorted(rng.sample(range(len(self)), n)))


@dataclass(frozen=True)
class TaskSource:
    """A classification task beyond GLUE, named by a pool YAML: where its rows come from (local
    JSON/JSONL/CSV files, or a `datasets` hub id) and which fields hold the text(s) and the class index."""

    name: str
    num_labels: int
    metric: str  # accuracy | f1 (binary) | matthews (binary)
    train: str  # a file path, or a split name of `hub`
    dev: str
    text: str
    label: str
    text_b: str | None = None
    hub: str | None = None  # a datasets hub id: train / dev then name its splits
    hub_config: str | None = None

    def load(self, split: str) -> "TaskSplit":
        import datasets

        where = self.train if split == "train" else self.dev
        try:
            if self.hub is not None:
                ds = datasets.load_dataset(self.hub, self.hub_config, split=where)
            else:
                fmt = "csv" if where.endswith(".csv") else "json"
                ds = datasets.load_dataset(fmt, data_files={"rows": where}, split="rows")
        except Exception as e:  # missing file, malformed rows, hub offline ...
            raise ValueError(f"task {self.name}: cannot read its {split} data {where!r} ({type(e).__name__}: {e})") from e
        missing = [f for f in (self.text, self.text_b, self.label) if f is not None and f not in ds.column_names]
        if missing:
            raise ValueError(f"task {self.name}: {split} data {where!r} has no field(s) {missing} (fields: {ds.column_names})")
        y = np.asarray(ds[self.label])
        if y.dtype.kind not in "iu" or (len(y) and (y.min() < 0 or y.max() >= self.num_labels)):
            raise ValueError(f"task {self.name}: field {self.label!r} must hold class indices 0..{self.num_labels - 1}")
        b = [str(t) for t in ds[self.text_b]] if self.text_b else None
        return TaskSplit(self.name, [str(t) for t in ds[self.text]], b, y.astype(np.int64))


CUSTOM: dict[str, TaskSource] = {}  # tasks beyond GLUE registered by the pool that names them


def register_task(src: TaskSource) -> None:
    """Make a task beyond GLUE known in this process (label count, pair or single, metric, rows)."""
    if src.name in GLUE_TASKS:
        raise ValueError(f"task {src.name}: a GLUE task name; its data is GLUE's (name your own task otherwise)")
    if src.num_labels < 2 or src.metric not in ("accuracy", "f1", "matthews"):
        raise ValueError(f"task {src.name}: a classification task (num_labels ≥ 2) with metric accuracy, f1 or matthews")
    if src.metric != "accuracy" and src.num_labels != 2:
        raise ValueError(f"task {src.name}: metric {src.metric} is binary; it has {src.num_labels} classes")
    CUSTOM[src.name] = src
    NUM_LABELS[src.name] = src.num_labels
    PAIR[src.name] = src.text_b is not None


def check_task(task: str) -> str:
    if task not in GLUE_TASKS and task not in CUSTOM:
        raise ValueError(f"unknown task {task!r}; known GLUE tasks: {GLUE_TASKS}"
                         + (f"; registered: {sorted(CUSTOM)}" if CUSTOM else ""))
    return task


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    d = data_dir or os.environ.get("TANBR_DATA_DIR")
    return Path(d) if d else None


def _load_local(root: Path, task: str, split: str) -> TaskSplit:
    path = root / task / f"{split}.jsonl"
    if not path.is_file():
        raise ValueError(f"GLUE file {path} not found (TANBR_DATA_DIR / --data-dir points at {root})")
    a, b, y = [], [], []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                a.append(str(row["text_a"]))
                b.append(row.get("text_b"))
                y.append(row["label"])
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{n}: malformed GLUE row ({e})") from e
    pair = PAIR[task]
    labels = np.asarray(y, dtype=np.float32 if task == "STS-B" else np.int64)
    return TaskSplit(task, a, [str(t or "") for t in b] if pair else None, labels)


def _load_hub(task: str, split: str) -> TaskSplit:
    import datasets

    cfg, fa, fb, dev = _HUB[task]
    ds = datasets.load_dataset("nyu-mll/glue", cfg, split="train" if split == "train" else dev)
    labels = np.asarray(ds["label"], dtype=np.float32 if task == "STS-B" else np.int64)
    return TaskSplit(task, list(ds[fa]), list(ds[fb]) if fb else None, labels)


def load_task(task: str, split: str, data_dir: str | os.PathLike | None = None) -> TaskSplit:
    """Local copy when TANBR_DATA_DIR/data_dir is set, else the hub; a clear error when neither works."""
    check_task(task)
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    if task in CUSTOM:
        return CUSTOM[task].load(split)
    root = resolve_data_dir(data_dir)
    if root is not None:
        if not root.is_dir():
            raise ValueError(f"GLUE data directory {root} does not exist (set TANBR_DATA_DIR or --data-dir)")
        return _load_local(root, task, split)
    try:
        return _load_hub(task, split)
    except Exception as e:  # offline, no `datasets` cache, hub down ...
        raise ValueError(
            f"cannot load GLUE task {task}: no local data (set TANBR_DATA_DIR or pass --data-dir to a "
            f"directory laid out as <TASK>/{{train,dev}}.jsonl) and the hub is unreachable ({type(e).__name__})"
        ) from e


@dataclass
class Batch:
    """A padded, single-task batch; `index` maps rows back to positions in the task split."""

    task: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    labels: torch.Tensor
    index: np.ndarray

    def to(self, device) -> "Batch":
        return Batch(
            self.task,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.token_type_ids.to(device),
            self.labels.to(device),
            self.index,
        )


def tokenize(tokenizer, split: TaskSplit, max_len: int):
    """Unpadded token ids and type ids (padding happens per bucket)."""
    enc = tokenizer(
        split.text_a,
        split.text_b,
        truncation=True,
        max_length=max_len,
        padding=False,
        return_token_type_ids=True,
    )
    return enc


def bucket_batches(
    tokenizer, split: TaskSplit, max_len: int, batch_size: int, shuffle: bool = False, seed: int = 0
) -> list[Batch]:
    """Sort by length, cut into batches, pad each to its longest row; shuffle batch order if asked."""
    enc = tokenize(tokenizer, split, max_len)
    ids, tts = enc["input_ids"], enc["token_type_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    if shuffle:  # jitter lengths a little so batches differ between epochs but stay bucketed
        rng = np.random.default_rng(seed)
        noisy = np.array([len(x) for x in ids]) + rng.uniform(0, 4, len(ids))
        order = np.argsort(noisy, kind="stable")
    batches = []
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        L = max(len(ids[i]) for i in idx)
        inp = torch.zeros(len(idx), L, dtype=torch.long)
        tt = torch.zeros(len(idx), L, dtype=torch.long)
        am = torch.zeros(len(idx), L, dtype=torch.long)
        for r, i in enumerate(idx):
            n = len(ids[i])
            inp[r, :n] = torch.tensor(ids[i])
            tt[r, :n] = torch.tensor(tts[i])
            am[r, :n] = 1
        lab = torch.as_tensor(split.labels[idx])
        batches.append(Batch(split.task, inp, am, tt, lab, np.asarray(idx)))
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches
