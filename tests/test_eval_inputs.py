"""Inputs that once broke the evaluation commands (a bug hunt of session 21: segment, evaluate-seg,
evaluate-cls, compare, read); each test failed before its fix."""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import CLASSES, cli
from pipeline.evaluate_cls import read_predictions
from pipeline.evaluate_seg import evaluate_segmentation, read_mask

REPO = Path(__file__).resolve().parents[1]


def square(shape, y0, x0, side):
    m = np.zeros(shape, np.uint8)
    m[y0:y0 + side, x0:x0 + side] = 255
    return m


def write_png_bytes(path: bytes, image: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    with open(path, "wb") as fh:
        fh.write(buf.tobytes())


# evaluate-seg crashes the interpreter (SIGSEGV in cv2.imread) on a mask whose name is not UTF-8,
#    although `segment` writes exactly such masks for such inputs.
def test_evaluate_seg_survives_a_non_utf8_mask_name(tmp_path):
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir()
    pred.mkdir()
    for folder in (truth, pred):
        write_png_bytes(os.fsencode(folder) + b"/caf\xe9.png", square((32, 32), 4, 4, 10))
        write_png_bytes(os.fsencode(folder / "ok.png"), square((32, 32), 4, 4, 10))
    code = (f"from pipeline.evaluate_seg import evaluate_segmentation; "
            f"r = evaluate_segmentation({str(pred)!r}, {str(truth)!r}, {str(tmp_path / 'out')!r}); "
            f"print(r['counts']['paired'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"rc={proc.returncode} stderr={proc.stderr[-500:]}"
    assert proc.stdout.strip().splitlines()[-1] == "2"
    assert (tmp_path / "out" / "per_image.csv").is_file()


# `predict` writes non-UTF-8 names byte for byte (surrogateescape); evaluate-cls / compare then die with
#    "error: 'utf-8' codec can't decode byte 0xe9 in position N" -- naming neither the file nor the line.
def test_read_predictions_of_a_predict_csv_with_a_non_utf8_name(tmp_path):
    path = tmp_path / "predictions.csv"
    path.write_bytes(b"path,true,pred\nglioma/a.jpg,glioma,glioma\nglioma/caf\xe9.jpg,glioma,meningioma\n")
    pred = read_predictions(path)
    assert pred["paths"] == ["glioma/a.jpg", os.fsdecode(b"glioma/caf\xe9.jpg")]


# The CSV `make predict` writes (paths relative to --input, e.g. glioma/x.jpg) matches NONE of the
#    clean list, and evaluate-cls reports CLEAN n=0 with exit code 0 and no warning at all.
def test_clean_subset_of_a_predict_csv_is_not_silently_empty(tmp_path, capsys, monkeypatch):
    testing = tmp_path / "data" / "Testing"
    rows = []
    for cls, name in (("glioma", "Te-gl_0001.jpg"), ("notumor", "Te-no_0001.jpg")):
        (testing / cls).mkdir(parents=True)
        cv2.imwrite(str(testing / cls / name), square((16, 16), 2, 2, 5))
        rows.append(f"{cls}/{name},{cls},0.9,ok,")
    pred_dir = tmp_path / "predict_out"
    pred_dir.mkdir()
    (pred_dir / "predictions.csv").write_text("path,label,confidence,status,error\n" + "\n".join(rows) + "\n")
    clean = tmp_path / "audit" / "clean_test.txt"
    clean.parent.mkdir()
    clean.write_text("".join(f"{p}\n" for p in sorted(str(q) for q in testing.rglob("*.jpg"))))
    monkeypatch.chdir(tmp_path)  # the repo root in real use, not the Testing folder
    rc = cli.main(["evaluate-cls", "--predictions", str(pred_dir), "--clean", str(clean),
                   "--out", str(tmp_path / "ev"), "--n-boot", "20", "--device", "cpu"])
    assert rc == 0 and json.loads((tmp_path / "ev" / "metrics.json").read_text())["clean"]["n"] == 2
    assert "last two components" in capsys.readouterr().err


def test_a_clean_list_of_linked_images_matches_predict_paths(tmp_path, monkeypatch):
    import os

    from pipeline.audit import load_clean_list
    from pipeline.evaluate_cls import clean_mask

    store, testing = tmp_path / "store", tmp_path / "data" / "Testing" / "glioma"
    store.mkdir()
    testing.mkdir(parents=True)
    (store / "blob-17").write_bytes(b"x")  # the dataset's files live elsewhere, under other names
    os.symlink(store / "blob-17", testing / "Te-gl_0001.jpg")
    clean = tmp_path / "clean_test.txt"
    clean.write_text(f"{testing / 'Te-gl_0001.jpg'}\n")
    listed = load_clean_list(clean, base=tmp_path)
    assert len(listed) == 1  # one slice, however many forms of its path are kept
    monkeypatch.chdir(store)  # predict's relative paths do not resolve from here
    mask, how = clean_mask(["glioma/Te-gl_0001.jpg", "glioma/Te-gl_0002.jpg"], listed)
    assert mask.tolist() == [True, False] and how == "last two path components"


# A label-image mask (values 0/2/4, or any nonzero values all <= --threshold) is read as EMPTY: a tumor
#    slice silently becomes an "empty truth" slice and the prediction on it a "false mask".
def test_label_image_truth_is_not_silently_read_as_empty(tmp_path):
    m = np.zeros((32, 32), np.uint8)
    m[5:15, 5:15] = 2
    m[8:11, 8:11] = 4
    cv2.imwrite(str(tmp_path / "labels.png"), m)
    np.testing.assert_array_equal(read_mask(tmp_path / "labels.png"), m > 0)


# The advice in read_predictions' own error ("add a `true` column") leads to a dead end: predict's CSV
#    plus a `true` column is refused ("missing column(s) pred"); and in path,true,pred mode an error row
#    (status=error, empty pred) aborts the whole evaluation instead of being skipped as in label mode.
def test_predict_csv_with_an_added_true_column_and_an_error_row(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("path,true,label,confidence,status,error\n"
                    "x/a.jpg,glioma,glioma,0.9,ok,\n"
                    "x/b.jpg,glioma,,,error,empty file (0 bytes)\n"
                    "x/c.jpg,notumor,glioma,0.8,ok,\n")
    pred = read_predictions(path)
    assert pred["paths"] == ["x/a.jpg", "x/c.jpg"]
    assert pred["y_pred"].tolist() == [0, 0] and pred["y_true"].tolist() == [0, 2]


def test_error_rows_are_skipped_in_true_pred_mode(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("path,true,pred,status,error\nx/a.jpg,glioma,glioma,ok,\nx/b.jpg,glioma,,error,unreadable\n")
    pred = read_predictions(path)
    assert pred["paths"] == ["x/a.jpg"]


# Linked sub-folders of --truth / --pred are silently skipped (os.walk without followlinks), while the
#    scan walker that made the predictions follows them.
def test_linked_subfolder_of_truth_is_read(tmp_path):
    real = tmp_path / "real_masks"
    real.mkdir()
    cv2.imwrite(str(real / "a.png"), square((20, 20), 2, 2, 5))
    truth, pred = tmp_path / "truth", tmp_path / "pred"
    truth.mkdir()
    os.symlink(real, truth / "series1")
    (pred / "series1").mkdir(parents=True)
    cv2.imwrite(str(pred / "series1" / "a.png"), square((20, 20), 2, 2, 5))
    res = evaluate_segmentation(pred, truth, tmp_path / "out")
    assert res["counts"]["paired"] == 1


# No prediction pairs with any truth mask (names don't match, or an empty --pred folder): exit 0 and a
#    metrics.json of nulls. Should be a clear error naming the folders.
def test_no_pairs_at_all_is_an_error(tmp_path):
    (tmp_path / "truth").mkdir()
    (tmp_path / "pred").mkdir()
    cv2.imwrite(str(tmp_path / "truth" / "1000.png"), square((20, 20), 2, 2, 5))
    cv2.imwrite(str(tmp_path / "pred" / "glioma_1000.png"), square((20, 20), 2, 2, 5))
    with pytest.raises(ValueError, match="pred"):
        evaluate_segmentation(tmp_path / "pred", tmp_path / "truth", tmp_path / "out")


# `read` on an all-blank NIfTI volume prints nothing and exits 0 (predict records it as an error row).
def test_read_blank_volume_says_so(tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    path = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), str(path))
    assert cli.main(["read", str(path), "--device", "cpu"]) == 1
    assert "volume is blank" in capsys.readouterr().err


def test_a_faint_probability_map_is_not_read_as_a_label_image(tmp_path):
    prob = np.zeros((32, 32), np.uint8)
    prob[5:15, 5:15] = 100  # an unsure 0-255 map: nothing above 127
    cv2.imwrite(str(tmp_path / "prob.png"), prob)
    assert not read_mask(tmp_path / "prob.png").any()


def test_an_ok_row_without_its_prediction_is_refused(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("path,true,pred\nx/a.jpg,glioma,glioma\nx/b.jpg,glioma,\n")
    with pytest.raises(ValueError, match="p.csv:3"):
        read_predictions(path)


def test_an_ok_predict_row_without_its_label_is_refused_and_an_error_row_skipped(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("path,label,status,error\nx/glioma/a.jpg,glioma,ok,\nx/glioma/b.jpg,,error,not an image\n"
                    "x/glioma/c.jpg,,ok,\n")
    with pytest.raises(ValueError, match="p.csv:4"):
        read_predictions(path)
    path.write_text("path,label,status,error\nx/glioma/a.jpg,glioma,ok,\nx/glioma/b.jpg,,error,not an image\n")
    assert read_predictions(path)["skipped"] == ["x/glioma/b.jpg"]


def test_a_clean_list_that_matches_nothing_says_so(capsys):
    from pipeline.evaluate_cls import clean_mask

    mask, _ = clean_mask(["elsewhere/x.jpg", "elsewhere/y.jpg"], {"/data/Testing/glioma/a.jpg"})
    assert not mask.any() and "none of the 2 paths is in the clean list" in capsys.readouterr().err


def test_read_marks_a_blank_image(tmp_path, capsys):
    cv2.imwrite(str(tmp_path / "blank.png"), np.zeros((16, 16), np.uint8))
    assert cli.main(["read", str(tmp_path / "blank.png"), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["blank"] is True


def test_compare_reports_a_run_whose_folder_name_is_not_utf8(tmp_path):
    rows = "path,true,pred\n" + "".join(f"/data/Testing/{c}/{i}.jpg,{c},{c}\n" for i, c in enumerate(CLASSES * 3))
    odd = os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9")
    for folder in (odd, str(tmp_path / "plain")):
        os.makedirs(folder)
        with open(os.path.join(folder, "predictions.csv"), "w") as fh:
            fh.write(rows)
    assert cli.main(["compare", "--runs", f"x-full={odd}", f"y-masked={tmp_path / 'plain'}",
                     "--out", str(tmp_path / "rep"), "--n-boot", "20", "--device", "cpu"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text(encoding="utf-8")  # valid UTF-8, the odd byte shown as U+FFFD
    assert "caf\ufffd" in md and "caf\ufffd" in (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")


def test_read_lists_the_slices_predict_would_read(tmp_path, capsys):
    from pipeline import cli
    from tests.scan_fixtures import write_nifti

    vol = np.zeros((16, 12, 4), np.float32)
    vol[4:10, 3:8, 1:3] = 100  # slices 0 and 3 blank
    path = write_nifti(tmp_path / "v.nii.gz", vol)
    assert cli.main(["read", str(path), "--device", "cpu"]) == 0
    assert [json.loads(line)["key"][-5:] for line in capsys.readouterr().out.splitlines()] == ["#z=01", "#z=02"]
    assert cli.main(["read", str(path), "--nifti-slices", "all", "--device", "cpu"]) == 0
    keys = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [k["key"][-5:] for k in keys] == ["#z=00", "#z=01", "#z=02", "#z=03"] and keys[0]["blank"] is True
