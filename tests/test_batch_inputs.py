"""Inputs a user's own folder holds that once broke `predict` (a bug hunt of session 21): each test
failed before its fix."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import CLASSES
from pipeline.batch import run_predict
from pipeline.classify.predict import Classifier
from pipeline.phantoms import make_phantom

REPO = Path(__file__).resolve().parents[1]


def rows(out: Path) -> list[dict]:
    with (out / "predictions.csv").open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def head(i=0) -> np.ndarray:
    return make_phantom(CLASSES[i % 4], 96, i)[0]


def lock_folder_named(name: str, monkeypatch):
    """Make folders called ``name`` unlistable, as chmod 000 does for a user other than root (the
    suite may run as root); returns the real ``os.scandir``."""
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)).name == name:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    return real_scandir


def folder_of_one(tmp_path: Path, name: str) -> Path:
    """``tmp_path/scans`` holding one phantom slice saved as ``name``."""
    src = tmp_path / "scans"
    src.mkdir()
    Image.fromarray(head(0)).save(src / name)
    return src


@pytest.mark.parametrize("flag", ["overlays", "gradcam"])
def test_a_file_name_that_is_not_utf8_does_not_kill_a_run_with_pictures(tmp_path, tiny_classifier, flag):
    """cv2.imwrite crashed the process (no row written, every rerun the same) on such a name."""
    src = tmp_path / "scans"
    src.mkdir()
    Image.fromarray(head(0)).save(src / "ok.png")
    Image.fromarray(head(1)).save(os.fsencode(src) + b"/caf\xe9.png")  # a Latin-1 name from an old archive
    code = textwrap.dedent(f"""
        from pipeline.batch import run_predict
        from pipeline.classify.predict import Classifier
        run_predict({str(src)!r}, {str(tmp_path / 'out')!r}, Classifier({str(tiny_classifier)!r}), None,
                    progress=False, {flag}=True)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert len(rows(tmp_path / "out")) == 2
    folder = tmp_path / "out" / ("overlays" if flag == "overlays" else "gradcam")
    assert sorted(os.listdir(os.fsencode(folder))) == [b"caf\xe9.png.png", b"ok.png.png"]


def test_a_folder_that_cannot_be_listed_gets_an_error_row(tmp_path, tiny_classifier, monkeypatch):
    src = tmp_path / "scans"
    (src / "locked").mkdir(parents=True)
    Image.fromarray(head(0)).save(src / "a.png")
    Image.fromarray(head(1)).save(src / "locked" / "b.png")
    real_scandir = lock_folder_named("locked", monkeypatch)
    clf = Classifier(tiny_classifier)
    run_predict(src, tmp_path / "out", clf, None, progress=False)
    got = {r["path"]: r for r in rows(tmp_path / "out")}
    assert got["a.png"]["status"] == "ok"
    assert got["locked"]["status"] == "error" and "Permission denied" in got["locked"]["error"]
    assert run_predict(src, tmp_path / "out", clf, None, progress=False)["rows_written"] == 0  # once only
    monkeypatch.setattr(os, "scandir", real_scandir)  # readable again: its scans are read now
    run_predict(src, tmp_path / "out", clf, None, progress=False)
    assert {r["path"] for r in rows(tmp_path / "out")} == {"a.png", "locked", "locked/b.png"}


def test_the_output_reached_through_a_linked_folder_is_not_read_as_input(tmp_path, tiny_classifier):
    src, series = tmp_path / "study", tmp_path / "series"
    src.mkdir()
    series.mkdir()
    Image.fromarray(head(0)).save(src / "a.png")
    Image.fromarray(head(1)).save(series / "b.png")
    (src / "series").symlink_to(series, target_is_directory=True)
    out = series / "results"
    clf = Classifier(tiny_classifier)
    run_predict(src, out, clf, None, progress=False, overlays=True)
    run_predict(src, out, clf, None, progress=False, overlays=True)
    assert sorted(r["path"] for r in rows(out)) == ["a.png", "series/b.png"]


def test_a_multipage_tiff_is_read_at_its_middle_page(tmp_path):
    from pipeline.scans import read_scans

    pages = [np.zeros((96, 96), np.uint8), head(0), np.full((96, 96), 7, np.uint8)]
    path = tmp_path / "stack.tif"
    Image.fromarray(pages[0]).save(path, save_all=True, append_images=[Image.fromarray(x) for x in pages[1:]])
    (scan,) = read_scans(path)
    np.testing.assert_array_equal(scan.image, pages[1])
    assert scan.meta["n_frames"] == 3 and scan.meta["frame_index"] == 1


@pytest.mark.parametrize("image", [np.zeros((256, 256), np.uint8), np.full((256, 256), 200, np.uint8),
                                   np.zeros((1, 1), np.uint8)], ids=["zeros", "constant", "1px"])
def test_a_blank_image_is_an_error_row_not_a_label(tmp_path, tiny_classifier, image):
    src = tmp_path / "scans"
    src.mkdir()
    Image.fromarray(image).save(src / "blank.png")
    Image.fromarray(head(0)).save(src / "brain.png")
    run_predict(src, tmp_path / "out", Classifier(tiny_classifier), None, progress=False)
    got = {r["path"]: r for r in rows(tmp_path / "out")}
    assert got["blank.png"]["status"] == "error" and not got["blank.png"]["label"]
    assert "blank" in got["blank.png"]["error"] and got["brain.png"]["status"] == "ok"


def test_a_line_break_in_a_file_name_is_not_redone_on_a_rerun(tmp_path, tiny_classifier):
    src = folder_of_one(tmp_path, "a\nb.png")
    clf = Classifier(tiny_classifier)
    run_predict(src, tmp_path / "out", clf, None, progress=False)
    again = run_predict(src, tmp_path / "out", clf, None, progress=False)
    assert again["rows_written"] == 0 and [r["path"] for r in rows(tmp_path / "out")] == ["a b.png"]


@pytest.mark.parametrize("flag", ["overlays", "gradcam"])
def test_adding_pictures_to_a_finished_folder_is_refused_not_silently_skipped(tmp_path, tiny_classifier, flag):
    src = folder_of_one(tmp_path, "a.png")
    clf = Classifier(tiny_classifier)
    run_predict(src, tmp_path / "out", clf, None, progress=False)
    with pytest.raises(ValueError, match=flag):
        run_predict(src, tmp_path / "out", clf, None, progress=False, **{flag: True})
    assert run_predict(src, tmp_path / "out", clf, None, progress=False)["rows_written"] == 0  # as before


def test_a_folder_made_with_overlays_before_they_were_recorded_resumes_with_them(tmp_path, tiny_classifier):
    import json

    src = folder_of_one(tmp_path, "a.png")
    Image.fromarray(head(1)).save(src / "b.png")
    out = tmp_path / "out"
    clf = Classifier(tiny_classifier)
    run_predict(src, out, clf, None, progress=False, overlays=True)
    record = out / "predictions.csv.settings.json"
    older = {k: v for k, v in json.loads(record.read_text()).items() if k != "overlays"}
    record.write_text(json.dumps(older))  # as written before this session
    lines = (out / "predictions.csv").read_text().splitlines()
    (out / "predictions.csv").write_text("\n".join(lines[:2]) + "\n")  # b.png not done yet
    assert run_predict(src, out, clf, None, progress=False, overlays=True)["rows_written"] == 1
    assert (out / "overlays" / "b.png.png").is_file() and json.loads(record.read_text())["overlays"] is True


def test_a_line_break_in_a_volume_name_is_not_redone_on_a_rerun(tmp_path, tiny_classifier):
    from tests.scan_fixtures import write_nifti

    src = tmp_path / "scans"
    src.mkdir()
    vol = np.stack([head(i) for i in range(3)], axis=-1).astype(np.float32)
    write_nifti(src / "a\nb.nii.gz", vol)
    clf = Classifier(tiny_classifier)
    first = run_predict(src, tmp_path / "out", clf, None, progress=False)
    assert first["rows_written"] == 3
    assert run_predict(src, tmp_path / "out", clf, None, progress=False)["rows_written"] == 0


def test_an_output_folder_in_the_input_that_holds_scans_is_refused(tmp_path, tiny_classifier):
    src = folder_of_one(tmp_path, "a.png")
    series = tmp_path / "series"
    series.mkdir()
    Image.fromarray(head(1)).save(series / "b.png")
    (src / "series").symlink_to(series, target_is_directory=True)
    with pytest.raises(ValueError, match="holds scans"):  # its b.png would be skipped without a row
        run_predict(src, series, Classifier(tiny_classifier), None, progress=False)


def test_a_tiff_of_an_image_and_its_thumbnail_is_read_at_the_image(tmp_path):
    from pipeline.scans import read_scans

    image, thumb = head(0), np.full((24, 24), 9, np.uint8)
    path = tmp_path / "with_thumb.tif"
    Image.fromarray(image).save(path, save_all=True, append_images=[Image.fromarray(thumb)] * 2)
    (scan,) = read_scans(path)
    np.testing.assert_array_equal(scan.image, image)
    assert scan.meta["frame_index"] == 0


def test_segment_gives_a_blank_image_an_empty_mask_and_an_unlistable_folder_a_row(tmp_path, monkeypatch):
    from pipeline.segment.run import run_segment
    from tests.fakes import BrightBlobSegmenter

    src = folder_of_one(tmp_path, "brain.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(src / "blank.png")
    (src / "locked").mkdir()
    lock_folder_named("locked", monkeypatch)
    run_segment(src, tmp_path / "seg", BrightBlobSegmenter(), progress=False)
    with (tmp_path / "seg" / "segments.csv").open(newline="") as fh:
        got = {r["path"]: r for r in csv.DictReader(fh)}
    assert got["blank.png"]["status"] == "ok" and got["blank.png"]["found"] == "false"
    assert (tmp_path / "seg" / "masks" / "blank.png").is_file()  # crop reads it like any other
    assert got["locked"]["status"] == "error" and "Permission denied" in got["locked"]["error"]


def test_a_single_file_as_input_is_told_to_use_a_folder(tmp_path, tiny_classifier):
    scan = tmp_path / "scan.png"
    Image.fromarray(head(0)).save(scan)
    with pytest.raises(NotADirectoryError, match="is a file; --input takes a folder"):
        run_predict(scan, tmp_path / "out", Classifier(tiny_classifier), None, progress=False)


def test_nonempty_skips_an_edge_slice_that_the_volume_window_leaves_blank(tmp_path):
    from pipeline.scans import read_scans
    from tests.scan_fixtures import write_nifti

    vol = np.zeros((32, 32, 5), np.float32)
    for z in (1, 2, 3):
        vol[..., z] = 100 + make_phantom("glioma", 32, z)[0]
    vol[3, 3, 0] = 1.0  # one faint voxel, below the 0.5th percentile of the volume's nonzero voxels
    write_nifti(tmp_path / "v.nii.gz", vol)
    assert [s.meta["slice_index"] for s in read_scans(tmp_path / "v.nii.gz")] == [1, 2, 3]
    assert [s.meta["slice_index"] for s in read_scans(tmp_path / "v.nii.gz", nifti_slices="all")] == [0, 1, 2, 3, 4]


def test_a_second_run_into_the_same_folder_at_once_is_refused(tmp_path, tiny_classifier):
    from pipeline.batch import COLUMNS
    from pipeline.folders import start_folder_run

    src = folder_of_one(tmp_path, "a.png")
    first = start_folder_run(src, tmp_path / "out", "predictions.csv", COLUMNS)
    with pytest.raises(ValueError, match="another run is writing predictions.csv there now"):
        run_predict(src, tmp_path / "out", Classifier(tiny_classifier), None, progress=False)
    first.lock.close()  # the first run ends
    assert run_predict(src, tmp_path / "out", Classifier(tiny_classifier), None, progress=False)["rows_written"] == 1


def test_an_image_stored_sideways_is_read_as_viewers_show_it(tmp_path):
    from pipeline.scans import read_scans

    stored = head(0)[:, :80]  # not square, so a turn shows in the shape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    (scan,) = read_scans(tmp_path / "phone.png")
    np.testing.assert_array_equal(scan.image, np.rot90(stored, k=-1))
    assert scan.meta["exif_orientation"] == 6


def test_a_name_too_long_for_its_overlay_costs_the_picture_not_the_run(tmp_path, tiny_classifier, capsys):
    name = "x" * 250 + ".png"  # the overlay adds ".png": 259 bytes, over the usual 255
    src = folder_of_one(tmp_path, name)
    run_predict(src, tmp_path / "out", Classifier(tiny_classifier), None, progress=False, overlays=True)
    assert rows(tmp_path / "out")[0]["status"] == "ok"
    assert "picture not written" in capsys.readouterr().err


def test_a_folder_from_before_slicing_was_recorded_resumes_unless_it_holds_volume_slices(tmp_path, tiny_classifier):
    import json

    from pipeline.folders import SLICING
    from tests.scan_fixtures import write_nifti

    src = folder_of_one(tmp_path, "a.png")
    clf = Classifier(tiny_classifier)
    out = tmp_path / "out"
    run_predict(src, out, clf, None, progress=False)
    record = out / "predictions.csv.settings.json"
    assert json.loads(record.read_text())["slicing"] == SLICING == 3
    older = {k: v for k, v in json.loads(record.read_text()).items() if k != "slicing"}
    record.write_text(json.dumps(older))  # as written before volumes were cut the file's way
    # no slice rows: nothing means anything else now, so it resumes, and the record says so from now on
    vol = np.stack([head(k).astype(np.float32) for k in range(3)], -1)
    write_nifti(src / "v.nii.gz", vol)
    assert run_predict(src, out, clf, None, progress=False)["rows_written"] == 3
    assert json.loads(record.read_text())["slicing"] == SLICING
    Image.fromarray(head(4)).save(src / "b.png")
    assert run_predict(src, out, clf, None, progress=False)["rows_written"] == 1  # its own slices are not "older"
    # a folder whose #z= rows an older version wrote is refused, not topped up with other slices
    record.write_text(json.dumps(older))
    with pytest.raises(ValueError, match="holds volume slices .* cut the way slicing 1"):
        run_predict(src, out, clf, None, progress=False)
    # slicing 2 cut only a one-slice volume stored across its first or second axis otherwise
    record.write_text(json.dumps({**older, "slicing": 2}))
    assert run_predict(src, out, clf, None, progress=False)["rows_written"] == 0  # v.nii.gz is (H, W, 3)
    assert json.loads(record.read_text())["slicing"] == SLICING
    write_nifti(src / "one.nii.gz", head(5).astype(np.float32)[None])  # (1, H, W): one sagittal slice
    with open(out / "predictions.csv", "a") as fh:  # as slicing 2 wrote it: one-pixel lines
        fh.write("one.nii.gz#z=00,glioma,0.5,,,,,,,,,,full,ok,\n")
    record.write_text(json.dumps({**older, "slicing": 2}))
    with pytest.raises(ValueError, match="cut the way slicing 2 cut them .*one-pixel lines"):
        run_predict(src, out, clf, None, progress=False)


def test_predict_refuses_a_rerun_with_other_volume_slices(tmp_path, tiny_classifier):
    import json

    src = folder_of_one(tmp_path, "a.png")
    clf = Classifier(tiny_classifier)
    run_predict(src, tmp_path / "out", clf, None, progress=False, nifti_slices="middle")
    assert json.loads((tmp_path / "out" / "predictions.csv.settings.json").read_text())["nifti_slices"] == "middle"
    with pytest.raises(ValueError, match="other settings .*nifti_slices"):
        run_predict(src, tmp_path / "out", clf, None, progress=False)
    # a folder from before the choice was recorded resumes under it when none of its rows depends on it
    record = tmp_path / "out" / "predictions.csv.settings.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "nifti_slices"}))
    assert run_predict(src, tmp_path / "out", clf, None, progress=False, nifti_slices=[2, 1, 2])["rows_written"] == 0
    assert json.loads(record.read_text())["nifti_slices"] == [1, 2]


def test_dicom_window_is_recorded_and_a_rerun_with_another_is_refused(tmp_path, tiny_classifier):
    from pipeline.batch import run_predict
    from pipeline.classify.predict import Classifier
    from tests.scan_fixtures import write_dicom

    src = tmp_path / "scans"
    src.mkdir()
    write_dicom(src / "a.dcm", (np.arange(32 * 32).reshape(32, 32) % 4000).astype(np.uint16), window=(1000, 500))
    out = tmp_path / "out"
    run_predict(src, out, Classifier(tiny_classifier), None, dicom_window="minmax", progress=False)
    assert json.loads((out / "predictions.csv.settings.json").read_text())["dicom_window"] == "minmax"
    with pytest.raises(ValueError, match="dicom_window"):
        run_predict(src, out, Classifier(tiny_classifier), None, progress=False)  # the file's window: other pixels
    with pytest.raises(ValueError, match="dicom_window must be one of"):
        run_predict(src, tmp_path / "out2", Classifier(tiny_classifier), None, dicom_window="soft", progress=False)
