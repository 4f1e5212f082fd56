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


@pytest.mark.parametrize("order", [("val", "test"), ("test", "val")])
def test_evaluate_cls_refuses_two_caches_of_one_view(tmp_path, order):
    # scoring one cache against the other's labels gave silently wrong metrics (or an IndexError)
    from pipeline.evaluate_cls import run

    ckpt = _checkpoint(tmp_path / "w.pt")
    sizes = {"val": 12, "test": 8}
    data = [str(_cache(tmp_path / f"{name}.npz", tmp_path, n=sizes[name])) for name in order]
    with pytest.raises(ValueError, match=rf"{order[0]}.npz and .*{order[1]}.npz are both mode=full size=32"):
        run(_args(cls=str(ckpt), data=data, out=str(tmp_path / "o")))
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_predict_cache_refuses_two_caches_of_one_view():
    from pipeline.evaluate_cls import predict_cache

    def cache(mode):
        return {"images": np.zeros((4, 32, 32), np.uint8), "labels": np.arange(4), "mode": mode, "size": 32,
                "margin": 0.25}

    with pytest.raises(ValueError, match="caches 2 and 3 are both mode=crop size=32"):
        predict_cache(None, [cache("full"), cache("crop"), cache("crop")])


def test_evaluate_cls_warns_when_the_crops_come_from_another_segmenter(tmp_path, capsys):
    from pipeline.evaluate_cls import run

    torch.manual_seed(0)
    meta = {"model": "smallcnn", "mode": "crop", "size": 32, "classes": list(CLASSES), "margin": 0.25,
            "segmenter_sha256": "a" * 64}
    torch.save({"state_dict": SmallCNN().state_dict(), "meta": meta}, tmp_path / "w.pt")
    for made_by, warned in (("a" * 64, False), ("b" * 64, True)):
        cache = dict(np.load(_cache(tmp_path / "t.npz", tmp_path, n=8, mode="crop")))
        np.savez(tmp_path / "t.npz", **cache, margin=np.array(0.25), segmenter_sha256=np.array(made_by))
        run(_args(cls=str(tmp_path / "w.pt"), data=str(tmp_path / "t.npz"), out=str(tmp_path / "o")))
        assert ("made from the masks of segmenter bbbbbbbbbbbbbbbb" in capsys.readouterr().err) is warned


def test_crop_refuses_one_masks_folder_for_training_and_testing_and_a_split_without_validation(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["crop", "--split", "s.csv", "--root", "Training", "--input", "Testing", "--masks", "m",
                 "--mode", "crop", "--out", str(tmp_path / "c")]) != 0
    assert "run crop once for each" in capsys.readouterr().err and not (tmp_path / "c").exists()
    (tmp_path / "Training" / "glioma").mkdir(parents=True)
    (tmp_path / "s.csv").write_text("path,label,split\nglioma/a.png,glioma,train\n")
    assert main(["crop", "--split", str(tmp_path / "s.csv"), "--root", str(tmp_path / "Training"),
                 "--mode", "full", "--out", str(tmp_path / "c")]) != 0
    assert "no val rows" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_evaluate_cls_prints_subsets_under_their_own_key(tmp_path, capsys):
    from pipeline.evaluate_cls import run

    ckpt = _checkpoint(tmp_path / "w.pt")
    cache = _cache(tmp_path / "testing.npz", tmp_path, n=12)
    listed = tmp_path / "one.txt"
    listed.write_text(str(tmp_path / "Testing" / "glioma" / "Te-000.jpg") + "\n")
    run(_args(cls=str(ckpt), data=str(cache), out=str(tmp_path / "o"), subset=[f"all={listed}"]))
    printed = json.loads(capsys.readouterr().out)
    assert printed["all"]["n"] == 12 and printed["subsets"]["all"]["n"] == 1


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


# --- bugs found in review of the metrics/report code; each test failed before its fix ------------

def test_report_prints_the_interval_level_of_alpha(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from pipeline.evaluate_cls import metrics_with_ci
    from pipeline.report import build_report, plot_forest

    _, _, _, runs = _runs(tmp_path)
    build_report({k: Path(v) for k, v in runs.items()}, tmp_path / "r90", n_boot=50, alpha=0.1)
    md = (tmp_path / "r90" / "report.md").read_text()
    assert "90% percentile bootstrap" in md and "with 90% CI" in md and "95%" not in md
    assert json.loads((tmp_path / "r90" / "compare.json").read_text())["results"]["yolo"]["all"]["ci_level"] == 0.9
    # the forest plot's axis says it too
    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    y = np.arange(40) % 4
    plot_forest({"x": {"all": metrics_with_ci(y, y, n_boot=20, alpha=0.01)}}, tmp_path / "f.png", alpha=0.01)
    assert closed[0].axes[0].get_xlabel() == "accuracy (99% bootstrap CI)"
    monkeypatch.undo()
    plt.close(closed[0])


def test_confusion_pngs_of_runs_with_one_safe_name_do_not_overwrite_each_other(tmp_path):
    from pipeline import report

    _, _, _, runs = _runs(tmp_path)
    summary = report.build_report({"a full": Path(runs["lite0-full"]), "a_full": Path(runs["lite0-masked"])},
                                  tmp_path / "r", n_boot=20)
    assert summary["results"]["a full"]["all"]["confusion"] != summary["results"]["a_full"]["all"]["confusion"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "![Confusion matrix: a full](confusion_a_full.png)" in md
    assert "![Confusion matrix: a_full](confusion_a_full-2.png)" in md
    pngs = [(tmp_path / "r" / f"confusion_{s}.png").read_bytes() for s in ("a_full", "a_full-2")]
    assert pngs[0] != pngs[1]
    # names that collide with nothing keep today's file names; a collision is found case-blind
    assert report._unique_stems(["lite0-full", "lite0 masked"]) == {"lite0-full": "lite0-full",
                                                                   "lite0 masked": "lite0_masked"}
    assert report._unique_stems(["a full", "a_full", "A_FULL", "a_full-2"]) == {
        "a full": "a_full", "a_full": "a_full-2", "A_FULL": "A_FULL-3", "a_full-2": "a_full-2-2"}


def test_rows_not_scored_are_counted_in_metrics_and_report(tmp_path):
    from pipeline.evaluate_cls import read_predictions, run
    from pipeline.report import build_report

    testing = tmp_path / "Testing"
    rows = [f"{testing / CLASSES[i % 4] / f'{i}.jpg'},{CLASSES[i % 4]},0.9,ok," for i in range(12)]
    rows[3] = f"{testing / 'pituitary' / '3.jpg'},,,error,empty file (0 bytes)"
    rows[7] = f"{testing / 'pituitary' / '7.jpg'},,,error,not an image"
    (tmp_path / "predict.csv").write_text("path,label,confidence,status,error\n" + "\n".join(rows) + "\n")
    pred = read_predictions(tmp_path / "predict.csv")
    assert len(pred["paths"]) == 10 and pred["skipped"] == [str(testing / "pituitary" / f"{i}.jpg") for i in (3, 7)]

    run(_args(predictions=str(tmp_path / "predict.csv"), out=str(tmp_path / "ev")))
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["n_skipped"] == 2 and m["all"]["n"] == 10 and m["all"]["accuracy"] == 1.0
    # the re-written CSV keeps them, so compare on the evaluate-cls folder still counts them
    assert len(read_predictions(tmp_path / "ev")["skipped"]) == 2

    (tmp_path / "other").mkdir()
    _, _, _, runs = _runs(tmp_path / "other")
    summary = build_report({"ev": tmp_path / "ev", "yolo": Path(runs["yolo"])}, tmp_path / "r", n_boot=20)
    assert summary["results"]["ev"]["n_skipped"] == 2 and summary["results"]["yolo"]["n_skipped"] == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "ev: 2 rows not scored (read errors), excluded." in md and "yolo: 0" not in md
    assert json.loads((tmp_path / "r" / "compare.json").read_text())["results"]["ev"]["n_skipped"] == 2


def test_a_predict_csv_pairs_with_a_run_of_absolute_paths(tmp_path):
    from pipeline.report import build_report

    y, full, masked, runs = _runs(tmp_path)
    # predict writes <class>/<file> relative to its input and has no `true` column
    rows = [f"{CLASSES[k]}/Te-{i:04d}.jpg,{CLASSES[p]},0.9,ok," for i, (k, p) in enumerate(zip(y, masked))]
    (tmp_path / "predict.csv").write_text("path,label,confidence,status,error\n" + "\n".join(rows) + "\n")
    summary = build_report({"lite0-full": Path(runs["lite0-full"]), "lite0-masked": tmp_path / "predict.csv"},
                           tmp_path / "r", n_boot=20)
    t = summary["pairs"][0]["all"]
    ref = mcnemar(y, masked, full)
    assert (t["n"], t["b"], t["c"]) == (200, ref["b"], ref["c"])


def test_runs_that_share_no_images_get_no_test(tmp_path):
    from pipeline.report import build_report

    y, full, _, runs = _runs(tmp_path)
    other = [str(tmp_path / "Elsewhere" / CLASSES[k] / f"x-{i}.jpg") for i, k in enumerate(y)]
    _write_external(tmp_path / "other.csv", other, y, full)
    summary = build_report({"m-full": Path(runs["lite0-full"]), "m-crop": tmp_path / "other.csv"}, tmp_path / "r",
                           clean_path=str(tmp_path / "clean_test.txt"), n_boot=20)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "McNemar ALL: b =" not in md and "McNemar CLEAN: b =" not in md and "p = 1.000" not in md
    assert "McNemar ALL: not run. ALL: m-crop and m-full share no images" in md
    assert "McNemar CLEAN: not run. CLEAN: m-crop and m-full share no CLEAN images" in md
    t = json.loads((tmp_path / "r" / "compare.json").read_text())["pairs"][0]["all"]
    assert t["n"] == 0 and t["p_value"] is None and summary["pairs"][0]["clean"]["n"] == 0


def test_p_value_is_never_printed_across_alpha():
    from pipeline.report import _fmt_p, describe_pair

    assert _fmt_p(0.04995) == "p = 0.04995" and _fmt_p(0.0499999) == "p = 0.0499999"
    assert _fmt_p(0.0501) == "p = 0.050" and _fmt_p(0.05) == "p = 0.050"  # not below alpha: "not significant"
    assert _fmt_p(0.73) == "p = 0.730" and _fmt_p(0.0004) == "p < 0.001" and _fmt_p(0.0) == "p < 0.001"
    assert _fmt_p(0.0104, alpha=0.01) == "p = 0.010" and _fmt_p(0.00995, alpha=0.01) == "p = 0.00995"
    assert _fmt_p(0.0003, alpha=0.0005) == "p = 0.0003"  # a Bonferroni-sized alpha: not "p < 0.001"
    sig = describe_pair("A", "B", {"n": 400, "acc_a": .9, "acc_b": .86, "b": 30, "c": 14, "p_value": 0.04995,
                                   "method": "chi-square, continuity-corrected"}, "ALL")
    assert "p = 0.04995" in sig and "unlikely to be chance" in sig


def test_markdown_escapes_names_and_states_n_per_run(tmp_path):
    import re

    from pipeline.report import build_report

    y, full, masked, runs = _runs(tmp_path)
    paths = [str(tmp_path / "Testing" / CLASSES[k] / f"Te-{i:04d}.jpg") for i, k in enumerate(y)]
    _write_external(tmp_path / "short.csv", paths[:190], y[:190], masked[:190])
    build_report({"a|b": Path(runs["lite0-full"]), "<c>": tmp_path / "short.csv"}, tmp_path / "r",
                 clean_path=str(tmp_path / "clean_test.txt"), n_boot=20)
    md = (tmp_path / "r" / "report.md").read_text()
    tables = [b.splitlines() for b in md.split("\n\n") if b.startswith("| ")]
    assert tables
    for lines in tables:  # every row of a table has as many cell borders as its header
        assert len({len(re.findall(r"(?<!\\)\|", line)) for line in lines}) == 1, lines
    assert "| a\\|b |" in md and "| &lt;c&gt; |" in md and "## &lt;c&gt;" in md
    # n of each run where they differ, not the first run's for all
    n_clean_short = sum(1 for i in range(190) if (i % 3 == 0 and y[i] != 2) or i == 2)
    assert "a|b: n = 200 (" in md and "<c>: n = 190 (" in md
    assert "a|b: 51 matched here, by resolved path" in md and f"<c>: {n_clean_short} matched here" in md
    # a precision row counts the images predicted as the class, not its true images
    k = CLASSES.index("glioma")
    assert f"| precision glioma (predicted n={int(np.sum(full == k))}/" in md
    assert f"| recall glioma (n={int(np.sum(y == k))}/" in md


def test_compare_refuses_an_ensemble_for_gradcam_by_name_before_scoring(tmp_path):
    from pipeline import report

    ckpts = [str(_checkpoint(tmp_path / f"m{seed}.pt", seed=seed)) for seed in (0, 1)]
    ensemble = tmp_path / "pair.json"
    ensemble.write_text(json.dumps({"members": ckpts}))
    with pytest.raises(ValueError, match="an ensemble .*Grad-CAM explains one network"):
        report.build_report({"x": tmp_path / "no-such-run"}, tmp_path / "out", gradcam_cls=str(ensemble),
                            gradcam_data=str(tmp_path / "cache.npz"), n_boot=10)
