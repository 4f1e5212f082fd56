"""bench/bench.py planning and ratio logic (no timing is asserted anywhere)."""
from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "bench" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _args(mode, seg="seg-unet-cascade"):
    return Namespace(cls="c.pt", seg=seg, cls_mode=mode, quick=False, predict_backend="onnx")


def _predict_jobs(mode, seg="seg-unet-cascade"):
    jobs = bench.plan(_args(mode, seg), ["a.jpg"], Path("s"), Path("a"), Path("x"))
    return [j for j in jobs if j["stage"] == "predict"]


def test_full_classifier_is_measured_with_and_without_segmentation():
    sample = [j for j in _predict_jobs("full") if "scale" not in j]
    assert sorted(str(j["seg"]) for j in sample) == sorted(["None", "None", "seg-unet-cascade", "seg-unet-cascade"])


def test_crop_classifier_never_runs_without_its_segmenter():
    jobs = _predict_jobs("crop")
    assert jobs and all(j["seg"] == "seg-unet-cascade" and j["mode"] == "crop" for j in jobs)
    assert {j.get("scale") for j in jobs} == {None, "all", "10x"}


def test_ratios_pick_the_fastest_cpu_rows_against_the_peer():
    rows = [{"stage": "peer", "images_per_s": 5.0, "accuracy": 0.9},
            {"stage": "predict", "seg": "s", "images_per_s": 40.0, "accuracy": 0.98, "backend": "torch"},
            {"stage": "predict", "seg": "s", "images_per_s": 60.0, "accuracy": 0.98, "backend": "onnx"},
            {"stage": "predict", "seg": None, "images_per_s": 90.0, "backend": "onnx"},
            {"stage": "predict", "seg": "s", "images_per_s": 70.0, "scale": "all"},
            {"stage": "classify", "images_per_s": 200.0},
            {"stage": "classify", "images_per_s": 900.0, "device": "cuda"}]
    r = bench.ratios(rows)
    assert r["predict_vs_peer"] == pytest.approx(12.0) and r["predict_setting"]["backend"] == "onnx"
    assert r["classify_vs_peer"] == pytest.approx(40.0)
