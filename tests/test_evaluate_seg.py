import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage

from pipeline.evaluate_seg import (MaskMetrics, add_arguments, evaluate_segmentation, find_image, list_masks,
                                   read_mask, resolve_pred_dir, run)
from tests.scan_fixtures import write_nifti


def square(shape, y0, x0, side):
    m = np.zeros(shape, bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def hd95_direct(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric 95th-percentile surface distance between mask edges via scipy's distance transform."""
    edge_a = a ^ ndimage.binary_erosion(a)
    edge_b = b ^ ndimage.binary_erosion(b)
    d_ab = ndimage.distance_transform_edt(~edge_b)[edge_a]
    d_ba = ndimage.distance_transform_edt(~edge_a)[edge_b]
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


def save(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.where(mask, 255, 0).astype(np.uint8))


@pytest.fixture(scope="module")
def metrics():
    return MaskMetrics()


def test_two_squares_exact_dice_and_iou(metrics):
    truth = square((40, 50), 10, 10, 10)
    pred = square((40, 50), 10, 15, 10)  # 5 x 10 = 50 pixels shared of 100 each
    v = metrics(pred, truth)
    assert v["dice"] == pytest.approx(2 * 50 / 200)
    assert v["iou"] == pytest.approx(50 / 150)
    assert v["truth_px"] == v["pred_px"] == 100 and v["tumor"] and v["found"]
    assert metrics(truth, truth)["dice"] == pytest.approx(1.0) and metrics(truth, truth)["hd95"] == 0.0


def test_hd95_matches_a_direct_distance_transform(metrics):
    yy, xx = np.mgrid[0:64, 0:64]
    disk = (yy - 30) ** 2 + (xx - 28) ** 2 <= 12 ** 2
    rect = np.zeros((64, 64), bool)
    rect[20:45, 25:55] = True
    for pred, truth in ((disk, rect), (rect, disk), (square((64, 64), 5, 5, 8), square((64, 64), 40, 44, 12))):
        assert metrics(pred, truth)["hd95"] == pytest.approx(hd95_direct(pred, truth), rel=1e-5)
    # Two squares shifted by 7 px: every edge pixel is at most 7 from the other edge.
    v = metrics(square((50, 50), 10, 17, 10), square((50, 50), 10, 10, 10))
    assert 0 < v["hd95"] <= 7


def test_empty_mask_conventions(metrics):
    empty = np.zeros((20, 20), bool)
    tumor = square((20, 20), 5, 5, 6)
    both = metrics(empty, empty)
    assert (both["dice"], both["iou"], both["hd95"], both["found"], both["tumor"]) == (1.0, 1.0, 0.0, False, False)
    missed = metrics(empty, tumor)
    assert missed["dice"] == 0.0 and missed["iou"] == 0.0 and math.isnan(missed["hd95"]) and not missed["found"]
    false_mask = metrics(tumor, empty)
    assert false_mask["dice"] == 0.0 and math.isnan(false_mask["hd95"]) and false_mask["found"]
    with pytest.raises(ValueError, match="20x20"):
        metrics(np.zeros((20, 21), bool), tumor)


def test_read_mask_threshold_and_label_images(tmp_path):
    img = np.array([[0, 100, 200, 255]], np.uint8)
    cv2.imwrite(str(tmp_path / "m.png"), img)
    assert read_mask(tmp_path / "m.png").tolist() == [[False, False, True, True]]
    assert read_mask(tmp_path / "m.png", threshold=50).tolist() == [[False, True, True, True]]
    cv2.imwrite(str(tmp_path / "l.png"), np.array([[0, 1, 1, 0]], np.uint8))  # a 0/1 label image
    assert read_mask(tmp_path / "l.png").tolist() == [[False, True, True, False]]
    assert read_mask(tmp_path / "l.png", threshold=127).tolist() == [[False, True, True, False]]  # still labels
    cv2.imwrite(str(tmp_path / "ones.png"), np.ones((2, 2), np.uint8))  # a label image that is all tumor
    assert read_mask(tmp_path / "ones.png").all()
    # a faint 0-255 map over a non-zero background is not a label image: all of it was "tumor"
    cv2.imwrite(str(tmp_path / "faint.png"), np.array([[2, 2, 8, 8]], np.uint8))
    assert read_mask(tmp_path / "faint.png").tolist() == [[False, False, False, False]]
    cv2.imwrite(str(tmp_path / "p.tiff"), np.array([[0.01, 0.4, 0.6, 0.99]], np.float32))  # a probability map
    assert read_mask(tmp_path / "p.tiff").tolist() == [[False, False, True, True]]
    assert read_mask(tmp_path / "p.tiff", threshold=0.3).tolist() == [[False, True, True, True]]
    assert read_mask(tmp_path / "faint.png", threshold=5).tolist() == [[False, False, True, True]]
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="readable"):
        read_mask(tmp_path / "bad.png")


def make_case(tmp_path: Path):
    """truth/ and a segment-like OUT/ with masks/; returns (truth, out)."""
    shape = (48, 64)
    truth, out = tmp_path / "truth", tmp_path / "seg_out"
    t = {"a/t1": square(shape, 10, 10, 10), "a/t2": square(shape, 20, 20, 12), "b/t3": square(shape, 5, 40, 8),
         "b/t4": square(shape, 30, 5, 6), "e1": np.zeros(shape, bool), "e2": np.zeros(shape, bool),
         "vol.nii.gz_z03": square(shape, 12, 12, 9)}
    p = {"a/t1": square(shape, 10, 15, 10),       # Dice 0.5
         "a/t2": square(shape, 20, 20, 12),       # perfect
         "b/t3": np.zeros(shape, bool),           # missed
         "e1": np.zeros(shape, bool),             # correct empty
         "e2": square(shape, 0, 0, 3),            # false mask
         "vol.nii.gz_z03": square(shape, 12, 12, 9),
         "extra": square(shape, 1, 1, 2)}         # prediction without truth
    for k, m in t.items():
        save(truth / f"{k}.png", m)
    for k, m in p.items():
        save(out / "masks" / f"{k}.png", m)
    (out / "segments.csv").write_text("path,found,x0,y0,x1,y1,area_px,score,model,status,error\n")
    return truth, out, shape


def test_evaluate_pairs_by_relative_path_and_reports_missing(tmp_path):
    truth, out, shape = make_case(tmp_path)
    no_tumor = tmp_path / "nt"
    save(no_tumor / "n1.png", np.zeros(shape, bool))
    save(no_tumor / "x" / "n2.png", square(shape, 3, 3, 2))
    save(no_tumor / "x" / "n3.png", np.zeros(shape, bool))
    res = evaluate_segmentation(out, truth, tmp_path / "eval", no_tumor_dir=no_tumor)
    c = res["counts"]
    assert res["parameters"]["pred_dir"].endswith("masks")
    assert (c["truth_masks"], c["paired"], c["missing_pred"], c["unpaired_pred"]) == (7, 6, 1, 1)
    assert (c["tumor_slices"], c["empty_truth_slices"], c["no_tumor_dir_masks"]) == (4, 2, 3)
    assert res["missing_pred"] == ["b/t4"]
    # Tumor slices: t1 0.5, t2 1, t3 0 (missed), z03 1.
    assert res["tumor_slices"]["dice"]["mean"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert res["tumor_slices"]["dice"]["median"] == pytest.approx(0.75)
    assert res["tumor_slices"]["iou"]["mean"] == pytest.approx((1 / 3 + 1 + 0 + 1) / 4)
    assert res["tumor_slices"]["hd95"]["n"] == 3 and res["tumor_slices"]["hd95"]["missed"] == 1
    assert res["detection_rate"] == pytest.approx(3 / 4) and res["hit_rate"] == pytest.approx(3 / 4)
    assert res["false_mask_rate_empty_truth"] == pytest.approx(1 / 2)
    assert res["false_mask_rate_no_tumor_dir"] == pytest.approx(1 / 3)
    assert res["false_mask_rate"] == pytest.approx(2 / 5)
    assert [w["path"] for w in res["worst_cases"]] == ["b/t3", "a/t1", "a/t2", "vol.nii.gz_z03"]

    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["counts"] == c and saved["parameters"]["threshold"] == "auto"
    with open(tmp_path / "eval" / "per_image.csv", newline="") as fh:
        rows = {(r["set"], r["path"]): r for r in csv.DictReader(fh)}
    assert len(rows) == 7 + 3
    assert rows[("paired", "b/t4")]["status"] == "missing_pred"
    assert rows[("paired", "b/t3")]["dice"] == "0.000000" and rows[("paired", "b/t3")]["hd95"] == ""
    assert rows[("paired", "e1")]["dice"] == "1.000000" and rows[("paired", "e1")]["hd95"] == "0.000000"
    assert rows[("no_tumor", "x/n2")]["found"] == "true"
    png = cv2.imread(str(tmp_path / "eval" / "worst_cases.png"))
    assert png is not None and png.shape[0] > 100


def test_pred_folder_of_plain_masks_and_other_suffixes(tmp_path):
    truth, out, shape = make_case(tmp_path)
    assert resolve_pred_dir(out / "masks") == out / "masks"
    # Truth as JPEG-free lossless .bmp with the same stems pairs the same way.
    bmp = tmp_path / "truth_bmp"
    for key, path in list_masks(truth).items():
        (bmp / key).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(bmp / f"{key}.bmp"), cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    a = evaluate_segmentation(out / "masks", truth, tmp_path / "e1")
    b = evaluate_segmentation(out / "masks", bmp, tmp_path / "e2")
    assert a["tumor_slices"] == b["tumor_slices"] and a["counts"]["paired"] == b["counts"]["paired"] == 6


def test_worst_cases_find_their_images(tmp_path):
    images = tmp_path / "images"
    (images / "a").mkdir(parents=True)
    cv2.imwrite(str(images / "a" / "t1.jpg"), np.full((48, 64), 90, np.uint8))
    vol = np.zeros((64, 48, 5), np.float32)  # displayed slices are (48, 64)
    vol[:, :, 3] = 50
    vol[10:20, 10:20, 3] = 200
    write_nifti(images / "vol.nii.gz", vol)
    assert find_image(images, "a/t1", (48, 64)).mean() == pytest.approx(90, abs=1)
    assert find_image(images, "a/t1", (10, 10)) is None
    assert find_image(images, "vol.nii.gz_z03", (48, 64)).max() == 255
    assert find_image(images, "nothing/here", (48, 64)) is None
    truth, out, _ = make_case(tmp_path)
    evaluate_segmentation(out, truth, tmp_path / "eval", images_dir=images, n_worst=3)
    assert cv2.imread(str(tmp_path / "eval" / "worst_cases.png")) is not None


def test_no_tumor_slices_at_all_still_writes_everything(tmp_path):
    save(tmp_path / "t" / "e.png", np.zeros((16, 16), bool))
    save(tmp_path / "p" / "e.png", np.zeros((16, 16), bool))
    res = evaluate_segmentation(tmp_path / "p", tmp_path / "t", tmp_path / "o")
    assert res["detection_rate"] is None and res["false_mask_rate"] == 0.0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["tumor_slices"]["dice"]["mean"] is None
    assert (tmp_path / "o" / "worst_cases.png").is_file()


def test_cli_run(tmp_path, capsys):
    import argparse

    truth, out, _ = make_case(tmp_path)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--pred", str(out), "--truth", str(truth), "--out", str(tmp_path / "ev")])
    args.device, args.seed = "cpu", 0
    assert run(args) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["missing_pred"] == 1
    with pytest.raises(FileNotFoundError):
        evaluate_segmentation(out, tmp_path / "absent", tmp_path / "ev2")


def test_an_explicit_threshold_cuts_the_predictions_not_the_truth(tmp_path, capsys):
    import argparse

    from pipeline.evaluate_seg import run

    truth = np.zeros((20, 20), np.uint8)
    truth[5:15, 5:15] = 255
    truth[4, 5:15] = 60  # a JPEG-like edge: not tumor in a 0/255 mask
    (tmp_path / "truth").mkdir()
    cv2.imwrite(str(tmp_path / "truth" / "x.png"), truth)
    cv2.imwrite(str(tmp_path / "truth" / "y.png"), truth)
    prob = np.zeros((20, 20), np.float32)
    prob[5:15, 5:15] = 0.4  # a probability map, cut at 0.3
    (tmp_path / "pred").mkdir()
    cv2.imwrite(str(tmp_path / "pred" / "x.tiff"), prob)
    cv2.imwrite(str(tmp_path / "pred" / "y.tiff"), np.zeros((10, 10), np.float32))  # another size: not scored
    args = argparse.Namespace(pred=str(tmp_path / "pred"), truth=str(tmp_path / "truth"), out=str(tmp_path / "e"),
                              threshold=0.3, no_tumor=None, images=None, n_worst=2)
    assert run(args) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["tumor_slices"]["dice"]["mean"] == pytest.approx(1.0)  # the edge row stays background
    assert metrics["counts"]["errors"] == 1
    assert "warning: 1 mask(s) left out of every figure above" in capsys.readouterr().err
