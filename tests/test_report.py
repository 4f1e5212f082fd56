import csv
import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import CLASSES
from pipeline.classify.models import SmallCNN
from pipeline.classify.predict import Classifier
from pipeline.evaluate import classification_metrics, mcnemar


def _checkpoint(path: Path, mode="full", size=32, seed=0) -> Path:
    torch.manual_seed(seed)
    model = SmallCNN()
    meta = {"model": "smallcnn", "mode": mode, "size": size, "classes": list(CLASSES)}
    torch.save({"state_dict": model.state_dict(), "meta": meta}, path)
    return path


def _cache(path: Path, root: Path, n=40, mode="full", size=32, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    paths = [str(root / "Testing" / CLASSES[k] / f"Te-{i:03d}.jpg") for i, k in enumerate(labels)]
    np.savez(path, images=rng.integers(0, 256, (n, size, size), dtype=np.uint8), labels=labels.astype(np.int64),
             paths=np.array(paths), found=np.ones(n, bool), mode=np.array(mode), size=np.array(size))
    return path


def _args(**kw):
    base = dict(cls=None, data=None, predictions=None, clean=None, out=None, batch_size=16, n_boot=200,
                alpha=0.05, device="cpu", seed=0)
    base.update(kw)
    return Namespace(**base)


def _rows(csv_path):
    with open(csv_path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_argument_parsers_build():
    import argparse

    from pipeline import evaluate_cls, report

    for mod, argv in ((evaluate_cls, ["--cls", "w.pt", "--data", "c.npz", "--out", "o"]),
                      (report, ["--runs", "a-full=x", "a-crop=y", "--out", "o", "--pairs", "a-crop:a-full"])):
        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        args = p.parse_args(argv)
        assert args.out == "o"


def test_evaluate_cls_predictions_match_argmax_and_clean_subset(tmp_path):
    from pipeline.evaluate_cls import run

    ckpt = _checkpoint(tmp_path / "w.pt")
    cache = _cache(tmp_path / "testing.npz", tmp_path)
    data = np.load(cache)
    clean_paths = [p for i, p in enumerate(data["paths"]) if i % 3 == 0]  # 14 of 40
    (tmp_path / "clean_test.txt").write_text("\n".join(clean_paths) + "\n")
    out = tmp_path / "eval"
    assert run(_args(cls=str(ckpt), data=str(cache), clean=str(tmp_path / "clean_test.txt"), out=str(out))) == 0

    rows = _rows(out / "predictions.csv")
    assert list(rows[0]) == ["path", "true", "pred", "confidence", *[f"p_{c}" for c in CLASSES], "found"]
    probs = Classifier(ckpt).predict_proba(data["images"])
    assert [r["pred"] for r in rows] == [CLASSES[k] for k in probs.argmax(1)]
    assert [r["true"] for r in rows] == [CLASSES[k] for k in data["labels"]]
    assert np.allclose([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows], probs, atol=1e-5)
    assert np.allclose([float(r["confidence"]) for r in rows], probs.max(1), atol=1e-5)

    m = json.loads((out / "metrics.json").read_text())
    pred = probs.argmax(1)
    assert m["all"]["n"] == 40 and m["all"]["accuracy"] == pytest.approx(np.mean(pred == data["labels"]))
    lo, hi = m["all"]["ci"]["accuracy"]
    assert lo <= m["all"]["accuracy"] <= hi
    # clean metrics count only the clean paths
    idx = np.arange(40) % 3 == 0
    expected = classification_metrics(data["labels"][idx], pred[idx])
    assert m["clean"]["n"] == 14 and m["clean"]["confusion"] == expected["confusion"]
    assert m["clean"]["accuracy"] == pytest.approx(expected["accuracy"])
    assert m["source"]["model"] == "smallcnn" and m["source"]["mode"] == "full"


def test_evaluate_cls_rejects_mismatched_cache(tmp_path):
    from pipeline.evaluate_cls import run

    ckpt = _checkpoint(tmp_path / "w.pt", mode="masked", size=32)
    cache = _cache(tmp_path / "testing.npz", tmp_path, mode="full", size=32)
    with pytest.raises(ValueError, match="mode=full.*mode=masked"):
        run(_args(cls=str(ckpt), data=str(cache), out=str(tmp_path / "o")))


def _write_external(path: Path, paths, y, pred):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "true", "pred"])
        for p, t, k in zip(paths, y, pred):
            w.writerow([p, CLASSES[t], CLASSES[k]])


def test_evaluate_cls_accepts_external_predictions(tmp_path):
    from pipeline.evaluate_cls import read_predictions, run

    paths = [str(tmp_path / "Testing" / CLASSES[i % 4] / f"{i}.jpg") for i in range(20)]
    y = np.arange(20) % 4
    pred = y.copy()
    pred[:5] = (pred[:5] + 1) % 4
    _write_external(tmp_path / "yolo.csv", paths, y, pred)
    run(_args(predictions=str(tmp_path / "yolo.csv"), out=str(tmp_path / "o")))
    back = read_predictions(tmp_path / "o")
    assert back["paths"] == paths and (back["y_pred"] == pred).all()
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["all"]["accuracy"] == pytest.approx(0.75)


def _runs(tmp_path, n=200):
    """Two runs of one model (full, masked) and one other, on the same paths; clean = every other image."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 4
    paths = [str(tmp_path / "Testing" / CLASSES[k] / f"Te-{i:04d}.jpg") for i, k in enumerate(y)]
    full = np.where(rng.random(n) < 0.80, y, (y + 1) % 4)
    masked = np.where(rng.random(n) < 0.92, y, (y + 2) % 4)
    runs = {}
    for name, pred in (("lite0-full", full), ("lite0-masked", masked), ("yolo", masked)):
        d = tmp_path / name
        d.mkdir()
        _write_external(d / "predictions.csv", paths, y, pred)
        runs[name] = str(d)
    keep = [(i % 3 == 0 and y[i] != 2) or i == 2 for i in range(n)]  # 50 tumor images + one notumor
    clean = [p for p, k in zip(paths, keep) if k]
    (tmp_path / "clean_test.txt").write_text("\n".join(clean) + "\n")
    return y, full, masked, runs


def test_compare_writes_report_with_names_n_and_mcnemar(tmp_path):
    from pipeline.report import run

    y, full, masked, runs = _runs(tmp_path)
    out = tmp_path / "report"
    args = Namespace(runs=[f"{k}={v}" for k, v in runs.items()], clean=str(tmp_path / "clean_test.txt"),
                     out=str(out), pairs=None, n_boot=200, alpha=0.05, gradcam_cls=None, gradcam_data=None,
                     gradcam_n=8, title=None, device="cpu", seed=0)
    assert run(args) == 0
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for text in (md, page):
        for name in runs:
            assert name in text
        assert "n=200" in text and "n=51" in text  # ALL and CLEAN sizes (50 tumor + 1 notumor)
        assert "few notumor" in text
    assert "data:image/png;base64," in page and "src='confusion_" not in page  # self-contained
    for f in ("accuracy_ci.png", "confusion_lite0-full.png", "confusion_lite0-masked.png", "compare.json"):
        assert (out / f).is_file()
    # auto-paired lite0-masked vs lite0-full, with the test's own numbers in the report
    ref = mcnemar(y, masked, full)
    summary = json.loads((out / "compare.json").read_text())
    assert [(t["a"], t["b"]) for t in summary["pairs"]] == [("lite0-masked", "lite0-full")]
    t = summary["pairs"][0]["all"]
    assert (t["b"], t["c"]) == (ref["b"], ref["c"]) and t["p_value"] == pytest.approx(ref["p_value"])
    assert f"McNemar ALL: b = {ref['b']}, c = {ref['c']}" in md
    assert "What this shows: ALL (n=200): lite0-masked" in md
    idx = np.array([(i % 3 == 0 and y[i] != 2) or i == 2 for i in range(200)])
    ref_clean = mcnemar(y[idx], masked[idx], full[idx])
    c = summary["pairs"][0]["clean"]
    assert (c["b"], c["c"], c["n"]) == (ref_clean["b"], ref_clean["c"], 51)
    assert summary["results"]["yolo"]["clean"]["n"] == 51


def test_compare_explicit_pairs_and_errors(tmp_path):
    from pipeline.report import auto_pairs, parse_pairs, parse_runs

    assert auto_pairs(["lite0-full", "lite0-masked", "lite0-crop", "cnn_full", "cnn_masked", "yolo"]) == [
        ("lite0-masked", "lite0-full"), ("lite0-crop", "lite0-full"), ("lite0-masked", "lite0-crop"),
        ("cnn_masked", "cnn_full")]
    assert auto_pairs(["lite0-full", "lite0-crop", "lite0-full+crop", "lite0-full+masked", "x-full+full"]) == [
        ("lite0-crop", "lite0-full"), ("lite0-full+crop", "lite0-full"), ("lite0-full+crop", "lite0-crop"),
        ("lite0-full+masked", "lite0-full")]
    assert parse_pairs(["yolo:lite0-full"], ["yolo", "lite0-full"]) == [("yolo", "lite0-full")]
    with pytest.raises(ValueError, match="unknown run"):
        parse_pairs(["a:b"], ["a"])
    with pytest.raises(ValueError, match="NAME=DIR"):
        parse_runs(["nodir"])


def test_describe_pair_does_not_overclaim():
    from pipeline.report import describe_pair

    ns = describe_pair("A", "B", {"n": 100, "acc_a": .9, "acc_b": .88, "b": 5, "c": 3, "p_value": 0.73,
                                  "method": "exact binomial"}, "ALL")
    assert "Not significant" in ns and "+2.0 points" in ns and "p = 0.730" in ns
    sig = describe_pair("A", "B", {"n": 100, "acc_a": .8, "acc_b": .95, "b": 2, "c": 17, "p_value": 0.0007,
                                   "method": "exact binomial"}, "CLEAN")
    assert "p < 0.001" in sig
    assert "B made fewer errors here" in sig and "other data or seeds may differ" in sig


def test_evaluate_then_compare_with_explicit_pair_and_gradcam(tmp_path):
    from pipeline import evaluate_cls, report

    cache = _cache(tmp_path / "testing.npz", tmp_path, n=24)
    for name, seed in (("cnnA", 0), ("cnnB", 1)):
        ckpt = _checkpoint(tmp_path / f"{name}.pt", seed=seed)
        evaluate_cls.run(_args(cls=str(ckpt), data=str(cache), out=str(tmp_path / name)))
    out = tmp_path / "cmp"
    args = Namespace(runs=[f"cnnA={tmp_path / 'cnnA'}", f"cnnB={tmp_path / 'cnnB' / 'predictions.csv'}"], clean=None,
                     out=str(out), pairs=["cnnA:cnnB"], n_boot=100, alpha=0.05, gradcam_cls=str(tmp_path / "cnnA.pt"),
                     gradcam_data=str(cache), gradcam_n=4, title="t", device="cpu", seed=0)
    report.run(args)
    md = (out / "report.md").read_text()
    assert "**cnnA vs cnnB**" in md and "McNemar ALL" in md and "McNemar CLEAN" not in md
    assert "No clean list was given" in md and "gradcam.png" in md and (out / "gradcam.png").is_file()
    assert md.count("data:image") == 0 and (out / "report.html").read_text().count("data:image/png;base64,") == 4


def test_compare_reports_tumor_found_on_a_subset(tmp_path):
    from pipeline.report import build_report
    from pipeline.evaluate_cls import parse_subsets

    y, full, masked, runs = _runs(tmp_path)
    paths = [str(tmp_path / "Testing" / CLASSES[k] / f"Te-{i:04d}.jpg") for i, k in enumerate(y)]
    held = [i for i in range(len(y)) if i < 40]
    (tmp_path / "held.txt").write_text("".join(paths[i] + "\n" for i in held))
    summary = build_report({k: Path(v) for k, v in runs.items()}, tmp_path / "report", n_boot=50,
                           subsets=parse_subsets([f"heldout={tmp_path / 'held.txt'}"]))
    k = CLASSES.index("notumor")
    sub = summary["results"]["lite0-full"]["subsets"]["heldout"]
    tumor = [i for i in held if y[i] != k]
    found = sum(full[i] != k for i in tumor)
    assert sub["n"] == 40
    assert sub["tumor_vs_none"]["tumor_found"] == pytest.approx(found / len(tumor))
    assert sub["accuracy"] == pytest.approx(np.mean(full[:40] == y[:40]))
    md = (tmp_path / "report" / "report.md").read_text()
    assert "tumor found heldout" in md and f"{100 * found / len(tumor):.1f}%" in md
