"""Robustness fixes: odd file names, final error rows, linked folders, mask naming, CSV newlines,
segmenter checkpoint safety, train-cls resume refusal, CLI argument checks, split inputs.

All data is synthetic and written to ``tmp_path`` at test time.
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline import CLASSES
from pipeline.batch import run_predict
from pipeline.classify.predict import Classifier
from pipeline.folders import ResultsCSV, iter_input_files
from pipeline.phantoms import make_phantom
from tests.fakes import BrightBlobSegmenter
from tests.scan_fixtures import write_jpeg, write_nifti, write_png


# --- helpers ---------------------------------------------------------------------------------------



def read_rows(path: Path) -> list[dict]:
    # surrogateescape: paths that are not valid UTF-8 are stored byte for byte.
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def png_bytes(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


# --- 1. file names that are not valid UTF-8 ---------------------------------------------------------

def test_non_utf8_file_name_gets_an_ok_row_and_rerun_adds_nothing(tmp_path, tiny_classifier):
    src = tmp_path / "scans"
    src.mkdir()
    write_png(src / "plain.png", make_phantom("glioma", 64, 1)[0])
    raw_name = b"T\xfcmor.png"  # latin-1 u-umlaut: not valid UTF-8
    fd = os.open(os.path.join(os.fsencode(src), raw_name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, png_bytes(make_phantom("meningioma", 64, 2)[0]))
    finally:
        os.close(fd)
    clf = Classifier(tiny_classifier)
    out = tmp_path / "out"
    counts = run_predict(src, out, clf, None, batch_size=4, workers=1, progress=False)
    assert counts["rows_written"] == 2 and counts["errors"] == 0
    csv_path = out / "predictions.csv"
    rows = read_rows(csv_path)
    odd = os.fsdecode(raw_name)
    assert {r["path"]: r["status"] for r in rows} == {"plain.png": "ok", odd: "ok"}
    assert b"T\xfcmor.png" in csv_path.read_bytes()  # written back byte for byte
    before = csv_path.read_bytes()
    again = run_predict(src, out, clf, None, batch_size=4, workers=1, progress=False)  # reopens the CSV
    assert again["rows_written"] == 0 and again["skipped_done"] == 2
    assert csv_path.read_bytes() == before
    assert len(read_rows(csv_path)) == 2


# --- 2. a failed volume's error row is final --------------------------------------------------------

def test_failed_nifti_error_row_is_final(tmp_path, tiny_classifier):
    src = tmp_path / "scans"
    src.mkdir()
    write_png(src / "a.png", make_phantom("glioma", 64, 1)[0])
    (src / "vol.nii.gz").write_bytes(b"definitely not gzip nor nifti " * 20)
    clf = Classifier(tiny_classifier)
    out = tmp_path / "out"
    run_predict(src, out, clf, None, batch_size=4, workers=1, progress=False)
    rows = read_rows(out / "predictions.csv")
    vol_rows = [r for r in rows if r["path"].startswith("vol.nii.gz")]
    assert len(vol_rows) == 1 and vol_rows[0]["path"] == "vol.nii.gz" and vol_rows[0]["status"] == "error"
    assert vol_rows[0]["error"]

    # Replace it by a readable volume with non-empty slices: the error row stays the only row.
    (src / "vol.nii.gz").unlink()
    vol = np.zeros((64, 64, 3), np.float32)
    for z in range(3):
        vol[:, :, z] = make_phantom("pituitary", 64, z)[0]
    write_nifti(src / "vol.nii.gz", vol)
    results = ResultsCSV(out / "predictions.csv", [*rows[0]])
    assert results.pending([src / "a.png", src / "vol.nii.gz"], src.resolve()) == []
    again = run_predict(src, out, clf, None, batch_size=4, workers=1, progress=False)
    assert again["rows_written"] == 0
    rows2 = read_rows(out / "predictions.csv")
    assert rows2 == rows
    assert not any("#z=" in r["path"] for r in rows2)


def test_a_multi_frame_dicom_cut_short_gets_its_missing_frames_on_rerun(tmp_path, tiny_classifier):
    from tests.scan_fixtures import write_dicom

    src = tmp_path / "scans"
    src.mkdir()
    frames = np.stack([(make_phantom("glioma", 64, k)[0].astype(np.uint16) * 16) for k in range(3)])
    write_dicom(src / "series", frames)  # an enhanced-MR export: one file, no suffix, three frames
    write_png(src / "a.png", make_phantom("meningioma", 64, 1)[0])
    clf = Classifier(tiny_classifier)
    out = tmp_path / "out"
    run_predict(src, out, clf, None, batch_size=4, workers=1, progress=False, nifti_slices="all")
    csv_path = out / "predictions.csv"
    rows = read_rows(csv_path)
    assert sorted(r["path"] for r in rows) == ["a.png", "series#z=00", "series#z=01", "series#z=02"]
    # a killed run that had written only two of the frames
    lines = csv_path.read_bytes().splitlines(keepends=True)
    csv_path.write_bytes(b"".join(line for line in lines if b"series#z=02" not in line))
    again = run_predict(src, out, clf, None, batch_size=4, workers=1, progress=False, nifti_slices="all")
    assert again["rows_written"] == 1
    assert sorted(r["path"] for r in read_rows(csv_path)) == sorted(r["path"] for r in rows)


# --- 3. linked folders and link loops ----------------------------------------------------------------

def test_linked_folder_is_walked_and_link_loop_neither_hangs_nor_duplicates(tmp_path, tiny_classifier):
    root = tmp_path / "scans"
    other = tmp_path / "elsewhere"
    (root / "a").mkdir(parents=True)
    other.mkdir()
    write_png(root / "top.png", make_phantom("glioma", 64, 1)[0])
    write_png(root / "a" / "b.png", make_phantom("notumor", 64, 2)[0])
    write_png(other / "linked_scan.png", make_phantom("pituitary", 64, 3)[0])
    os.symlink(other, root / "linked")
    os.symlink(root, root / "a" / "loop")  # a -> loop -> root -> a -> ...

    # Bounded walk: a loop would yield without end; islice stops it so the test cannot hang.
    walked = list(itertools.islice(iter_input_files(root.resolve()), 50))
    rels = sorted(p.relative_to(root.resolve()).as_posix() for p in walked)
    assert rels == ["a/b.png", "linked/linked_scan.png", "top.png"]

    out = tmp_path / "out"
    counts = run_predict(root, out, Classifier(tiny_classifier), None, batch_size=2, workers=1, progress=False)
    paths = [r["path"] for r in read_rows(out / "predictions.csv")]
    assert sorted(paths) == ["a/b.png", "linked/linked_scan.png", "top.png"]
    assert len(paths) == len(set(paths)) == counts["files"] == 3


# --- 4. crop reads exactly the mask segment wrote ----------------------------------------------------

def _head_with_blob(center: tuple[int, int], size: int = 128) -> np.ndarray:
    image = np.zeros((size, size), np.uint8)
    cv2.circle(image, (size // 2, size // 2), size * 2 // 5, 90, -1)
    cv2.circle(image, center, 9, 255, -1)
    return image


def test_same_stem_images_get_their_own_masks_in_segment_and_crop(tmp_path):
    from pipeline.classify.data import build_cache, load_cache
    from pipeline.datasets import list_class_folder
    from pipeline.roi import make_input
    from pipeline.scans import read_scan
    from pipeline.segment.run import run_segment

    root = tmp_path / "Training"
    (root / "glioma").mkdir(parents=True)
    # Same stem, different blob positions: a mix-up of x.jpg's and x.png's masks would change the crops.
    write_jpeg(root / "glioma" / "x.jpg", _head_with_blob((45, 45)))
    write_png(root / "glioma" / "x.png", _head_with_blob((85, 80)))
    write_png(root / "glioma" / "y.png", _head_with_blob((64, 50)))
    out = tmp_path / "seg"
    counts = run_segment(root, out, BrightBlobSegmenter(), batch_size=2, workers=1, progress=False)
    assert counts["rows_written"] == 3 and counts["errors"] == 0 and counts["found"] == 3

    masks_dir = out / "masks"
    # The documented names: clashing stems keep their full name, the others drop their suffix.
    expected_mask = {"x.jpg": "glioma/x.jpg.png", "x.png": "glioma/x.png.png", "y.png": "glioma/y.png"}
    written = sorted(p.relative_to(masks_dir).as_posix() for p in masks_dir.rglob("*.png"))
    assert written == sorted(expected_mask.values())

    samples = list_class_folder(root)
    assert sorted(s.path.name for s in samples) == ["x.jpg", "x.png", "y.png"]
    size = 32
    cache = load_cache(build_cache(samples, tmp_path / "cache" / "train.npz", mode="crop", size=size,
                                   image_root=root, masks_dir=masks_dir, workers=1))
    assert cache["images"].shape == (3, size, size) and cache["found"].all()
    crops = {}
    for i, sample in enumerate(samples):
        image = read_scan(sample.path).image
        mask = cv2.imread(str(masks_dir / expected_mask[sample.path.name]), cv2.IMREAD_GRAYSCALE)
        # The mask file is the one segment made for this very image.
        assert np.array_equal(mask, BrightBlobSegmenter().predict([image])[0].mask)
        want, roi = make_input(image, "crop", size, mask)
        assert roi.found
        assert np.array_equal(cache["images"][i], want), f"crop of {sample.path.name} used another mask"
        crops[sample.path.name] = want
    assert not np.array_equal(crops["x.jpg"], crops["x.png"])  # a swap would have shown


# --- 5. one CSV line per record ----------------------------------------------------------------------

def test_error_with_newlines_is_written_as_one_line(tmp_path):
    path = tmp_path / "r.csv"
    results = ResultsCSV(path, ["path", "status", "error"])
    results.write([{"path": "a.png", "status": "error", "error": "first line\nsecond\r\nthird"},
                   {"path": "b.png", "status": "ok", "error": ""}])
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4  # header + 2 records, each ending in one "\n"
    rows = read_rows(path)
    assert [r["path"] for r in rows] == ["a.png", "b.png"]
    assert rows[0]["error"] == "first line second third"
    assert ResultsCSV(path, ["path", "status", "error"]).done == {"a.png", "b.png"}


# --- 6. segmenter checkpoints: weights-only and built from ultralytics' own YAML ---------------------

@pytest.fixture(scope="module")
def tiny_seg_ckpt(tmp_path_factory) -> tuple[Path, dict]:
    from ultralytics.nn.tasks import SegmentationModel

    torch.manual_seed(0)
    model = SegmentationModel("yolov8n-seg.yaml", nc=1, verbose=False)
    ckpt = {"state_dict": model.state_dict(),
            "meta": {"yaml": copy.deepcopy(model.yaml), "names": {0: "tumor"}, "imgsz": 64, "conf": 0.25,
                     "task": "segment"}}
    path = tmp_path_factory.mktemp("seg") / "tiny_seg.pt"
    torch.save(ckpt, path)
    return path, ckpt


def test_weights_only_segmenter_loads_and_predicts_at_input_size(tiny_seg_ckpt):
    from pipeline.segment.load import load_segmenter

    path, _ = tiny_seg_ckpt
    seg = load_segmenter(path)
    image = np.random.default_rng(0).integers(0, 256, (80, 100), dtype=np.uint8)
    results = seg.predict([image])
    assert len(results) == 1 and results[0].mask.shape == (80, 100) and results[0].mask.dtype == np.uint8


def _spy_parse_model(monkeypatch) -> list:
    import ultralytics.nn.tasks as tasks

    calls = []
    real = tasks.parse_model

    def spy(d, *a, **kw):
        calls.append(copy.deepcopy(d))
        return real(d, *a, **kw)

    monkeypatch.setattr(tasks, "parse_model", spy)
    return calls


@pytest.mark.parametrize("tamper", ["head_module", "yaml_file"])
def test_tampered_segmenter_yaml_is_refused_before_any_model_is_built(tmp_path, tiny_seg_ckpt, monkeypatch, tamper):
    from pipeline.segment.load import load_segmenter
    from pipeline.weights import WeightsError

    _, ckpt = tiny_seg_ckpt
    bad = {"state_dict": ckpt["state_dict"], "meta": copy.deepcopy(ckpt["meta"])}
    if tamper == "head_module":
        bad["meta"]["yaml"]["head"][0][2] = "__import__"
        bad["meta"]["yaml"]["head"][0][3] = ["os"]
    else:
        bad["meta"]["yaml"]["yaml_file"] = "evil.yaml"
    path = tmp_path / f"{tamper}.pt"
    torch.save(bad, path)
    calls = _spy_parse_model(monkeypatch)
    with pytest.raises(WeightsError, match="head differs" if tamper == "head_module" else "evil.yaml"):
        load_segmenter(path)
    assert calls == []  # no network was built from anything, let alone from the checkpoint's YAML


def test_code_in_other_yaml_keys_never_runs(tmp_path, tiny_seg_ckpt, monkeypatch):
    """Keys that are not compared (e.g. ``activation``, which ultralytics may eval) are not used at all."""
    from pipeline.segment.load import load_segmenter
    from pipeline.weights import WeightsError

    _, ckpt = tiny_seg_ckpt
    marker = tmp_path / "pwned"
    bad = {"state_dict": ckpt["state_dict"], "meta": copy.deepcopy(ckpt["meta"])}
    bad["meta"]["yaml"]["activation"] = f"__import__('pathlib').Path({str(marker)!r}).touch() or __import__('torch').nn.SiLU()"
    path = tmp_path / "activation.pt"
    torch.save(bad, path)
    calls = _spy_parse_model(monkeypatch)
    try:
        load_segmenter(path)
    except WeightsError:
        pass  # refusing is fine too
    else:
        assert calls, "the spy should have seen the network being built"
    assert not marker.exists()
    assert all("activation" not in d for d in calls)


# --- 7. train-cls resume refuses a last.pt made with other settings ----------------------------------

def _tiny_cache(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(CLASSES)
    np.savez(path, images=rng.integers(0, 256, (n, 32, 32), dtype=np.uint8), labels=labels,
             paths=np.array([f"img{i}.png" for i in range(n)]), found=np.zeros(n, bool),
             mode=np.array("full"), size=np.array(32))
    return path


class _Interrupted(Exception):
    pass


def test_train_cls_resume_refuses_other_settings_and_continues_with_same(tmp_path, monkeypatch):
    import pipeline.classify.train as train_mod

    tr = _tiny_cache(tmp_path / "train.npz", 16, 0)
    va = _tiny_cache(tmp_path / "val.npz", 8, 1)
    out = tmp_path / "run"
    kw = dict(model_name="smallcnn", pretrained=False, epochs=2, batch_size=8, lr=1e-3, patience=10, seed=0,
              threads=1)

    # First run: killed right after epoch 0's last.pt is written (write_curves runs just after it).
    real_curves = train_mod.write_curves

    def curves_then_die(history, out_dir):
        real_curves(history, out_dir)
        raise _Interrupted

    monkeypatch.setattr(train_mod, "write_curves", curves_then_die)
    with pytest.raises(_Interrupted):
        train_mod.train(str(tr), str(va), str(out), **kw)
    monkeypatch.setattr(train_mod, "write_curves", real_curves)
    last = out / "last.pt"
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 0 and [h["epoch"] for h in state["history"]] == [0]
    saved = last.read_bytes()

    # Other settings: refused, naming what changed, and last.pt is left alone.
    with pytest.raises(RuntimeError, match="other settings") as exc:
        train_mod.train(str(tr), str(va), str(out), **{**kw, "lr": 5e-3})
    assert "lr" in str(exc.value)
    with pytest.raises(RuntimeError, match="other settings"):
        train_mod.train(str(tr), str(va), str(out), **{**kw, "batch_size": 4})
    assert last.read_bytes() == saved

    # Same settings: resumes at epoch 1 and the history continues.
    summary = train_mod.train(str(tr), str(va), str(out), **kw)
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 1
    # the summary says what the numbers may depend on beyond the command: library versions, CPU, threads
    assert json.loads((out / "summary.json").read_text())["environment"]["torch"] == torch.__version__
    assert [h["epoch"] for h in state["history"]] == [0, 1]
    assert state["history"][0] == torch.load(io.BytesIO(saved), weights_only=True)["history"][0]
    with (out / "curves.csv").open(newline="") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [0, 1]
    assert summary["lr"] == kw["lr"] and (out / "best.pt").is_file()

    # --no-resume starts over even with other settings.
    fresh = train_mod.train(str(tr), str(va), str(tmp_path / "run"), **{**kw, "epochs": 1, "lr": 5e-3},
                            resume=False)
    assert torch.load(last, weights_only=True)["history"][-1]["epoch"] == 0 and fresh["epochs"] == 1


# --- 8. CLI argument checks (in-process) -------------------------------------------------------------

def test_cli_segment_conf_is_not_taken_for_config(tmp_path, capsys):
    from pipeline.cli import main

    src = tmp_path / "in"
    src.mkdir()
    missing = tmp_path / "missing.pt"
    rc = main(["segment", "--input", str(src), "--out", str(tmp_path / "out"), "--conf", "0.3",
               "--weights", str(missing), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0
    assert "config file not found" not in err
    assert "missing.pt" in err and "checkpoint not found" in err


@pytest.mark.parametrize("flag,value,expected", [
    ("--batch-size", "0", ("--batch-size", "at least 1")),
    ("--nifti-slices", "middel", ("--nifti-slices", "middel")),
])
def test_cli_predict_refuses_bad_values(tmp_path, capsys, tiny_classifier, flag, value, expected):
    from pipeline.cli import main

    src = tmp_path / "in"
    src.mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["predict", "--input", str(src), "--out", str(tmp_path / "out"), "--cls", str(tiny_classifier),
              "--seg", "none", flag, value, "--device", "cpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert all(text in err for text in expected)
    assert not (tmp_path / "out").exists()


def test_cli_predict_mode_must_match_the_classifier(tmp_path, capsys, tiny_classifier):
    from pipeline.cli import main

    src = tmp_path / "in"
    src.mkdir()
    write_png(src / "a.png", make_phantom("glioma", 64, 1)[0])
    rc = main(["predict", "--input", str(src), "--out", str(tmp_path / "out"), "--cls", str(tiny_classifier),
               "--seg", "none", "--mode", "crop", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "crop" in err and "full" in err
    assert not (tmp_path / "out" / "predictions.csv").exists()


# --- 9. split with a missing duplicates file ---------------------------------------------------------

def test_make_split_missing_train_duplicates_names_the_path(tmp_path):
    from pipeline.datasets import DatasetError, make_split

    train = tmp_path / "Training"
    for i, label in enumerate(CLASSES):
        (train / label).mkdir(parents=True)
        for j in range(3):
            write_png(train / label / f"{j}.png", np.full((16, 16), 10 * i + j, np.uint8))
    missing = tmp_path / "audit" / "train_duplicates.csv"
    out = tmp_path / "split.csv"
    with pytest.raises(DatasetError) as exc:
        make_split(train, out, 0.25, 0, missing)
    assert str(missing) in str(exc.value)
    assert not out.exists()


def test_reader_ignores_ultralytics_pil_patch(tmp_path, monkeypatch):
    """Importing ultralytics wraps PIL.Image.open to pip-install a HEIF plugin on unknown files."""
    import ultralytics.utils.patches  # noqa: F401  (applies the patch)
    from PIL import Image

    from pipeline.scans import ScanReadError, read_scan

    assert Image.open is ultralytics.utils.patches.image_open
    calls = []
    monkeypatch.setattr("ultralytics.utils.checks.check_requirements", lambda *a, **k: calls.append(a))
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    with pytest.raises(ScanReadError) as err:
        read_scan(fake)
    assert err.value.reason == "not an image file (unrecognised content)"
    assert calls == []


def test_train_cls_ema_saves_the_moving_average_not_the_raw_weights(tmp_path):
    import pipeline.classify.train as train_mod

    tr = _tiny_cache(tmp_path / "train.npz", 16, 0)
    va = _tiny_cache(tmp_path / "val.npz", 8, 1)
    kw = dict(model_name="smallcnn", pretrained=False, epochs=1, batch_size=8, lr=1e-2, patience=10, seed=0,
              threads=1)

    def saved(decay, name):
        train_mod.train(str(tr), str(va), str(tmp_path / name), ema=decay, **kw)
        best = torch.load(tmp_path / name / "best.pt", weights_only=True)
        return best, torch.load(tmp_path / name / "last.pt", weights_only=True)

    best, last = saved(0.9, "ema")
    assert best["meta"]["ema"] == 0.9
    # One epoch of two steps: best.pt is the average kept in last.pt, under the plain network's keys ...
    average = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert best["state_dict"].keys() == last["model"].keys() == average.keys()
    assert all(torch.equal(best["state_dict"][k], average[k]) for k in average)
    # ... and not the raw weights, which moved on after the average's first copy of them.
    weights = [k for k, v in average.items() if v.is_floating_point() and "running" not in k]
    assert any(not torch.allclose(best["state_dict"][k], last["model"][k]) for k in weights)
    # A near-zero decay follows the raw weights: the average is the last step's weights.
    best0, last0 = saved(1e-9, "ema0")
    assert all(torch.allclose(best0["state_dict"][k], last0["model"][k], atol=1e-6) for k in weights)
    # Without --ema the meta has no key, so runs made before the option still resume.
    plain, _ = saved(0.0, "plain")
    assert "ema" not in plain["meta"]
    with pytest.raises(ValueError, match="ema must be in"):
        train_mod.train(str(tr), str(va), str(tmp_path / "bad"), ema=1.0, **kw)


def test_train_cls_refit_trains_on_train_plus_val_and_keeps_the_last_epoch(tmp_path, monkeypatch):
    import pipeline.classify.train as train_mod

    tr = _tiny_cache(tmp_path / "train.npz", 16, 0)
    va = _tiny_cache(tmp_path / "val.npz", 8, 1)
    kw = dict(model_name="smallcnn", pretrained=False, epochs=3, batch_size=8, lr=1e-3, seed=0, threads=1)
    seen = []
    real_batches = train_mod._batches
    monkeypatch.setattr(train_mod, "_batches", lambda n, bs, rng: (rng is not None and seen.append(n), real_batches(n, bs, rng))[1])

    # patience 0 would stop a plain run before its first epoch, with no checkpoint: refused
    with pytest.raises(ValueError, match="patience must be at least 1"):
        train_mod.train(str(tr), str(va), str(tmp_path / "plain"), patience=0, **kw)
    assert seen == [] and not (tmp_path / "plain" / "summary.json").exists()

    # a refit runs every epoch, whatever validation says (its validation slices are training ones)
    refit = train_mod.train(str(tr), str(va), str(tmp_path / "refit"), patience=1, refit=True, **kw)
    assert seen == [24, 24, 24]  # the 8 validation slices are trained on, every epoch
    assert refit["refit"] is True and refit["n_train"] == 24 and refit["best_epoch"] == 2
    best = torch.load(tmp_path / "refit" / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "refit" / "last.pt", weights_only=True)
    assert best["meta"]["epoch"] == 2 and best["meta"]["refit"] is True
    assert all(torch.equal(best["state_dict"][k], last["model"][k]) for k in last["model"])

    # A plain run's last.pt is not resumed as a refit (the settings differ).
    train_mod.train(str(tr), str(va), str(tmp_path / "plain1"), patience=10, **{**kw, "epochs": 1})
    with pytest.raises(RuntimeError, match="other settings"):
        train_mod.train(str(tr), str(va), str(tmp_path / "plain1"), patience=10, refit=True, **{**kw, "epochs": 1})


def test_joined_caches_concatenate_samples_and_refuse_other_inputs():
    from pipeline.classify.train import _joined

    def cache(n, size, start):
        return {"images": np.zeros((n, size, size), np.uint8), "labels": np.arange(start, start + n),
                "paths": np.array([f"p{i}" for i in range(start, start + n)]), "mode": np.array("crop"),
                "size": np.array(size), "margin": np.array(0.5)}

    both = _joined(cache(3, 8, 0), cache(2, 8, 3))
    assert both["labels"].tolist() == [0, 1, 2, 3, 4] and both["paths"].tolist() == [f"p{i}" for i in range(5)]
    assert both["images"].shape == (5, 8, 8) and str(both["mode"]) == "crop" and int(both["size"]) == 8
    with pytest.raises(ValueError, match="different size"):
        _joined(cache(3, 8, 0), cache(2, 16, 3))
    other_margin = {**cache(2, 8, 3), "margin": np.array(1.0)}
    with pytest.raises(ValueError, match="different margin"):
        _joined(cache(3, 8, 0), other_margin)


def test_train_cls_cli_passes_refit_through(tmp_path, monkeypatch):
    import pipeline.classify.train as train_mod
    from pipeline.cli import main

    calls = []
    monkeypatch.setattr(train_mod, "train", lambda *a, **kw: calls.append(kw) or
                        {"best_epoch": 0, "best": None, "train_seconds": 0.0, "best_sha256": None})
    base = ["train-cls", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main(base) == 0 and main(base + ["--refit"]) == 0
    assert [kw["refit"] for kw in calls] == [False, True]


def test_environment_names_the_libraries_and_the_cpu():
    """Runs that repeat bit for bit on one machine can differ on another: the summary records the machine."""
    import importlib.metadata

    from pipeline.config import environment

    env = environment()
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert env["numpy"] == importlib.metadata.version("numpy") and env["timm"] == importlib.metadata.version("timm")
    assert isinstance(env["cpu"], str) and env["cpu"]
    assert env["cuda"] is None or isinstance(env["cuda"], str)
    json.dumps(env)  # it goes into summary.json as is


def test_environment_finds_opencv_under_its_headless_distribution(monkeypatch):
    """GPU images often ship opencv-python-headless rather than opencv-python (seen on the lent H200)."""
    import importlib.metadata

    from pipeline.config import environment

    real = importlib.metadata.version

    def only_headless(dist):
        if dist == "opencv-python":
            raise importlib.metadata.PackageNotFoundError(dist)
        return "4.99.0" if dist == "opencv-python-headless" else real(dist)

    monkeypatch.setattr(importlib.metadata, "version", only_headless)
    assert environment()["opencv-python"] == "4.99.0"


def test_a_dicom_exports_index_file_is_not_an_input(tmp_path):
    root = tmp_path / "export"
    (root / "S1").mkdir(parents=True)
    write_png(root / "S1" / "IM0001.png", make_phantom("glioma", 64, 1)[0])
    (root / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)  # an index of the files, no pixels
    (root / "S1" / "dicomdir").write_bytes(b"\0" * 200)
    (root / "notes.txt").write_text("not a scan")  # any other file still becomes an error row
    rels = sorted(p.relative_to(root).as_posix() for p in iter_input_files(root))
    assert rels == ["S1/IM0001.png", "notes.txt"]


def test_export_of_a_segmenter_refuses_what_is_not_a_yolo_seg_run(tmp_path, tiny_classifier):
    from pipeline.segment.load import export_yolo_seg
    from pipeline.weights import WeightsError

    with pytest.raises(WeightsError, match=rf"{tiny_classifier.name}: not a"):
        export_yolo_seg(tiny_classifier, tmp_path / "seg.pt")
    # a missing file is not looked for on GitHub (ultralytics' attempt_download_asset)
    with pytest.raises(WeightsError, match="gone.pt: no such file"):
        export_yolo_seg(tmp_path / "gone.pt", tmp_path / "seg.pt")
    assert not (tmp_path / "seg.pt").exists()


def test_export_of_a_segmenter_will_not_unpickle_where_safe_loading_is_missing(tmp_path, monkeypatch):
    # ultralytics' torch_safe_load turns safe_only off by itself under torch < 2.6: a pickle's code would run
    from ultralytics.nn import tasks

    from pipeline.segment.load import export_yolo_seg
    from pipeline.weights import WeightsError

    ran = tmp_path / "ran"
    torch.save({"x": _Payload(str(ran))}, tmp_path / "best.pt", _use_new_zipfile_serialization=True)
    monkeypatch.setattr(tasks._SafeLoad, "SUPPORTED", False)
    with pytest.raises(WeightsError, match="cannot load an ultralytics checkpoint weights-only"):
        export_yolo_seg(tmp_path / "best.pt", tmp_path / "seg.pt")
    assert not ran.exists() and not (tmp_path / "seg.pt").exists()


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))
