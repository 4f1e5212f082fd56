import math

import numpy as np
import pytest
from scipy import stats

from pipeline.evaluate import (bootstrap_ci, bootstrap_cis, classification_metrics, confusion_matrix, mcnemar,
                               metrics_from_confusions)


def _toy(n, acc=0.85, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    pred = np.where(rng.random(n) < acc, y, rng.integers(0, 4, n))
    return y, pred


def test_confusion_stack_matches_classification_metrics():
    y, p = _toy(300, acc=0.6)
    p[p == 3] = 0  # pituitary never predicted: precision 0, F1 0
    s = metrics_from_confusions(confusion_matrix(y, p)[None])
    m = classification_metrics(y, p)
    assert s["accuracy"][0] == pytest.approx(m["accuracy"]) and s["macro_f1"][0] == pytest.approx(m["macro_f1"])
    for i, c in enumerate(m["per_class"]):
        for k in ("recall", "precision", "f1"):
            assert s[k][0, i] == pytest.approx(m["per_class"][c][k])


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", ("recall", 0), ("recall", 2), ("precision", 3)])
def test_bootstrap_ci_contains_point_estimate(metric):
    y, p = _toy(500)
    m = classification_metrics(y, p)
    point = m[metric] if isinstance(metric, str) else m["per_class"][["glioma", "meningioma", "notumor",
                                                                       "pituitary"][metric[1]]][metric[0]]
    lo, hi = bootstrap_ci(y, p, metric, n_boot=500)
    assert lo < point < hi and 0 <= lo and hi <= 1


def test_bootstrap_ci_narrows_with_n():
    widths = []
    for n in (100, 400, 1600):
        y, p = _toy(n, seed=n)
        lo, hi = bootstrap_ci(y, p, "accuracy", n_boot=1000)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.35)  # ~ 1/sqrt(N)


def test_bootstrap_ci_deterministic_by_seed():
    y, p = _toy(400)
    assert bootstrap_ci(y, p, "macro_f1", seed=3) == bootstrap_ci(y, p, "macro_f1", seed=3)
    assert bootstrap_ci(y, p, "macro_f1", seed=3) != bootstrap_ci(y, p, "macro_f1", seed=4)
    all_cis = bootstrap_cis(y, p, seed=3)
    assert all_cis["macro_f1"] == bootstrap_ci(y, p, "macro_f1", seed=3)
    assert all_cis["recall"]["notumor"] == bootstrap_ci(y, p, ("recall", 2), seed=3)


def test_bootstrap_ci_matches_a_plain_loop_and_is_fast():
    import time

    y, p = _toy(1311)
    t = time.perf_counter()
    lo, hi = bootstrap_ci(y, p, "accuracy", n_boot=1000, seed=0)
    assert time.perf_counter() - t < 1.0
    idx = np.random.default_rng(0).integers(0, 1311, size=(1000, 1311))
    accs = np.array([np.mean(y[i] == p[i]) for i in idx])
    assert (lo, hi) == pytest.approx(tuple(np.percentile(accs, [2.5, 97.5])))


def test_bootstrap_edge_cases():
    assert all(math.isnan(v) for v in bootstrap_ci([], [], "accuracy"))
    assert bootstrap_ci([0] * 20, [0] * 20) == (1.0, 1.0)
    # a class absent from the data has no recall: no interval
    assert all(math.isnan(v) for v in bootstrap_ci([0, 1] * 10, [0, 1] * 10, ("recall", 3)))
    with pytest.raises(ValueError):
        bootstrap_ci([0, 1], [0, 1], "auc")


def test_mcnemar_exact_matches_hand_computed():
    # b = 1 (A right, B wrong), c = 6 (B right, A wrong), 3 both right, 2 both wrong
    y = [0] * 12
    a = [0] + [1] * 6 + [0] * 3 + [1] * 2
    b = [1] + [0] * 6 + [0] * 3 + [1] * 2
    r = mcnemar(y, a, b)
    assert (r["b"], r["c"], r["n"]) == (1, 6, 12)
    assert r["method"].startswith("exact")
    assert r["p_value"] == pytest.approx(2 * stats.binom.cdf(1, 7, 0.5))  # = 0.125


def test_mcnemar_chi2_matches_hand_computed():
    # b = 30, c = 12 -> (|30-12|-1)^2 / 42 = 289/42
    y = np.zeros(100, int)
    a = np.r_[np.zeros(30), np.ones(12), np.zeros(40), np.ones(18)].astype(int)
    b = np.r_[np.ones(30), np.zeros(12), np.zeros(40), np.ones(18)].astype(int)
    r = mcnemar(y, a, b)
    assert (r["b"], r["c"]) == (30, 12) and r["method"].startswith("chi")
    assert r["statistic"] == pytest.approx(289 / 42)
    assert r["p_value"] == pytest.approx(stats.chi2.sf(289 / 42, 1))
    assert r["p_value"] == pytest.approx(0.00871, abs=1e-4)


def test_mcnemar_no_disagreement_and_symmetry():
    assert mcnemar([0, 1, 2], [0, 1, 1], [0, 1, 1])["p_value"] == 1.0
    y, a = _toy(200, seed=1)
    _, b = _toy(200, seed=2)
    b = np.where(np.random.default_rng(5).random(200) < 0.5, y, b)
    ab, ba = mcnemar(y, a, b), mcnemar(y, b, a)
    assert (ab["b"], ab["c"]) == (ba["c"], ba["b"]) and ab["p_value"] == pytest.approx(ba["p_value"])


def _discordant(b, c):
    """Truth all 0; A right and B wrong on ``b`` samples, the other way round on ``c``."""
    y = np.zeros(b + c, int)
    return y, np.r_[np.zeros(b), np.ones(c)].astype(int), np.r_[np.ones(b), np.zeros(c)].astype(int)


def test_mcnemar_continuity_correction_stops_at_zero():
    # (|b-c| - 1)^2 without a floor gave b = c = 13 a statistic of 1/26 and p = 0.84, below p of b=14, c=13
    tie, one_off, two_off = (mcnemar(*_discordant(b, 13)) for b in (13, 14, 15))
    assert tie["method"].startswith("chi") and tie["statistic"] == 0.0 and tie["p_value"] == 1.0
    assert tie["p_value"] >= one_off["p_value"] > two_off["p_value"]
    assert two_off["statistic"] == pytest.approx(1 / 28)


def test_bootstrap_precision_skips_resamples_without_a_prediction():
    # glioma is right both times it is predicted; resamples that drew neither prediction used to
    # count as precision 0 and pulled the interval to (0.0, 1.0)
    y, p = [0, 0, 0, 1, 1], [0, 0, 1, 1, 1]
    assert classification_metrics(y, p)["per_class"]["glioma"]["precision"] == 1.0
    assert bootstrap_ci(y, p, ("precision", 0), n_boot=500) == (1.0, 1.0)
    assert bootstrap_cis(y, p, n_boot=500)["precision"]["glioma"] == (1.0, 1.0)
    # the point estimate keeps its convention: a class present but never predicted has precision 0,
    # and no resample has a precision for it, so no interval
    never = classification_metrics([0, 0, 1, 1], [0, 0, 0, 0])["per_class"]["meningioma"]
    assert never["precision"] == 0.0
    assert all(math.isnan(v) for v in bootstrap_ci([0, 0, 1, 1], [0, 0, 0, 0], ("precision", 1)))
    # recall and F1 intervals are untouched: F1 of a never-predicted class is still 0
    assert bootstrap_ci([0, 0, 1, 1], [0, 0, 0, 0], ("f1", 1)) == (0.0, 0.0)
