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

    A class with no true samples gets recall and F1 of NaN and is left out of the macro average,
    also when it was predicted (its precision is then 0; those predictions lower the recall of
    the classes they were taken from). With no predicted samples either, its precision is NaN too.
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
        "tumor_vs_none": tumor_vs_none(cm, classes),
    }


def tumor_vs_none(cm: np.ndarray, classes: Sequence[str] = CLASSES) -> dict:
    """Is-there-a-tumor view of a (C, C) confusion matrix (rows true, columns predicted).

    ``tumor_found``: share of tumor slices called any tumor class (a wrong tumor type still
    counts as found); ``notumor_correct``: share of no-tumor slices called no tumor. NaN
    when the matrix holds no slice of that kind, or when ``classes`` has no ``notumor``.
    """
    cm = np.asarray(cm)
    if "notumor" not in classes:
        return {"tumor_found": math.nan, "notumor_correct": math.nan, "n_tumor": 0, "n_notumor": 0}
    k = list(classes).index("notumor")
    tumor = [i for i in range(len(classes)) if i != k]
    n_tumor, n_none = int(cm[tumor].sum()), int(cm[k].sum())
    found = int(cm[np.ix_(tumor, tumor)].sum())
    return {"tumor_found": found / n_tumor if n_tumor else math.nan,
            "notumor_correct": int(cm[k, k]) / n_none if n_none else math.nan,
            "n_tumor": n_tumor, "n_notumor": n_none}


# --- bootstrap intervals and paired tests -------------------------------------------------------

def _resampled_confusions(y_true, y_pred, n_boot: int = 1000, seed: int = 0,
                          n_classes: int = len(CLASSES), chunk: int = 250) -> np.ndarray:
    """(n_boot, C, C) confusion matrices of ``n_boot`` resamples (with replacement) of the pairs.

    Each resample is a row of an (n_boot, N) index matrix drawn at once from ``seed``; the
    matrices come from one ``bincount`` per chunk of resamples, so N=1311 x 1000 takes ~50 ms.
    """
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D and equal length, got {y_true.shape} and {y_pred.shape}")
    n, cc = len(y_true), n_classes * n_classes
    codes = y_true * n_classes + y_pred
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n)) if n else np.zeros((n_boot, 0), np.int64)
    out = np.empty((n_boot, cc), np.int64)
    for s in range(0, n_boot, chunk):
        part = codes[idx[s:s + chunk]] + (np.arange(min(chunk, n_boot - s)) * cc)[:, None]
        out[s:s + chunk] = np.bincount(part.ravel(), minlength=part.shape[0] * cc).reshape(-1, cc)
    return out.reshape(n_boot, n_classes, n_classes)


def metrics_from_confusions(cms: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, macro-F1 and per-class recall/precision/F1 of a stack of (..., C, C) confusion matrices.

    Same conventions as :func:`classification_metrics`: recall is NaN for a class with no true
    samples; precision is 0 for a present class never predicted; F1 is NaN for an absent class,
    which macro-F1 leaves out. Per-class arrays have shape (..., C).
    """
    cms = np.asarray(cms, np.float64)
    tp = np.diagonal(cms, axis1=-2, axis2=-1)
    support, predicted = cms.sum(-1), cms.sum(-2)
    n = support.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.where(support > 0, 0.0, np.nan))
        f1 = np.where(support > 0, 2 * tp / (support + predicted), np.nan)
        present = support > 0
        macro = np.where(present.any(-1), np.nansum(f1, -1) / present.sum(-1), np.nan)
        accuracy = np.where(n > 0, tp.sum(-1) / n, np.nan)
    return {"accuracy": accuracy, "macro_f1": macro, "recall": recall, "precision": precision, "f1": f1}


def _metric_values(stats: dict[str, np.ndarray], metric) -> np.ndarray:
    if isinstance(metric, str):
        if metric not in ("accuracy", "macro_f1"):
            raise ValueError(f"metric {metric!r}: use 'accuracy', 'macro_f1' or (recall|precision|f1, class_idx)")
        return stats[metric]
    kind, k = metric
    if kind not in ("recall", "precision", "f1"):
        raise ValueError(f"metric {metric!r}: use 'accuracy', 'macro_f1' or (recall|precision|f1, class_idx)")
    return stats[kind][..., int(k)]


def _percentile_interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def _resampled_metrics(y_true, y_pred, n_boot: int, seed: int, n_classes: int) -> dict[str, np.ndarray]:
    """:func:`metrics_from_confusions` of the resamples, precision NaN where a class was never predicted."""
    cms = _resampled_confusions(y_true, y_pred, n_boot, seed, n_classes)
    stats = metrics_from_confusions(cms)
    # a resample without a prediction of the class has no precision (0/0); counting it as the point
    # estimate's 0 would pull the lower bound to 0 for a class that is always right when predicted
    stats["precision"] = np.where(cms.sum(-2) > 0, stats["precision"], np.nan)
    return stats


def bootstrap_ci(y_true: Sequence[int], y_pred: Sequence[int], metric="accuracy", n_boot: int = 1000,
                 seed: int = 0, alpha: float = 0.05, n_classes: int = len(CLASSES)) -> tuple[float, float]:
    """Percentile-bootstrap ``1 - alpha`` interval of ``metric`` over resampled (true, pred) pairs.

    ``metric``: ``"accuracy"``, ``"macro_f1"``, or ``("recall" | "precision" | "f1", class_idx)``.
    Resamples where the metric is undefined (e.g. a class drawn zero times, or for precision
    never predicted) are skipped; an empty input gives ``(nan, nan)``. Deterministic for a given ``seed``.
    """
    if len(y_true) == 0:
        return (math.nan, math.nan)
    stats = _resampled_metrics(y_true, y_pred, n_boot, seed, n_classes)
    return _percentile_interval(_metric_values(stats, metric), alpha)


def bootstrap_cis(y_true: Sequence[int], y_pred: Sequence[int], classes: Sequence[str] = CLASSES,
                  n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """All intervals at once from one set of resamples (same numbers as :func:`bootstrap_ci`):
    ``{"accuracy": (lo, hi), "macro_f1": ..., "recall": {class: (lo, hi)}, "precision": ..., "f1": ...}``."""
    if len(y_true) == 0:
        nan = (math.nan, math.nan)
        return {"accuracy": nan, "macro_f1": nan, **{k: {c: nan for c in classes} for k in ("recall", "precision", "f1")}}
    stats = _resampled_metrics(y_true, y_pred, n_boot, seed, len(classes))
    out: dict = {m: _percentile_interval(stats[m], alpha) for m in ("accuracy", "macro_f1")}
    for kind in ("recall", "precision", "f1"):
        out[kind] = {c: _percentile_interval(stats[kind][:, i], alpha) for i, c in enumerate(classes)}
    return out


#: Below this many discordant pairs :func:`mcnemar` uses the exact binomial test.
MCNEMAR_EXACT_BELOW = 25


def mcnemar(y_true: Sequence[int], pred_a: Sequence[int], pred_b: Sequence[int]) -> dict:
    """McNemar's test of two classifiers on the same samples.

    ``b``: samples A gets right and B wrong; ``c``: B right, A wrong. With ``b + c < 25`` the
    exact two-sided binomial test (``statistic`` = min(b, c)), otherwise chi-square with 1
    degree of freedom and continuity correction, ``max(|b - c| - 1, 0)^2 / (b + c)``.
    """
    from scipy import stats

    y_true, pred_a, pred_b = (np.asarray(v, np.int64) for v in (y_true, pred_a, pred_b))
    if not (y_true.shape == pred_a.shape == pred_b.shape):
        raise ValueError(f"mcnemar: shapes differ: {y_true.shape}, {pred_a.shape}, {pred_b.shape}")
    right_a, right_b = pred_a == y_true, pred_b == y_true
    b, c = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    if b + c < MCNEMAR_EXACT_BELOW:
        p = 1.0 if b + c == 0 else float(stats.binomtest(min(b, c), b + c, 0.5).pvalue)
        statistic, method = float(min(b, c)), "exact binomial"
    else:
        # the correction must not overshoot: b == c is no evidence at all (statistic 0, p = 1)
        statistic = max(abs(b - c) - 1, 0) ** 2 / (b + c)
        p, method = float(stats.chi2.sf(statistic, 1)), "chi-square, continuity-corrected"
    return {"b": b, "c": c, "statistic": float(statistic), "p_value": min(1.0, p), "method": method,
            "n": int(len(y_true))}
