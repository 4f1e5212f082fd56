"""diagnose-seg: box geometry, slice categories and the summary, by hand; then a tiny cascade end to end."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pipeline.segment import diagnose, unet


def test_box_geometry_by_hand():
    g = diagnose.box_geometry((10, 10, 30, 20), (10, 10, 50, 30))  # lesion 40 x 20, found 20 x 10 in its corner
    assert g["side_ratio"] == pytest.approx(0.5)
    assert g["centre_offset"] == pytest.approx(10 / 40)  # centres (20, 15) vs (30, 20): 10 px on x
    assert g["lesion_covered"] == pytest.approx(200 / 800)
    assert diagnose.box_geometry((100, 100, 120, 120), (0, 0, 10, 10))["lesion_covered"] == 0


@pytest.mark.parametrize("d, area, covered, expected", [
    (0.0, 0.0, None, "missed"), (0.8, 1.0, 1.0, "ok"), (0.0, 1.0, 0.05, "elsewhere"),
    (0.3, 3.0, 0.5, "over"), (0.3, 0.2, 0.5, "under"), (0.3, 1.0, 0.5, "misplaced")])
def test_category(d, area, covered, expected):
    assert diagnose.category(d, area, covered) == expected


def test_summarise_counts_and_means():
    rows = [{"dice": 0.9, "dice_true_box": 0.9, "category": "ok", "side_ratio": 1.0, "centre_offset": 0.0},
            {"dice": 0.0, "dice_true_box": 0.8, "category": "missed"},
            {"dice": 0.3, "dice_true_box": 0.4, "category": "over", "side_ratio": 2.0, "centre_offset": 0.2}]
    s = diagnose.summarise(rows)
    assert s["mean_dice"] == pytest.approx(0.4) and s["mean_dice_true_box"] == pytest.approx(0.7)
    assert s["detection_rate"] == pytest.approx(2 / 3)
    assert s["categories"]["over"] == 1 and s["categories"]["ok"] == 1 and s["categories"]["elsewhere"] == 0
    assert s["bad_with_true_box_dice_below_0.5"] == 1
    assert s["coarse_box_side_ratio"]["p50"] == pytest.approx(1.5)


def _disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.uint8) * 255


def test_diagnose_writes_one_row_per_tumor_slice(tmp_path):
    from tests.test_unet import TINY, synthetic_cache

    cache = synthetic_cache(tmp_path / "cache.npz")
    for stage in ("coarse", "fine"):
        unet.train_stage(cache, tmp_path / stage, stage=stage, size=32, epochs=1, batch_size=8, net=TINY, threads=1)
    ckpt = tmp_path / "c.pt"
    unet.export_cascade(tmp_path / "coarse" / "best.pt", tmp_path / "fine" / "best.pt", ckpt, threshold=0.5, min_area=1)
    data = tmp_path / "data"
    (data / "images" / "val").mkdir(parents=True)
    (data / "masks" / "val").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        img = rng.integers(20, 60, (64, 80)).astype(np.uint8)
        mask = _disc(64, 80, 30 + 3 * i, 30, 8) if i < 4 else np.zeros((64, 80), np.uint8)  # the last: no tumor
        img[mask > 0] = 220
        cv2.imwrite(str(data / "images" / "val" / f"s{i}.png"), img)
        cv2.imwrite(str(data / "masks" / "val" / f"s{i}.png"), mask)
    result = diagnose.diagnose(ckpt, data, tmp_path / "out")
    assert result["n_tumor"] == 4 and sum(result["categories"].values()) == 4
    rows = (tmp_path / "out" / "slices.csv").read_text().splitlines()
    assert rows[0].startswith("name,dice,dice_true_box") and len(rows) == 5
    assert json.loads((tmp_path / "out" / "diagnosis.json").read_text())["mean_dice"] == result["mean_dice"]
    with pytest.raises(FileNotFoundError, match="no such split folder"):
        diagnose.diagnose(ckpt, data, tmp_path / "out", split="test")
    with pytest.raises(ValueError, match="needs a U-Net cascade"):
        diagnose.diagnose_cascade(object(), [], [])


class _BrightSegmenter:
    """A cascade stand-in: the "fine net" draws a crop's bright pixels; the coarse regions and the
    final masks are given per image, so each category can be built on purpose."""

    margin, fine_size, fine, boxes_from = 0.25, 64, None, None

    def __init__(self, boxes, masks):
        self.boxes, self.masks = boxes, masks
        self.next_box = self.next_mask = 0  # calls come chunk by chunk, in order
        self.calls = []

    def _probs(self, net, patches):
        return [(p > 127).astype(np.float32) for p in patches]

    def coarse_regions(self, images):
        boxes = self.boxes[self.next_box:self.next_box + len(images)]
        self.next_box += len(images)
        return [[{"box": b}] if b is not None else [] for b in boxes]

    def predict(self, images):
        from pipeline.segment.yolo import SegResult

        self.calls.append(len(images))
        masks = self.masks[self.next_mask:self.next_mask + len(images)]
        self.next_mask += len(images)
        return [SegResult(mask=m, boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32))
                for m in masks]


def test_diagnose_cascade_categories_and_the_true_box_oracle():
    h, w = 96, 96
    lesion = _disc(h, w, 40, 40, 10)  # box (30, 30, 51, 51)
    image = np.full((h, w), 30, np.uint8)
    image[lesion > 0] = 230
    empty = np.zeros((h, w), np.uint8)
    big = _disc(h, w, 40, 40, 22)  # about 4.8x the lesion's area, same centre
    cases = {  # name: (coarse box, final mask, expected category)
        "right": ((28, 28, 53, 53), lesion, "ok"),
        "missed": (None, empty, "missed"),
        "elsewhere": ((70, 70, 90, 90), _disc(h, w, 80, 80, 6), "elsewhere"),
        "over": ((15, 15, 65, 65), big, "over"),
        "under": ((36, 36, 44, 44), _disc(h, w, 40, 40, 3), "under"),
    }
    seg = _BrightSegmenter([c[0] for c in cases.values()], [c[1] for c in cases.values()])
    rows = diagnose.diagnose_cascade(seg, [image] * len(cases), [lesion] * len(cases), list(cases))
    assert [r["category"] for r in rows] == [c[2] for c in cases.values()]
    for r in rows:  # the oracle crops the true box: the bright-pixel "fine net" then draws the lesion
        assert r["dice_true_box"] > 0.95, r
    by_name = {r["name"]: r for r in rows}
    assert by_name["right"]["dice"] == pytest.approx(1.0)
    assert by_name["missed"]["regions"] == 0 and "side_ratio" not in by_name["missed"]
    assert by_name["over"]["side_ratio"] == pytest.approx(50 / 21, abs=0.01)
    assert by_name["elsewhere"]["lesion_covered"] == 0
    summary = diagnose.summarise(rows)
    assert summary["categories"] == {"ok": 1, "missed": 1, "elsewhere": 1, "over": 1, "under": 1, "misplaced": 0}
    # Chunk by chunk (memory stays flat on a large split): the same rows, in the same order.
    seg = _BrightSegmenter([c[0] for c in cases.values()], [c[1] for c in cases.values()])
    assert diagnose.diagnose_cascade(seg, [image] * len(cases), [lesion] * len(cases), list(cases), chunk=2) == rows
    assert seg.calls == [2, 2, 1]
    with pytest.raises(ValueError, match="one each"):
        diagnose.diagnose_cascade(seg, [image] * 2, [lesion], ["a", "b"])
    assert summary["bad_with_true_box_dice_below_0.5"] == 0
