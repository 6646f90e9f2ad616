"""GLUE metrics per task, as fractions in [0, 1] (correlations in [-1, 1])."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr

from tanbr_ray.moe.data import check_task

METRIC = {
    "CoLA": "matthews_corrcoef",
    "SST-2": "accuracy",
    "MRPC": "f1_accuracy_mean",
    "QQP": "f1_accuracy_mean",
    "STS-B": "pearson_spearman_mean",
    "MNLI": "accuracy",
    "QNLI": "accuracy",
    "RTE": "accuracy",
}


def accuracy(pred, y) -> float:
    pred, y = np.asarray(pred), np.asarray(y)
    return float((pred == y).mean()) if len(y) else 0.0


def f1_binary(pred, y) -> float:
    pred, y = np.asarray(pred), np.asarray(y)
    tp = float(((pred == 1) & (y == 1)).sum())
    fp = float(((pred == 1) & (y == 0)).sum())
    fn = float(((pred == 0) & (y == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(pred, y) -> float:
    pred, y = np.asarray(pred), np.asarray(y)
    tp = float(((pred == 1) & (y == 1)).sum())
    tn = float(((pred == 0) & (y == 0)).sum())
    fp = float(((pred == 1) & (y == 0)).sum())
    fn = float(((pred == 0) & (y == 1)).sum())
    den = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if den == 0 else float((tp * tn - fp * fn) / den)


def pearson_spearman(pred, y) -> float:
    pred, y = np.asarray(pred, dtype=float), np.asarray(y, dtype=float)
    if len(y) < 2 or np.std(pred) == 0 or np.std(y) == 0:
        return 0.0
    return float((pearsonr(pred, y)[0] + spearmanr(pred, y)[0]) / 2)


def glue_score(task: str, pred, labels) -> float:
    """The task's GLUE metric (MRPC/QQP: mean of F1 and accuracy; STS-B: mean of Pearson and Spearman)."""
    from tanbr_ray.moe.data import CUSTOM

    check_task(task)
    m = METRIC.get(task) or {"accuracy": "accuracy", "f1": "f1", "matthews": "matthews_corrcoef"}[CUSTOM[task].metric]
    if len(np.asarray(pred)) != len(np.asarray(labels)):
        raise ValueError(f"{task}: {len(pred)} predictions for {len(labels)} labels")
    if m == "accuracy":
        return accuracy(pred, labels)
    if m == "matthews_corrcoef":
        return matthews(pred, labels)
    if m == "f1":
        return f1_binary(pred, labels)
    if m == "f1_accuracy_mean":
        return (f1_binary(pred, labels) + accuracy(pred, labels)) / 2
    return pearson_spearman(pred, labels)


def weighted_score(scores: dict[str, float], psi: dict[str, float]) -> float:
    """ψ-weighted score of a mix: Σ_v ψ_v · score_v."""
    return float(sum(psi[t] * scores[t] for t in psi))


def request_credit(task: str, pred, labels) -> np.ndarray:
    """Per-request credit in [0, 1]: correct or not (classification), 1 - |error|/5 (STS-B, labels in
    [0, 5]). What a user of the fleet experiences per request, and what merging can be scored by on
    any mix of tasks (GLUE metrics such as MCC or correlations are not means over requests)."""
    pred, y = np.asarray(pred), np.asarray(labels)
    if check_task(task) == "STS-B":
        return np.clip(1.0 - np.abs(pred.astype(np.float64) - y) / 5.0, 0.0, 1.0)
    return (pred == y).astype(np.float64)


def majority_prediction(task: str, train_labels) -> float:
    """The label a constant predictor would give: the majority class, or the mean for STS-B."""
    y = np.asarray(train_labels)
    if check_task(task) == "STS-B":
        return float(y.mean())
    return float(np.bincount(y.astype(np.int64)).argmax())
