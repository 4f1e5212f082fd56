from pipeline.segment.tune import _dice, choose_conf

import numpy as np


class Bright:
    """A stand-in segmenter: "tumor" wherever a pixel is above 200."""

    def predict(self, images):
        from pipeline.segment.yolo import SegResult

        return [SegResult(mask=np.where(im > 200, 255, 0).astype(np.uint8), boxes=np.zeros((0, 4), np.float32),
                          scores=np.zeros(0, np.float32)) for im in images]


def one_lesion_val_split(tmp_path):
    """A ``seg-data`` folder with one validation slice (a bright square) and its mask; the square's image."""
    import cv2

    data = tmp_path / "data"
    (data / "images" / "val").mkdir(parents=True)
    (data / "masks" / "val").mkdir(parents=True)
    lesion = np.full((32, 32), 50, np.uint8)
    lesion[8:16, 8:16] = 255
    cv2.imwrite(str(data / "images" / "val" / "t.png"), lesion)
    cv2.imwrite(str(data / "masks" / "val" / "t.png"), np.where(lesion > 200, 255, 0).astype(np.uint8))
    return data, lesion


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


def test_extra_no_tumor_scans_join_the_false_mask_rate_once_each(tmp_path, monkeypatch):
    import json
    import os

    import cv2
    import numpy as np
    import pytest

    from pipeline.segment import load, tune

    monkeypatch.setattr(load, "load_segmenter", lambda *a, **k: Bright())
    data, lesion = one_lesion_val_split(tmp_path)
    healthy = np.full((32, 32), 50, np.uint8)
    cv2.imwrite(str(tmp_path / "h0.png"), healthy)
    os.symlink(tmp_path / "h0.png", data / "images" / "val" / "h0.png")  # seg-data links its backgrounds
    extra = tmp_path / "extra"
    extra.mkdir()
    cv2.imwrite(str(extra / "h1.png"), healthy)
    cv2.imwrite(str(extra / "h2.png"), lesion)  # a false mask
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'h0.png'}\n{extra / 'h1.png'}\n")  # h0 again: counted once

    base = tune.tune_conf("w.pt", data, tmp_path / "a", confs=[0.5])
    assert base["table"][0]["n_no_tumor"] == 1 and base["table"][0]["false_mask_rate"] == 0.0
    more = tune.tune_conf("w.pt", data, tmp_path / "b", confs=[0.5], extra_no_tumor=[extra, listing])
    row = more["table"][0]
    assert more["n_extra_no_tumor"] == 2 and row["n_no_tumor"] == 3
    assert row["false_mask_rate"] == pytest.approx(1 / 3)
    assert row["mean_dice"] == 1.0 and row["n_tumor"] == 1
    assert json.loads((tmp_path / "b" / "tune.json").read_text())["n_extra_no_tumor"] == 2
    listing.write_text(f"{tmp_path / 'gone.png'}\n")
    with pytest.raises(FileNotFoundError, match="gone.png: no such no-tumor scan"):
        tune.tune_conf("w.pt", data, tmp_path / "c", confs=[0.5], extra_no_tumor=[listing])


def test_refines_are_swept_and_reach_the_cascade(tmp_path, monkeypatch):
    import argparse

    import pytest

    from pipeline.segment import load, tune

    made = []

    class Cascade(Bright):  # records the refine each row set before predicting
        refine = 0
        min_area = 8

        def predict(self, images):
            made.append(self.refine)
            return super().predict(images)

    monkeypatch.setattr(load, "load_segmenter", lambda *a, **k: Cascade())
    data, _ = one_lesion_val_split(tmp_path)
    result = tune.tune_conf("w.pt", data, tmp_path / "a", confs=[0.5], min_areas=[4], refines=[0, 2])
    assert made == [0, 2] and [r["refine"] for r in result["table"]] == [0, 2]
    assert result["chosen_refine"] in (0, 2) and result["chosen_min_area"] == 4
    assert "refine" not in tune.tune_conf("w.pt", data, tmp_path / "b", confs=[0.5])["table"][0]

    monkeypatch.setattr(load, "load_segmenter", lambda *a, **k: Bright())  # no fine passes to set
    with pytest.raises(ValueError, match="--refines applies to the U-Net cascade only"):
        tune.tune_conf("w.pt", data, tmp_path / "c", confs=[0.5], refines=[1])
    parser = argparse.ArgumentParser()
    tune.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--weights", "w", "--data", "d", "--out", "o", "--refines", "-1"])


def test_a_dice_tie_goes_to_fewer_false_masks_then_the_stricter_threshold():
    table = [row(0.1, 0.80, 0.03), row(0.25, 0.80, 0.0), row(0.4, 0.80, 0.0)]
    assert choose_conf(table, 0.03)["conf"] == 0.4
