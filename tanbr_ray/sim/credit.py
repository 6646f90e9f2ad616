"""What a served answer earns: per-request credit (the rewards and the headline) and the GLUE metrics."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tanbr_ray.moe.data import NUM_LABELS, load_task


def class_weights(tasks: Sequence[str], data_dir: str | None) -> dict[str, np.ndarray]:
    """Credit per correct answer of each class, 1 / (C p_y) with p_y the class's share of the task's
    training labels: the expected credit of a policy is then its balanced accuracy (mean recall), and
    answering every request with the majority class earns 1/C, as MCC and F1 would have it, instead of
    the majority's share. Regression tasks (STS-B) have none."""
    out = {}
    for task in tasks:
        C = NUM_LABELS[task]
        if C < 2:
            continue
        counts = np.bincount(load_task(task, "train", data_dir).labels, minlength=C).astype(np.float64)
        out[task] = 1.0 / (C * (counts + 1.0) / (counts.sum() + C))  # add-one: no class weighs infinitely
    return out


class Credit:
    """Credit and metrics of predictions for pool rows (the evaluator holds the labels)."""

    def __init__(self, ev, class_weight: dict[str, np.ndarray]):
        self.ev, self.class_weight = ev, class_weight

    def rows(self, rows: Sequence[tuple[str, int]], preds: np.ndarray) -> np.ndarray:
        """Per-request credit of predictions for (task, example) rows: 1 per correct class (times the
        class's weight under `credit: balanced`), 1 - |error|/5 for STS-B."""
        tasks = np.asarray([t for t, _ in rows])
        idx = np.asarray([i for _, i in rows], dtype=np.int64)
        credit = np.zeros(len(rows))
        for task in set(tasks.tolist()):
            sel = tasks == task
            credit[sel] = self.ev.credit(task, idx[sel], preds[sel])
            if task in self.class_weight:
                credit[sel] *= self.class_weight[task][self.ev.labels[task][idx[sel]].astype(np.int64)]
        return credit

    def task_metric(self, task: str, indices: np.ndarray, preds: np.ndarray) -> float:
        """The task's GLUE metric over scored requests; STS-B as its mean per-request credit (see
        `glue_note` in the results)."""
        if task == "STS-B":
            return float(self.ev.credit(task, indices, preds).mean())
        return self.ev.glue(task, indices, preds)
