import math

import numpy as np
import pytest

from pipeline.evaluate import classification_metrics, confusion_matrix


def test_confusion_matrix_rows_are_truth():
    cm = confusion_matrix([0, 0, 1, 2, 3, 3], [0, 1, 1, 2, 3, 0])
    assert cm.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]]


def test_metrics_against_hand_computed_values():
    # glioma: 3 true, 2 found, 1 called meningioma; meningioma: 2 true, both found;
    # notumor: 2 true, 1 found, 1 called glioma; pituitary: 1 true, found.
    y_true = [0, 0, 0, 1, 1, 2, 2, 3]
    y_pred = [0, 0, 1, 1, 1, 2, 0, 3]
    m = classification_metrics(y_true, y_pred)
    assert m["n"] == 8 and m["accuracy"] == pytest.approx(6 / 8)
    g = m["per_class"]["glioma"]
    assert g["recall"] == pytest.approx(2 / 3) and g["precision"] == pytest.approx(2 / 3)
    me = m["per_class"]["meningioma"]
    assert me["recall"] == 1.0 and me["precision"] == pytest.approx(2 / 3) and me["f1"] == pytest.approx(0.8)
    nt = m["per_class"]["notumor"]
    assert nt["recall"] == 0.5 and nt["precision"] == 1.0 and nt["f1"] == pytest.approx(2 / 3)
    f1s = [2 / 3, 0.8, 2 / 3, 1.0]
    assert m["macro_f1"] == pytest.approx(np.mean(f1s))


def test_absent_class_is_nan_and_left_out_of_macro_f1():
    m = classification_metrics([0, 1], [0, 1])
    assert math.isnan(m["per_class"]["pituitary"]["recall"])
    assert m["macro_f1"] == 1.0


def test_a_class_absent_from_the_truth_but_predicted_is_left_out_of_macro_f1():
    # truth: glioma only; one glioma called meningioma
    m = classification_metrics([0, 0, 0, 0], [0, 0, 0, 1])
    assert m["per_class"]["meningioma"]["precision"] == 0.0
    assert math.isnan(m["per_class"]["meningioma"]["recall"]) and math.isnan(m["per_class"]["meningioma"]["f1"])
    assert m["per_class"]["glioma"]["recall"] == 0.75
    assert abs(m["macro_f1"] - 2 * 1.0 * 0.75 / 1.75) < 1e-12  # glioma's F1 alone
