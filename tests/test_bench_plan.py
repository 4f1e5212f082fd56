"""bench/bench.py planning and ratio logic (no timing is asserted anywhere)."""
from __future__ import annotations

import importlib.util
import json
from argparse import Namespace
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "bench" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _args(mode, seg="seg-unet-cascade", devices="cpu"):
    return Namespace(cls="c.pt", seg=seg, cls_mode=mode, quick=False, predict_backend="onnx", devices=devices)


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


def test_cuda_plan_needs_a_gpu_and_measures_end_to_end_on_big_folders(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        bench.plan(_args("crop", devices="cuda"), ["a.jpg"], Path("s"), Path("a"), Path("x"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    jobs = bench.plan(_args("crop", devices="cuda"), ["a.jpg"], Path("s"), Path("a"), Path("x"))
    assert {j["device"] for j in jobs} == {"cuda"}
    e2e = [j for j in jobs if j["stage"] == "predict"]
    assert {j.get("scale") for j in e2e} == {None, "all", "10x"} and all(j["seg"] for j in e2e)


def test_cuda_summary_takes_the_largest_folder():
    rows = [{"stage": "predict", "device": "cuda", "images": 400, "images_per_s": 900.0, "accuracy": 0.98},
            {"stage": "predict", "device": "cuda", "images": 13110, "images_per_s": 1500.0, "accuracy": 0.97,
             "scale": "10x"},
            {"stage": "classify", "device": "cuda", "images": 400, "images_per_s": 9000.0}]
    r = bench.ratios(rows)
    assert r["cuda_predict_images"] == 13110 and r["cuda_predict_images_per_s"] == 1500.0
    assert r["predict_images_per_s"] is None  # CUDA rows never count as the CPU figure


def test_bench_rows_name_each_member_at_its_own_size(tmp_path):
    import torch

    from pipeline import CLASSES
    from pipeline.classify.models import create_model
    from pipeline.classify.predict import load_classifier

    paths = []
    for mode, size in (("full", 48), ("crop", 32)):
        meta = {"model": "smallcnn", "mode": mode, "size": size, "classes": list(CLASSES), "margin": 0.5}
        paths.append(tmp_path / f"{mode}.pt")
        torch.save({"state_dict": create_model("smallcnn").state_dict(), "meta": meta}, paths[-1])
    pair = bench.classifier_what(load_classifier(f"{paths[0]},{paths[1]}"))
    assert pair == "smallcnn, full 48 px + crop 32 px"
    assert bench.classifier_what(load_classifier(str(paths[1]))) == "smallcnn, crop 32 px"
    assert bench.describe({"stage": "classify"}, pair) == pair


@pytest.mark.parametrize("n, batch, want", [(400, 64, [16, 64]), (400, 1024, [400]), (128, 64, [64]), (0, 8, [])])
def test_warmup_meets_every_batch_shape_the_timed_loop_will(n, batch, want):
    assert bench.warmup_sizes(n, batch) == want
    seen = {min(batch, n - i) for i in range(0, n, batch)}
    assert seen == set(want)


@pytest.mark.parametrize("devices", ["cuda:0", "gpu", "cpu,tpu"])
def test_unknown_device_names_are_refused_not_dropped(devices):
    with pytest.raises(SystemExit, match="expected cpu, cuda"):
        bench.plan(_args("full", devices=devices), ["a.jpg"], Path("s"), Path("a"), Path("x"))


def test_a_report_written_before_the_last_measurement_says_it_is_partial(tmp_path):
    args = Namespace(seed=0, peer_python=None)
    info = {"cpu": "x", "cores": 2, "python": "3", "torch": "2", "onnxruntime": None, "cuda": None}
    row = {"stage": "classify", "what": "smallcnn", "images": 4, "images_per_s": 8.0, "peak_rss_mb": 100.0}
    md = bench.write_report(tmp_path, [row], info, ["a.jpg"], args, tmp_path, planned=3)
    report = json.loads((tmp_path / "bench.json").read_text())
    assert (report["measured"], report["planned"], report["complete"]) == (1, 3, False)
    assert "Partial: 1 of 3 measurements" in md and md == (tmp_path / "bench.md").read_text()
    assert report["results"][0]["stage"] == "peer" and report["results"][1] == row
    md = bench.write_report(tmp_path, [row] * 3, info, ["a.jpg"], args, tmp_path, planned=3)
    assert json.loads((tmp_path / "bench.json").read_text())["complete"] and "Partial" not in md


def test_the_report_is_written_when_every_classify_row_failed(tmp_path):
    measured = {"images": 8, "peak_rss_mb": 900.0}
    rows = [{"stage": "peer", "images_per_s": 5.0, "accuracy": 0.9, **measured},
            {"stage": "predict", "seg": "s", "images_per_s": 40.0, "accuracy": 0.98, "backend": "onnx", **measured},
            {"stage": "classify", "error": "timed out"}]
    args = Namespace(seed=0, peer_python="peer/python")
    md = bench.write_report(tmp_path, rows, bench.machine(), ["a.jpg"], args, Path("data"), planned=3)
    assert "`predict` end to end" in md and "classification alone" not in md
    assert (tmp_path / "bench.md").is_file()


def test_the_sample_size_must_split_evenly_over_the_four_classes():
    import argparse

    assert bench._per_class_sample("8") == 8
    for bad in ("3", "6", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench._per_class_sample(bad)


def _compare():
    spec = importlib.util.spec_from_file_location("cmp", Path(__file__).parents[1] / "bench" / "compare_predictions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _csv(path, rows):
    head = "path,label,confidence,p_glioma,p_meningioma,p_notumor,p_pituitary,found,x0,y0,x1,y1,mode,status,error\n"
    path.write_text(head + "".join(rows))
    return path


def test_compare_predictions_reports_errors_missing_rows_and_boxes(tmp_path, capsys):
    cmp = _compare()
    ok = "glioma/{},glioma,0.9,0.9,0.05,0.03,0.02,true,{},2,9,9,full+crop,ok,\n"
    a = _csv(tmp_path / "a.csv", [ok.format("x.jpg", 1), ok.format("y.jpg", 1), ok.format("z.jpg", 1)])
    b = _csv(tmp_path / "b.csv", [ok.format("x.jpg", 1), ok.format("y.jpg", 3),
                                  "glioma/z.jpg,,,,,,,,,,,,,error,unreadable\n"])
    assert cmp.main([str(a), str(b)]) == 0  # a measurement by default
    r = json.loads(capsys.readouterr().out)
    assert r["error_rows_b"] == ["glioma/z.jpg"] and r["box_differs"] == 1 and r["shared"] == 2
    assert cmp.main([str(a), str(b), "--strict"]) == 1
    capsys.readouterr()
    assert cmp.main([str(a), str(a), "--strict"]) == 0
    capsys.readouterr()
    empty = _csv(tmp_path / "e.csv", [])
    assert cmp.main([str(a), str(empty)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["max_abs_prob_diff"] is None and r["only_in_a"] == ["glioma/x.jpg", "glioma/y.jpg", "glioma/z.jpg"]
