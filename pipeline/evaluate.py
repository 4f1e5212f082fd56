"""Metrics for both stages: classification (accuracy, macro-F1, per-class precision/recall,
bootstrap intervals, McNemar) and segmentation (Dice, IoU, HD95, detection rates)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from pipeline import CLASSES


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int = len(CLASSES)) -> np.ndarray:
    """(C, C) counts; rows are the true class, columns the predicted class."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str] = CLASSES) -> dict:
    """Accuracy, macro-F1 and per-class recall/precision/F1 (recall first: a missed tumor costs most).

    A class with no true and no predicted samples gets precision/recall/F1 of NaN and is left
    out of the macro average.
    """
    cm = confusion_matrix(y_true, y_pred, len(classes))
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.where(support > 0, 0.0, np.nan))
        f1 = np.where((precision + recall) > 0, 2 * precision * recall / (precision + recall),
                      np.where(support > 0, 0.0, np.nan))
    n = int(cm.sum())
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else math.nan,
        "macro_f1": float(np.nanmean(f1)) if np.any(~np.isnan(f1)) else math.nan,
        "per_class": {c: {"recall": float(recall[i]), "precision": float(precision[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion": cm.tolist(),
    }
