import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import CLASSES
from pipeline.batch import COLUMNS, run_predict
from pipeline.folders import ResultsCSV, savez_atomic
from pipeline.classify.predict import Classifier
from pipeline.phantoms import make_phantom
from tests.fakes import BrightBlobSegmenter
from tests.scan_fixtures import write_dicom, write_jpeg, write_nifti, write_png

REPO = Path(__file__).resolve().parents[1]




def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def make_mixed_folder(root: Path) -> dict[str, str]:
    """A folder like a real export; returns {relative key: expected status}."""
    (root / "study1" / "series2").mkdir(parents=True)
    expected = {}
    for i, label in enumerate(CLASSES):
        image, _ = make_phantom(label, 96, i)
        write_png(root / "study1" / f"{label}.png", image)
        expected[f"study1/{label}.png"] = "ok"
    write_jpeg(root / "study1" / "series2" / "slice.jpg", make_phantom("glioma", 96, 9)[0])
    expected["study1/series2/slice.jpg"] = "ok"
    write_dicom(root / "study1" / "series2" / "IM0001", (make_phantom("meningioma", 64, 1)[0].astype(np.uint16) * 8))
    expected["study1/series2/IM0001"] = "ok"
    vol = np.zeros((64, 64, 4), np.float32)
    for z in (1, 2):
        vol[:, :, z] = make_phantom("pituitary", 64, z)[0]
    write_nifti(root / "vol.nii.gz", vol)
    expected["vol.nii.gz#z=01"] = expected["vol.nii.gz#z=02"] = "ok"
    (root / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "error"
    good = root / "study1" / "glioma.png"
    write_jpeg(root / "truncated.jpg", make_phantom("glioma", 96, 3)[0])
    data = (root / "truncated.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    expected["truncated.jpg"] = "error"
    (root / "notes.txt").write_text("radiology notes, not an image")
    expected["notes.txt"] = "error"
    (root / "fake.png").write_text("this is text")
    expected["fake.png"] = "error"
    assert good.is_file()
    return expected


def test_mixed_folder_gives_one_correct_row_per_input(tmp_path, tiny_classifier):
    src = tmp_path / "scans"
    expected = make_mixed_folder(src)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    counts = run_predict(src, tmp_path / "out", Classifier(tiny_classifier), BrightBlobSegmenter(), mode="crop",
                         batch_size=3, progress=False)
    rows = read_rows(tmp_path / "out" / "predictions.csv")
    assert list(rows[0]) == COLUMNS
    assert {r["path"]: r["status"] for r in rows} == expected
    assert len(rows) == len(expected) == counts["rows_written"]
    for r in rows:
        if r["status"] == "ok":
            probs = [float(r[f"p_{c}"]) for c in CLASSES]
            assert abs(sum(probs) - 1) < 1e-4 and r["label"] == CLASSES[int(np.argmax(probs))]
            assert r["mode"] == "crop" and r["found"] in ("true", "false")
        else:
            assert r["error"] and not r["label"]
    reasons = {r["path"]: r["error"] for r in rows}
    assert "empty" in reasons["empty.jpg"] and "unsupported" in reasons["notes.txt"]
    # The meningioma phantom is a bright blob: the segmenter finds it and the box lies inside the image.
    g = next(r for r in rows if r["path"] == "study1/meningioma.png")
    assert g["found"] == "true" and 0 <= int(g["x0"]) < int(g["x1"]) <= 96
    n = next(r for r in rows if r["path"] == "study1/notumor.png")
    assert n["found"] == "false" and n["x0"] == ""
    # Inputs untouched.
    assert before == {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}


def test_rerun_does_nothing_and_torn_line_is_redone(tmp_path, tiny_classifier):
    src = tmp_path / "scans"
    expected = make_mixed_folder(src)
    out = tmp_path / "out"
    clf = Classifier(tiny_classifier)
    run_predict(src, out, clf, None, batch_size=4, progress=False)
    csv_path = out / "predictions.csv"
    full = csv_path.read_bytes()
    again = run_predict(src, out, clf, None, batch_size=4, progress=False)
    assert again["rows_written"] == 0 and csv_path.read_bytes() == full
    # Simulate a kill in the middle of writing the last line.
    lines = full.split(b"\n")
    csv_path.write_bytes(b"\n".join(lines[:-3]) + b"\n" + lines[-3][:10])
    run_predict(src, out, clf, None, batch_size=4, progress=False)
    rows = read_rows(csv_path)
    assert sorted(r["path"] for r in rows) == sorted(expected)


def test_output_folder_cannot_be_the_input(tmp_path, tiny_classifier):
    with pytest.raises(ValueError, match="input folder"):
        run_predict(tmp_path, tmp_path, Classifier(tiny_classifier), None, progress=False)


def test_sigkill_then_rerun_completes_without_loss_or_duplicates(tmp_path, tiny_classifier):
    src = tmp_path / "scans"
    src.mkdir()
    n = 600
    for i in range(n):
        cv2.imwrite(str(src / f"s{i:04d}.png"), make_phantom(CLASSES[i % 4], 64, i)[0])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipeline", "predict", "--input", str(src), "--out", str(out), "--cls",
           str(tiny_classifier), "--seg", "none", "--batch-size", "2", "--workers", "1", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    csv_path = out / "predictions.csv"
    deadline = time.time() + 120
    while time.time() < deadline:
        if csv_path.exists() and csv_path.read_bytes().count(b"\n") > 40:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = read_rows(csv_path)
    assert 0 < len(partial) < n, "the first run should have been killed part-way"
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(csv_path)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == n
    assert set(paths) == {f"s{i:04d}.png" for i in range(n)}
    assert all(r["status"] == "ok" for r in rows)
    # The rows written before the kill are kept as they were.
    assert rows[: len(partial)] == partial


def test_results_csv_refuses_a_foreign_file(tmp_path):
    path = tmp_path / "predictions.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="columns"):
        ResultsCSV(path, COLUMNS)


def test_gradcam_maps_are_written_for_readable_inputs_only(tmp_path, tiny_classifier):
    src = tmp_path / "scans"
    expected = make_mixed_folder(src)
    out = tmp_path / "out"
    run_predict(src, out, Classifier(tiny_classifier), None, gradcam=True, progress=False)
    written = sorted(p.relative_to(out / "gradcam").as_posix() for p in (out / "gradcam").rglob("*.png"))
    want = sorted(k.replace("#z=", "_z") + ".png" for k, status in expected.items() if status == "ok")
    assert written == want
    panel = cv2.imread(str(out / "gradcam" / "study1" / "glioma.png.png"))
    assert panel.shape[0] >= 256 and panel.shape[2] == 3
    assert panel.std() > 5  # not a blank image: the input with the heat map over it


def test_resuming_with_another_model_is_refused(tmp_path, tiny_classifier):
    src = tmp_path / "scans"
    src.mkdir()
    write_png(src / "a.png", make_phantom("glioma", 64, 0)[0])
    out = tmp_path / "out"
    clf = Classifier(tiny_classifier)
    run_predict(src, out, clf, None, progress=False)
    run_predict(src, out, clf, None, progress=False)  # same settings: resumes (nothing to do)
    clf.fingerprint = {"weights_sha256": "another checkpoint"}
    with pytest.raises(ValueError, match="other settings.*another --out"):
        run_predict(src, out, clf, None, progress=False)
    assert len(read_rows(out / "predictions.csv")) == 1


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_savez_atomic_two_writers_of_one_cache_do_not_collide(tmp_path):
    # two trainings started side by side on one dataset build the same cache at the same moment
    dest = tmp_path / "unet_cache_512.npz"
    arrays = [np.zeros(300_000, np.uint8), np.full(300_000, 7, np.uint8)]
    barrier = threading.Barrier(2)
    errors = []

    def writer(array):
        for _ in range(15):
            barrier.wait()
            try:
                savez_atomic(dest, images=array)
            except Exception as exc:  # noqa: BLE001 - the test reports any failure of either writer
                errors.append(exc)

    threads = [threading.Thread(target=writer, args=(a,)) for a in arrays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    images = np.load(dest)["images"]
    assert images.shape == (300_000,) and len(np.unique(images)) == 1 and images[0] in (0, 7)
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]
    assert dest.stat().st_mode & 0o777 == 0o666 & ~_umask()  # as any new file, not mkstemp's 0600


def test_savez_atomic_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    dest = tmp_path / "cache.npz"
    savez_atomic(dest, images=np.arange(5))

    def disk_full(fh, **arrays):
        fh.write(b"PK partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space"):
        savez_atomic(dest, images=np.arange(9))
    monkeypatch.undo()
    assert np.load(dest)["images"].tolist() == list(range(5))
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]


def test_a_private_umask_keeps_caches_private(tmp_path):
    import subprocess
    import sys

    # the umask is read once, at import: a fresh process with 077, as a user keeping scans private would run
    code = ("import numpy as np; from pipeline.folders import savez_atomic; "
            f"savez_atomic(__import__('pathlib').Path({str(tmp_path / 'c.npz')!r}), a=np.zeros(3))")
    subprocess.run([sys.executable, "-c", f"import os; os.umask(0o077); exec({code!r})"], check=True)
    assert (tmp_path / "c.npz").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("size, side", [(32, 256), (192, 384), (256, 256), (300, 300)])
def test_gradcam_picture_is_at_least_256_px(tmp_path, tiny_classifier, size, side):
    from pipeline.batch import _write_gradcam

    x = (np.random.default_rng(0).random((size, size)) * 255).astype(np.uint8)
    _write_gradcam(tmp_path / "cam.png", Classifier(tiny_classifier), x, target=0)
    assert cv2.imread(str(tmp_path / "cam.png")).shape[:2] == (side, side)
