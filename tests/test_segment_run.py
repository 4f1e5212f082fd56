import argparse
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.evaluate_seg import evaluate_segmentation
from pipeline.phantoms import make_phantom, write_phantom_dataset
from pipeline.segment import run as seg_run
from pipeline.segment.run import SEG_COLUMNS, add_arguments, mask_names, mask_relpath, run, run_segment
from pipeline.weights import WeightsError
from tests.fakes import BrightBlobSegmenter
from tests.scan_fixtures import write_jpeg, write_nifti, write_png


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def make_folder(root: Path) -> dict[str, tuple[int, int] | None]:
    """Scans of several sizes plus bad files; returns {csv path: expected (H, W) or None for an error row}."""
    expected: dict[str, tuple[int, int] | None] = {}
    (root / "study" / "series").mkdir(parents=True)
    wide = np.pad(make_phantom("meningioma", 96, 1)[0], ((0, 0), (12, 20)))  # 96 x 128: H != W
    write_png(root / "study" / "mening.png", wide)
    expected["study/mening.png"] = (96, 128)
    write_png(root / "study" / "none.png", make_phantom("notumor", 80, 2)[0])
    expected["study/none.png"] = (80, 80)
    write_jpeg(root / "study" / "series" / "glioma.jpg", make_phantom("glioma", 64, 3)[0])
    expected["study/series/glioma.jpg"] = (64, 64)
    vol = np.zeros((72, 64, 4), np.float32)  # displayed slices are (64, 72)
    for z in (1, 2):
        vol[:, :, z] = make_phantom("pituitary", 72, z)[0][:, :64]
    write_nifti(root / "vol.nii.gz", vol)
    expected["vol.nii.gz#z=01"] = expected["vol.nii.gz#z=02"] = (64, 72)
    (root / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = None
    (root / "study" / "fake.png").write_text("this is text, not a PNG")
    expected["study/fake.png"] = None
    return expected


def test_segment_folder_masks_rows_and_errors(tmp_path):
    src, out = tmp_path / "scans", tmp_path / "out"
    expected = make_folder(src)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    counts = run_segment(src, out, BrightBlobSegmenter(), batch_size=2, workers=1, progress=False)
    with (out / "segments.csv").open() as fh:
        assert fh.readline().strip() == ",".join(SEG_COLUMNS)
    rows = {r["path"]: r for r in read_rows(out / "segments.csv")}
    assert set(rows) == set(expected) and counts["rows_written"] == len(expected)
    assert counts["errors"] == 2
    for key, shape in expected.items():
        row = rows[key]
        assert row["model"] == "yolo"
        if shape is None:
            assert row["status"] == "error" and row["error"] and row["found"] == ""
            continue
        assert row["status"] == "ok" and row["error"] == ""
        mask = cv2.imread(str(out / "masks" / mask_relpath(key)), cv2.IMREAD_UNCHANGED)
        assert mask is not None and mask.dtype == np.uint8 and mask.shape == shape
        assert set(np.unique(mask)) <= {0, 255}
        assert int(row["area_px"]) == int((mask > 0).sum())
        if row["found"] == "true":
            ys, xs = np.nonzero(mask)
            assert (int(row["x0"]), int(row["y0"]), int(row["x1"]), int(row["y1"])) == \
                   (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert float(row["score"]) == pytest.approx(1.0)
        else:
            assert row["x0"] == "" and not mask.any()
    assert "empty" in rows["empty.jpg"]["error"]
    assert rows["study/mening.png"]["found"] == "true" and rows["study/none.png"]["found"] == "false"
    assert (out / "masks" / "vol.nii.gz_z01.png").is_file() and (out / "masks" / "study/series/glioma.png").is_file()
    assert not list((out / "masks").rglob(".*"))  # no temporary files left behind
    assert before == {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}  # inputs untouched


def test_rerun_writes_nothing_and_lost_rows_are_redone(tmp_path):
    src, out = tmp_path / "scans", tmp_path / "out"
    expected = make_folder(src)
    run_segment(src, out, BrightBlobSegmenter(), batch_size=3, progress=False)
    csv_path = out / "segments.csv"
    full = csv_path.read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "masks").rglob("*")}
    again = run_segment(src, out, BrightBlobSegmenter(), batch_size=3, progress=False)
    assert again["rows_written"] == 0 and csv_path.read_bytes() == full
    assert stamps == {p: p.stat().st_mtime_ns for p in (out / "masks").rglob("*")}
    # A run killed mid-line: the torn row (a volume slice) and the one before it are redone.
    lines = full.split(b"\n")
    csv_path.write_bytes(b"\n".join(lines[:-3]) + b"\n" + lines[-3][:7])
    third = run_segment(src, out, BrightBlobSegmenter(), batch_size=3, progress=False)
    assert third["rows_written"] == 2
    paths = [r["path"] for r in read_rows(csv_path)]
    assert sorted(paths) == sorted(expected) and len(paths) == len(set(paths))


def test_a_rerun_with_other_volume_slices_is_refused_not_skipped(tmp_path):
    # an out-of-range choice made the volume an error row, which a rerun with `all` then skipped as done
    src, out = tmp_path / "scans", tmp_path / "out"
    make_folder(src)
    run_segment(src, out, BrightBlobSegmenter(), progress=False, nifti_slices=[7])
    assert [r["status"] for r in read_rows(out / "segments.csv") if r["path"] == "vol.nii.gz"] == ["error"]
    with pytest.raises(ValueError, match=r"other settings .*nifti_slices.*\(\[7\], 'all'\)"):
        run_segment(src, out, BrightBlobSegmenter(), progress=False, nifti_slices="all")
    run_segment(src, out, BrightBlobSegmenter(), progress=False, nifti_slices=[7])  # the same choice resumes
    # the default is not recorded: folders made before the choice was recorded still resume
    run_segment(src, tmp_path / "plain", BrightBlobSegmenter(), progress=False)
    assert "nifti_slices" not in (tmp_path / "plain" / "segments.csv.settings.json").read_text()


def test_mask_names_mirror_the_tree_and_avoid_clashes():
    names = mask_names(["a/x.jpg", "a/x.png", "a/y.dcm", "IM0001", "v.nii.gz", "b/x.jpg"])
    assert names == {"a/x.jpg": "a/x.jpg.png", "a/x.png": "a/x.png.png", "a/y.dcm": "a/y.png",
                     "IM0001": "IM0001.png", "v.nii.gz": "v.png", "b/x.jpg": "b/x.png"}
    assert mask_relpath("d/vol.nii.gz#z=07") == "d/vol.nii.gz_z07.png"


def test_clashing_names_get_distinct_masks(tmp_path):
    src = tmp_path / "scans"
    src.mkdir()
    write_png(src / "x.png", make_phantom("meningioma", 64, 0)[0])
    write_jpeg(src / "x.jpg", make_phantom("notumor", 48, 0)[0])
    run_segment(src, tmp_path / "out", BrightBlobSegmenter(), progress=False)
    assert cv2.imread(str(tmp_path / "out" / "masks" / "x.png.png"), 0).shape == (64, 64)
    assert cv2.imread(str(tmp_path / "out" / "masks" / "x.jpg.png"), 0).shape == (48, 48)


def test_a_scan_added_later_does_not_rename_the_masks_already_written(tmp_path):
    # x.jpg was alone: masks/x.png. With x.png added, the rule alone would now say x.jpg -> x.jpg.png
    # (never written) and put x.png's mask where x.jpg's is; crop then found no mask for x.jpg
    from pipeline.classify.data import mask_paths
    from pipeline.datasets import Sample

    src, out = tmp_path / "scans" / "glioma", tmp_path / "out"
    src.mkdir(parents=True)
    write_jpeg(src / "x.jpg", make_phantom("notumor", 48, 0)[0])
    run_segment(src.parent, out, BrightBlobSegmenter(), progress=False)
    first = (out / "masks" / "glioma" / "x.png").read_bytes()
    write_png(src / "x.png", make_phantom("meningioma", 64, 0)[0])
    assert run_segment(src.parent, out, BrightBlobSegmenter(), progress=False)["rows_written"] == 1
    assert (out / "masks" / "glioma" / "x.png").read_bytes() == first  # x.jpg's, untouched
    assert cv2.imread(str(out / "masks" / "glioma" / "x.png.png"), 0).shape == (64, 64)
    assert (out / "mask_names.csv").read_text().splitlines() == ["path,mask", "glioma/x.png,glioma/x.png.png"]
    samples = [Sample(src / "x.jpg", "glioma"), Sample(src / "x.png", "glioma")]
    assert mask_paths(samples, src.parent, out / "masks") == [out / "masks" / "glioma" / "x.png",
                                                             out / "masks" / "glioma" / "x.png.png"]
    # a third run changes nothing
    assert run_segment(src.parent, out, BrightBlobSegmenter(), progress=False)["rows_written"] == 0
    assert (out / "mask_names.csv").read_text().splitlines()[1:] == ["glioma/x.png,glioma/x.png.png"]


@pytest.mark.parametrize("x_jpg_stays", [True, False])
def test_a_folder_from_before_the_names_record_keeps_its_masks(tmp_path, x_jpg_stays):
    # segmented before mask_names.csv existed: x.jpg's mask is masks/x.png. A clashing x.png added
    # since must neither rename x.jpg's mask (to a file never written) nor overwrite it
    src, out = tmp_path / "scans", tmp_path / "out"
    src.mkdir()
    write_jpeg(src / "x.jpg", make_phantom("notumor", 48, 0)[0])
    run_segment(src, out, BrightBlobSegmenter(), progress=False)
    (out / "mask_names.csv").unlink()
    first = (out / "masks" / "x.png").read_bytes()
    if not x_jpg_stays:
        (src / "x.jpg").unlink()
    write_png(src / "x.png", make_phantom("meningioma", 64, 0)[0])
    assert run_segment(src, out, BrightBlobSegmenter(), progress=False)["rows_written"] == 1
    assert (out / "masks" / "x.png").read_bytes() == first
    assert cv2.imread(str(out / "masks" / "x.png.png"), 0).shape == (64, 64)
    assert (out / "mask_names.csv").read_text().splitlines() == ["path,mask", "x.png,x.png.png"]


def test_an_input_folder_spelt_like_a_mask_file_is_an_error_row_and_the_run_goes_on(tmp_path):
    src, out = tmp_path / "scans", tmp_path / "out"
    (src / "x.png").mkdir(parents=True)  # a folder: its masks go under masks/x.png/, x.jpg's mask is masks/x.png
    write_jpeg(src / "x.jpg", make_phantom("glioma", 48, 0)[0])
    write_jpeg(src / "x.png" / "b.jpg", make_phantom("glioma", 48, 1)[0])
    write_jpeg(src / "z.jpg", make_phantom("glioma", 48, 2)[0])
    run_segment(src, out, BrightBlobSegmenter(), progress=False)
    rows = {r["path"]: r for r in read_rows(out / "segments.csv")}
    assert set(rows) == {"x.jpg", "x.png/b.jpg", "z.jpg"}
    assert rows["x.jpg"]["status"] == rows["z.jpg"]["status"] == "ok"
    assert rows["x.png/b.jpg"]["status"] == "error" and "mask not written" in rows["x.png/b.jpg"]["error"]


def test_masks_of_scans_gone_and_back_and_of_scans_never_segmented(tmp_path):
    import shutil

    from pipeline.classify.data import mask_paths
    from pipeline.datasets import Sample

    src, out = tmp_path / "scans" / "glioma", tmp_path / "out"
    src.mkdir(parents=True)
    write_jpeg(src / "x.jpg", make_phantom("notumor", 48, 0)[0])
    run_segment(src.parent, out, BrightBlobSegmenter(), progress=False)
    shutil.move(src / "x.jpg", tmp_path / "x.jpg")  # taken out for a while: its mask keeps its name
    write_png(src / "x.png", make_phantom("meningioma", 64, 0)[0])
    samples = [Sample(src / "x.jpg", "glioma"), Sample(src / "x.png", "glioma")]
    # not segmented yet: crop must not hand it x.jpg's mask, which has its plain name
    with pytest.raises(FileNotFoundError, match="x.png: no row in .*segments.csv"):
        mask_paths(samples[1:], src.parent, out / "masks")
    run_segment(src.parent, out, BrightBlobSegmenter(), progress=False)
    shutil.move(tmp_path / "x.jpg", src / "x.jpg")
    assert run_segment(src.parent, out, BrightBlobSegmenter(), progress=False)["rows_written"] == 0
    paths = mask_paths(samples, src.parent, out / "masks")
    assert [cv2.imread(str(p), 0).shape for p in paths] == [(48, 48), (64, 64)]


def test_segment_then_evaluate_on_phantoms(tmp_path):
    root = write_phantom_dataset(tmp_path / "ph", n_per_class=2, size=96, seed=1, splits={"Testing": 1.0})
    out = tmp_path / "seg"
    run_segment(root / "Testing", out, BrightBlobSegmenter(), progress=False)
    res = evaluate_segmentation(out, root / "masks" / "Testing", tmp_path / "eval", images_dir=root / "Testing")
    c = res["counts"]
    assert c["paired"] == 8 and c["missing_pred"] == 0 and c["tumor_slices"] == 6 and c["empty_truth_slices"] == 2
    assert res["false_mask_rate"] == 0.0
    per = {r["path"]: r for r in csv.DictReader((tmp_path / "eval" / "per_image.csv").open())}
    assert all(float(r["dice"]) > 0.9 for k, r in per.items() if k.startswith("pituitary/"))
    assert res["worst_cases"][0]["path"].startswith("glioma/")  # the stand-in misses the dark ring-enhancing mass


def parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(argv)
    args.device, args.seed = "cpu", 0
    return args


def test_cli_unknown_model_is_a_clear_error(tmp_path):
    from pipeline.segment.run import build_segmenter

    with pytest.raises(ConfigError, match="--model must be one of unet, yolo"):
        build_segmenter("unet++", weights=str(tmp_path / "w.pt"))


def test_cli_missing_default_segmenter_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.weights.load_manifest", lambda *a, **k: {})
    with pytest.raises(WeightsError, match="no default segmenter.*train"):
        run(parse(["--input", str(tmp_path), "--out", str(tmp_path / "o")]))
    with pytest.raises(WeightsError, match="not found"):
        run(parse(["--input", str(tmp_path), "--out", str(tmp_path / "o"), "--weights", str(tmp_path / "no.pt")]))


def test_cli_run_with_a_stand_in_segmenter(tmp_path, monkeypatch, capsys):
    src = tmp_path / "scans"
    src.mkdir()
    write_png(src / "a.png", make_phantom("meningioma", 64, 0)[0])
    seen = {}

    def fake_build(model, weights=None, **kw):
        seen.update(model=model, weights=weights, **kw)
        return BrightBlobSegmenter()

    monkeypatch.setattr(seg_run, "build_segmenter", fake_build)
    args = parse(["--input", str(src), "--out", str(tmp_path / "o"), "--weights", "w.pt", "--nifti-slices", "1,2"])
    assert run(args) == 0
    assert json.loads(capsys.readouterr().out)["rows_written"] == 1
    assert seen["model"] is None and seen["weights"] == "w.pt" and args.nifti_slices == [1, 2]
    assert read_rows(tmp_path / "o" / "segments.csv")[0]["model"] == "segmenter"  # the stand-in has no name


def test_cli_sam_without_its_checkpoint_is_a_clear_error(tmp_path):
    from pipeline.weights import WEIGHTS_DIR, load_manifest

    entry = load_manifest().get("sam_vit_b")
    if entry is None or (WEIGHTS_DIR / entry["file"]).is_file():
        pytest.skip("needs a manifest listing sam_vit_b whose file is absent")
    with pytest.raises(WeightsError, match="SAM checkpoint missing"):
        run(parse(["--input", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "yolo+sam"]))


def test_a_name_near_the_file_system_limit_gets_its_mask_or_an_error_row_and_the_run_goes_on(tmp_path):
    src, out = tmp_path / "scans", tmp_path / "out"
    src.mkdir()
    write_png(src / ("a" * 241 + ".png"), make_phantom("glioma", 64, 1)[0])  # a 245-byte name
    # two stems that clash: each mask keeps its whole name plus .png, 257 bytes, past the limit
    write_png(src / ("b" * 249 + ".png"), make_phantom("glioma", 64, 2)[0])
    write_jpeg(src / ("b" * 249 + ".jpg"), make_phantom("glioma", 64, 4)[0])
    write_png(src / "ok.png", make_phantom("glioma", 64, 3)[0])
    counts = run_segment(src, out, BrightBlobSegmenter(), batch_size=4, progress=False)
    rows = {r["path"]: r for r in read_rows(out / "segments.csv")}
    assert counts["rows_written"] == 4 and rows["ok.png"]["status"] == "ok"
    assert rows["a" * 241 + ".png"]["status"] == "ok" and (out / "masks" / ("a" * 241 + ".png")).is_file()
    for name in ("b" * 249 + ".png", "b" * 249 + ".jpg"):
        assert rows[name]["status"] == "error" and "mask not written" in rows[name]["error"]
    assert run_segment(src, out, BrightBlobSegmenter(), batch_size=4, progress=False)["rows_written"] == 0


def test_a_header_torn_by_a_kill_is_written_again_on_the_next_run(tmp_path):
    from pipeline.folders import ResultsCSV

    path = tmp_path / "segments.csv"
    path.write_text(",".join(SEG_COLUMNS)[:12])  # killed while the header itself was written
    csv_file = ResultsCSV(path, SEG_COLUMNS)
    assert path.read_text() == ",".join(SEG_COLUMNS) + "\n" and not csv_file.done


def test_a_fallback_mask_name_never_meets_another_files_own():
    names = mask_names(["x.jpg", "x.png", "x.png.png"])
    # a file's own name wins; the clashing x.png's fallback gives way
    assert names == {"x.jpg": "x.jpg.png", "x.png.png": "x.png.png", "x.png": "x.png~1.png"}
    # names that never clashed are never renamed (folders are compared as spelt, like the clash count)
    assert mask_names(["A/x.png", "a/x.png", "x~1.png"]) == {"A/x.png": "A/x.png", "a/x.png": "a/x.png",
                                                          "x~1.png": "x~1.png"}


def test_an_earlier_runs_output_inside_the_input_is_not_read_as_scans(tmp_path):
    from pipeline.folders import iter_input_files

    src = tmp_path / "scans"
    src.mkdir()
    write_png(src / "glioma.png", make_phantom("glioma", 64, 1)[0])
    run_segment(src, src / "seg", BrightBlobSegmenter(), progress=False)  # allowed: it holds no scans yet
    assert [p.relative_to(src).as_posix() for p in iter_input_files(src)] == ["glioma.png"]
    again = run_segment(src, tmp_path / "seg2", BrightBlobSegmenter(), progress=False)
    assert again["rows_written"] == 1
    # a scan someone put in that folder later is still a scan
    (src / "seg" / "series").mkdir()
    write_png(src / "seg" / "series" / "late.png", make_phantom("glioma", 64, 2)[0])
    assert [p.relative_to(src).as_posix() for p in iter_input_files(src)] == ["glioma.png", "seg/series/late.png"]


def test_a_full_disk_stops_segment_so_a_rerun_resumes_rather_than_recording_errors(tmp_path, monkeypatch):
    import errno

    src = tmp_path / "scans"
    src.mkdir()
    write_png(src / "a.png", make_phantom("glioma", 64, 1)[0])

    def full(path, image):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(seg_run, "write_png_atomic", full)
    with pytest.raises(OSError):
        run_segment(src, tmp_path / "out", BrightBlobSegmenter(), progress=False)
    monkeypatch.undo()
    assert run_segment(src, tmp_path / "out", BrightBlobSegmenter(), progress=False)["rows_written"] == 1


def test_a_long_name_in_many_byte_characters_is_written(tmp_path):
    from pipeline.folders import write_png_atomic

    name = "\N{BRAIN}" * 62 + ".png"  # 252 bytes: fits, but a temporary name built from it would not
    write_png_atomic(tmp_path / name, np.zeros((4, 4), np.uint8))
    assert (tmp_path / name).is_file() and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("record, text, why", [
    ("segments.csv.settings.json", "", "segments.csv.settings.json: not a readable settings record"),
    ("mask_names.csv", "path,name\nx.png,y.png\n", "mask_names.csv: expected the columns path,mask"),
])
def test_a_damaged_record_is_refused_by_name(tmp_path, record, text, why):
    src, out = tmp_path / "scans", tmp_path / "out"
    src.mkdir()
    write_jpeg(src / "x.jpg", make_phantom("glioma", 48, 0)[0])
    run_segment(src, out, BrightBlobSegmenter(), progress=False)
    (out / record).write_text(text)
    with pytest.raises(ValueError, match=why):
        run_segment(src, out, BrightBlobSegmenter(), progress=False)


def test_an_output_folder_is_not_resumed_for_another_input_folder(tmp_path):
    # rows are keyed by the path under the input: patient B's IM0001 would pass for patient A's, done
    out = tmp_path / "out"
    for patient, seed in (("A", 0), ("B", 1)):
        (tmp_path / patient).mkdir()
        write_jpeg(tmp_path / patient / "IM0001.jpg", make_phantom("glioma", 48, seed)[0])
    run_segment(tmp_path / "A", out, BrightBlobSegmenter(), progress=False)
    with pytest.raises(ValueError, match=r"holds results for the scans under .*A, not .*B"):
        run_segment(tmp_path / "B", out, BrightBlobSegmenter(), progress=False)
    # a folder from before the input was recorded takes this run's, and keeps it
    record = out / "segments.csv.settings.json"
    settings = json.loads(record.read_text())
    assert settings.pop("input") == str((tmp_path / "A").resolve())
    record.write_text(json.dumps(settings))
    assert run_segment(tmp_path / "A", out, BrightBlobSegmenter(), progress=False)["rows_written"] == 0
    assert json.loads(record.read_text())["input"] == str((tmp_path / "A").resolve())
    with pytest.raises(ValueError, match="holds results for the scans under"):
        run_segment(tmp_path / "B", out, BrightBlobSegmenter(), progress=False)


def test_a_nifti_gets_a_mask_volume_in_its_own_voxel_grid(tmp_path):
    import nibabel as nib

    from pipeline.scans import read_scans

    src, out = tmp_path / "scans", tmp_path / "out"
    src.mkdir()
    x = np.linspace(450, 550, 40, dtype=np.float32)[:, None, None]
    vol = np.broadcast_to(x, (40, 32, 5)).copy()
    vol[24:32, 8:16, 1:4] = 1000  # the lesion, on slices 1-3
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])
    write_nifti(src / "vol.nii.gz", vol, affine=lps)
    counts = run_segment(src, out, BrightBlobSegmenter(), progress=False, nifti_slices="all")
    assert counts["mask_volumes"] == 1
    volume = out / "masks" / "vol.nii.gz_mask.nii.gz"
    img = nib.load(volume)
    data = np.asarray(img.dataobj)
    assert data.shape == vol.shape and np.allclose(img.affine, lps)
    assert data.any() and not data[vol < 1000].any()  # on the lesion's voxels only
    assert not data[:, :, [0, 4]].any()
    for z in range(5):  # the volume, shown as the reader shows it, is segment's PNG of that slice
        png = cv2.imread(str(out / "masks" / f"vol.nii.gz_z{z:02d}.png"), cv2.IMREAD_GRAYSCALE)
        shown = read_scans(volume, nifti_slices=[z])[0].image
        np.testing.assert_array_equal(shown > 0, png > 0)
    # a rerun with nothing new leaves it as it is
    before = volume.stat().st_mtime_ns
    assert run_segment(src, out, BrightBlobSegmenter(), progress=False, nifti_slices="all")["mask_volumes"] == 0
    assert volume.stat().st_mtime_ns == before
    volume.unlink()  # lost (a kill between the last slice and the volume): the rerun writes it again
    assert run_segment(src, out, BrightBlobSegmenter(), progress=False, nifti_slices="all")["mask_volumes"] == 1


def test_mask_volumes_for_odd_names_and_a_file_that_only_looks_like_a_nifti(tmp_path, capsys):
    import os

    import nibabel as nib

    from tests.scan_fixtures import write_dicom

    src, out = tmp_path / "scans", tmp_path / "out"
    src.mkdir()
    x = np.linspace(450, 550, 40, dtype=np.float32)[:, None, None]
    vol = np.broadcast_to(x, (40, 32, 3)).copy()
    vol[24:32, 8:16, 1] = 1000
    write_nifti(src / "line\nbreak.nii.gz", vol)
    odd = os.fsencode(str(src)) + b"/v\xff.nii.gz"  # not UTF-8: cv2.imread would crash the process
    (src / "plain.nii.gz").write_bytes((src / "line\nbreak.nii.gz").read_bytes())
    os.rename(os.fsencode(str(src / "plain.nii.gz")), odd)
    write_dicom(src / "x.nii", np.full((32, 32), 500, np.uint16))  # a DICOM, named as a NIfTI
    counts = run_segment(src, out, BrightBlobSegmenter(), progress=False, nifti_slices="all")
    assert counts["mask_volumes"] == 2
    assert nib.load(out / "masks" / "line\nbreak.nii.gz_mask.nii.gz").shape == vol.shape
    assert os.path.isfile(os.fsencode(str(out / "masks")) + b"/v\xff.nii.gz_mask.nii.gz")
    assert "x.nii_mask.nii.gz: mask volume not written" in capsys.readouterr().err


def test_a_mask_volume_keeps_a_source_without_orientation_codes_without_them(tmp_path):
    import nibabel as nib

    from pipeline.scans import write_nifti_mask

    src = nib.Nifti1Image(np.zeros((6, 5, 2), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    src.set_qform(None, code=0)
    src.set_sform(None, code=0)
    nib.save(src, tmp_path / "v.nii")
    out = nib.load(write_nifti_mask(tmp_path / "v.nii", {}, tmp_path / "m.nii.gz"))
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (0, 0)
