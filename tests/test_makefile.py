"""The Makefile's staleness rules, read with `make -n` (nothing is run)."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _dry_run(*args: str) -> str:
    done = subprocess.run(["make", "-n", "-C", str(REPO), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _finished_segment_folder(out: Path, ckpt: Path, sha: str) -> None:
    for part in ("Training", "Testing"):
        folder = out / "segment" / part
        folder.mkdir(parents=True)
        (folder / "segments.csv.settings.json").write_text(json.dumps({"segmenter": {"weights_sha256": sha}}))
        (folder / ".done").touch()  # newer than the checkpoint: dates alone say "up to date"


@pytest.mark.parametrize("same", [True, False])
def test_segment_is_redone_when_its_record_names_another_segmenter(tmp_path, same):
    ckpt = tmp_path / "seg.pt"
    ckpt.write_bytes(b"a segmenter")
    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest() if same else "0" * 64
    _finished_segment_folder(tmp_path / "runs", ckpt, sha)
    out = _dry_run("segment", f"OUT={tmp_path / 'runs'}", f"SEG_CKPT={ckpt}", "DATA_READY=", f"STAMP={ckpt}")
    assert ("pipeline segment --input" in out) is not same


def test_demo_keeps_what_the_command_line_sets(tmp_path):
    out = _dry_run("demo", f"DEMO={tmp_path}", "MODES=full", "SIZE=32", "CLS_EPOCHS=2")
    assert "MODES=\"full\"" in out and "SIZE=32" in out and "CLS_EPOCHS=2" in out
    assert f"CLS_WEIGHTS={tmp_path}/cls/smallcnn_full_32/best.pt" in out
    default = _dry_run("demo", f"DEMO={tmp_path}")
    assert "MODES=\"full crop masked\"" in default and f"{tmp_path}/cls/smallcnn_crop_64/best.pt" in default


def test_every_classifier_training_takes_cls_args(tmp_path):
    # the runs before session 24 were trained with the flip shear: CLS_ARGS=--flip-shear must reach each of them
    out = _dry_run("cls-train", "reference", "loso", "MODES=full", "LOSO_MODES=full", "CLS_ARGS=--flip-shear",
                   f"OUT={tmp_path}", "DATA_READY=", "STAMP=Makefile")
    commands = out.replace("\\\n", " ").split("\n")
    trainings = [c for c in commands if "pipeline train-cls" in c]
    assert {c.split("--out ")[1].split()[0] for c in trainings} == {
        f"{tmp_path}/cls/lite0_full_128", f"{tmp_path}/ref/cls/smallcnn_full_128", f"{tmp_path}/loso/cls/lite0_full_128"}
    assert all(c.split()[-1] == "--flip-shear" for c in trainings)


def test_seg_eval_starts_its_prediction_folders_afresh(tmp_path):
    # a second seg-eval (another SEG_CKPT, as a card asks) reused test_pred, which segment refuses to mix
    ckpt = tmp_path / "seg.pt"
    ckpt.write_bytes(b"a segmenter")
    runs = tmp_path / "runs"
    (runs / "seg" / "data").mkdir(parents=True)
    (runs / "seg" / "data" / "data.yaml").write_text("path: x\n")
    _finished_segment_folder(runs, ckpt, hashlib.sha256(ckpt.read_bytes()).hexdigest())
    out = _dry_run("seg-eval", f"OUT={runs}", f"SEG_CKPT={ckpt}", "DATA_READY=", f"STAMP={ckpt}")
    lines = out.splitlines()
    clear = next(i for i, line in enumerate(lines) if line.startswith(f"rm -rf {runs}/seg/test_pred"))
    assert clear < next(i for i, line in enumerate(lines) if "pipeline segment --input" in line)


def _make_predict(tmp_path, cls: str) -> subprocess.CompletedProcess:
    stamp = tmp_path / "stamp"
    stamp.touch()
    # PY=true: the recipe's own shell runs, the pipeline does not (its predictions are the test's to write)
    return subprocess.run(["make", "-s", "-C", str(REPO), "predict", f"INPUT={tmp_path / 'in'}",
                           f"PREDICT_OUT={tmp_path / 'out'}", "PY=true", f"STAMP={stamp}", f"CLS_WEIGHTS={cls}",
                           "SEG_WEIGHTS=auto"], capture_output=True, text=True, timeout=120)


def test_make_predict_keeps_every_earlier_run_and_leaves_a_running_one_alone(tmp_path):
    import fcntl

    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    for cls, rows in (("model-a", "a\n"), ("model-b", "b\n"), ("model-a", "a again\n")):
        done = _make_predict(tmp_path, cls)
        assert done.returncode == 0, done.stderr
        (out / "predictions.csv").write_text(rows)  # what that run would have written
    kept = sorted(p.read_text() for p in (out / "previous").glob("*/predictions.csv"))
    assert kept == ["a\n", "b\n"]  # the second change did not overwrite the first's
    with open(out / ".predictions.csv.lock", "a") as lock:  # a predict still writing there
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = _make_predict(tmp_path, "model-b")
    assert done.returncode != 0 and "another predict is writing" in done.stderr
    assert (out / "predictions.csv").read_text() == "a again\n"
