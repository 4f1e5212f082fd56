from pipeline.segment.tune import _dice, choose_conf

import numpy as np


def row(conf, dice, false):
    return {"conf": conf, "mean_dice": dice, "false_mask_rate": false}


def test_best_dice_within_false_mask_budget():
    table = [row(0.1, 0.90, 0.10), row(0.25, 0.86, 0.03), row(0.4, 0.84, 0.01)]
    assert choose_conf(table, 0.03)["conf"] == 0.25
    assert choose_conf(table, 0.2)["conf"] == 0.1


def test_no_threshold_within_budget_takes_fewest_false_masks():
    table = [row(0.1, 0.90, 0.20), row(0.4, 0.80, 0.08)]
    assert choose_conf(table, 0.03)["conf"] == 0.4


def test_dice_of_masks():
    a = np.zeros((10, 10), np.uint8)
    b = np.zeros((10, 10), np.uint8)
    a[:, :4] = 255
    b[:, 2:6] = 255
    assert _dice(a, b) == 2 * 20 / 80
    assert _dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
