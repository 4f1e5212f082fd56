"""Ensembles of classifiers that read different inputs (whole slice + stage-1 crop)."""
import csv
import json

import numpy as np
import pytest
import torch

from pipeline import CLASSES
from pipeline.batch import run_predict
from pipeline.classify.models import create_model
from pipeline.classify.predict import Classifier, ClassifierEnsemble, load_classifier
from pipeline.evaluate_cls import predict_cache
from pipeline.phantoms import make_phantom
from pipeline.roi import make_input, make_views

FULL32, CROP48 = ("full", 32, None), ("crop", 48, 0.25)  # (mode, size, margin) views of the two members
from pipeline.weights import WeightsError
from tests.fakes import BrightBlobSegmenter
from tests.scan_fixtures import write_png


def _tiny(path, mode, size, seed, margin=None, steps=0):
    """A smallcnn checkpoint; ``steps`` of training on phantoms make its output depend on the input
    (a random one gives near-uniform probabilities whatever it reads)."""
    torch.manual_seed(seed)
    meta = {"model": "smallcnn", "mode": mode, "size": size, "classes": list(CLASSES)}
    if margin is not None:
        meta["margin"] = margin
    model = create_model("smallcnn")
    if steps:
        from pipeline.classify.models import INPUT_MEAN, INPUT_STD

        rng = np.random.default_rng(seed)
        labels = np.arange(32) % len(CLASSES)
        x = torch.from_numpy(np.stack([make_phantom(CLASSES[k], size, rng)[0] for k in labels])).float()
        x, y = ((x - INPUT_MEAN) / INPUT_STD).unsqueeze(1), torch.from_numpy(labels)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    torch.save({"state_dict": model.eval().state_dict(), "meta": meta}, path)
    return path


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    d = tmp_path_factory.mktemp("ens")
    return _tiny(d / "full.pt", "full", 32, 1, steps=10), _tiny(d / "crop.pt", "crop", 48, 2, steps=10)


def _scans(n=6):
    return [make_phantom(label, size=96, rng=i)[0] for i, label in zip(range(n), ["glioma", "notumor"] * n)]


def test_ensemble_is_the_mean_of_members_each_on_its_own_view(members):
    full, crop = Classifier(members[0]), Classifier(members[1])
    ens = load_classifier(f"{members[0]},{members[1]}")
    assert isinstance(ens, ClassifierEnsemble)
    assert ens.mode == "full+crop" and ens.views == (FULL32, CROP48)
    images = _scans()
    masks = BrightBlobSegmenter().predict(images)
    views = {(m, s, g): np.stack([make_input(im, m, s, r.mask, margin=g or 0.25)[0] for im, r in zip(images, masks)])
             for m, s, g in ens.views}
    np.testing.assert_array_equal(make_views(images, [r.mask for r in masks], ens.views)[CROP48], views[CROP48])
    got = ens.predict_views(views)
    want = (full.predict_proba(views[FULL32]) + crop.predict_proba(views[CROP48])) / 2
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(got, full.predict_proba(views[FULL32]))  # the crop member counts
    with pytest.raises(ValueError, match="no input for"):
        ens.predict_views({FULL32: views[FULL32]})
    with pytest.raises(ValueError, match="predict_views"):
        ens.predict_proba(views[FULL32])


def test_ensemble_refuses_one_member_and_reads_each_crop_at_its_own_margin(tmp_path, members):
    with pytest.raises(WeightsError, match="at least two"):
        ClassifierEnsemble([Classifier(members[0])])
    wide = _tiny(tmp_path / "wide.pt", "crop", 48, 3, margin=0.5)
    # two crops of one slice at different margins are two inputs, each made from the same ROI
    both = load_classifier(f"{members[1]},{wide}")
    assert both.views == (CROP48, ("crop", 48, 0.5)) and both.meta["margins"] == [0.25, 0.5]
    images = [make_phantom(label, size=96, rng=i)[0] for i, label in enumerate(["meningioma", "pituitary", "notumor"])]
    masks = BrightBlobSegmenter().predict(images)
    found = [i for i, r in enumerate(masks) if r.found]
    assert found
    views = make_views(images, [r.mask for r in masks], both.views)
    assert not np.array_equal(views[CROP48][found[0]], views[("crop", 48, 0.5)][found[0]])  # a wider square
    wide_alone = Classifier(wide).predict_proba(np.stack([make_input(im, "crop", 48, r.mask, margin=0.5)[0]
                                                          for im, r in zip(images, masks)]))
    want = (Classifier(members[1]).predict_proba(views[CROP48]) + wide_alone) / 2
    np.testing.assert_allclose(both.predict_views(views), want, rtol=1e-6, atol=1e-7)
    # A whole-slice member reads no ROI: its margin does not count, and the crop's is the ensemble's.
    full_wide = load_classifier(f"{_tiny(tmp_path / 'full.pt', 'full', 32, 1, margin=0.25)},{wide}")
    assert full_wide.meta["margin"] == 0.5 and full_wide.views == (FULL32, ("crop", 48, 0.5))


def test_ensemble_file_from_the_manifest_or_a_path(tmp_path, monkeypatch, members):
    import shutil

    import pipeline.weights as W
    from pipeline.weights import sha256_file

    for p in members:
        shutil.copy(p, tmp_path / p.name)
    spec = tmp_path / "both.json"
    # a manifest name and a path relative to the file
    spec.write_text(json.dumps({"members": ["m-full", "crop.pt"], "segmenter": "seg-x"}))
    entries = [{"name": "m-full", "file": "full.pt", "sha256": sha256_file(members[0]), "kind": "classifier"},
               {"name": "both", "file": "both.json", "sha256": sha256_file(spec), "kind": "classifier-ensemble"}]
    (tmp_path / "manifest.json").write_text(json.dumps({"weights": entries}))
    monkeypatch.setattr(W, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(W, "MANIFEST", tmp_path / "manifest.json")
    ens = load_classifier("both")
    assert ens.mode == "full+crop" and [m.mode for m in ens.members] == ["full", "crop"]
    assert ens.segmenter == "seg-x"
    assert load_classifier(str(spec)).views == ens.views  # the file by path
    (tmp_path / "full.pt").write_bytes(b"tampered")  # a member is sha256-checked
    with pytest.raises(WeightsError, match="sha256"):
        load_classifier("both")
    spec.write_text(json.dumps({"members": ["crop.pt", "crop.pt"], "note": "edited"}))  # so is the file
    with pytest.raises(WeightsError, match="sha256"):
        load_classifier("both")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"members": "crop.pt"}))
    with pytest.raises(WeightsError, match="not an ensemble file"):
        load_classifier(str(bad))


def test_predict_cache_takes_one_cache_per_view(members):
    ens = load_classifier(f"{members[0]},{members[1]}")
    images = _scans(4)
    masks = BrightBlobSegmenter().predict(images)
    paths = np.array([f"s{i}.png" for i in range(4)])
    caches = [{"images": np.stack([make_input(im, m, s, r.mask)[0] for im, r in zip(images, masks)]),
               "mode": np.array(m), "size": np.array(s), "paths": paths} for m, s, _ in ens.views]
    got = predict_cache(ens, caches, batch_size=3)  # batches cut across both caches alike
    want = ens.predict_views({v: c["images"] for v, c in zip(ens.views, caches)})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="mode=crop size=48 margin=0.25"):
        predict_cache(ens, caches[:1])
    with pytest.raises(ValueError, match="--margin 0.25"):  # a crop cache at another margin is another input
        predict_cache(ens, [caches[0], {**caches[1], "margin": np.array(0.5)}])
    shuffled = {**caches[1], "paths": paths[::-1]}
    with pytest.raises(ValueError, match="different slices"):
        predict_cache(ens, [caches[0], shuffled])


def test_run_predict_with_an_ensemble(tmp_path, members):
    src = tmp_path / "scans"
    src.mkdir()
    images = _scans(4)
    for i, im in enumerate(images):
        write_png(src / f"s{i}.png", im)
    ens = load_classifier(f"{members[0]},{members[1]}")
    with pytest.raises(ValueError, match="needs a segmenter"):
        run_predict(src, tmp_path / "none", ens, None, progress=False)
    with pytest.raises(ValueError, match="ensemble"):
        run_predict(src, tmp_path / "other", ens, BrightBlobSegmenter(), mode="crop", progress=False)
    run_predict(src, tmp_path / "out", ens, BrightBlobSegmenter(), batch_size=3, gradcam=True, progress=False)
    with open(tmp_path / "out" / "predictions.csv", newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    masks = BrightBlobSegmenter().predict(images)
    for i, (im, r) in enumerate(zip(images, masks)):
        want = ens.predict_views({v: make_input(im, v[0], v[1], r.mask)[0][None] for v in ens.views})[0]
        row = rows[f"s{i}.png"]
        assert row["mode"] == "full+crop" and row["status"] == "ok"
        np.testing.assert_allclose([float(row[f"p_{c}"]) for c in CLASSES], want, atol=2e-6)
        for member in ("full", "crop"):  # one Grad-CAM map per member
            assert (tmp_path / "out" / "gradcam" / member / f"s{i}.png.png").is_file()


def test_default_predict_is_the_shipped_ensemble_with_its_segmenter(tmp_path, kaggle_root):
    """The main job's defaults (configs/default.yaml) on 12 real Testing scans, 3 per class."""
    from pipeline.cli import main

    src = tmp_path / "scans"
    for c in CLASSES:
        (src / c).mkdir(parents=True)
        for f in sorted((kaggle_root / "Testing" / c).iterdir())[:3]:
            (src / c / f.name).symlink_to(f)
    assert main(["predict", "--input", str(src), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    with open(tmp_path / "out" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    settings = json.loads((tmp_path / "out" / "predictions.csv.settings.json").read_text())
    assert settings["mode"] == "full+crop" and settings["classifier"]["ensemble"] == "mean"
    assert len(settings["classifier"]["members"]) == 2 and settings["segmenter"] != "none"
    assert len(rows) == 12 and all(r["status"] == "ok" and r["mode"] == "full+crop" for r in rows)
    right = sum(r["label"] == r["path"].split("/")[0] for r in rows)
    assert right >= 11, [(r["path"], r["label"]) for r in rows]
    tumors = [r for r in rows if not r["path"].startswith("notumor")]
    assert sum(r["found"] == "true" for r in tumors) >= 7  # stage 1 ran and found most lesions


def test_evaluate_cls_scores_an_ensemble_from_one_cache_per_view(tmp_path, members):
    from pipeline.cli import main

    ens = load_classifier(f"{members[0]},{members[1]}")
    images = _scans(6)
    masks = BrightBlobSegmenter().predict(images)
    labels = np.array([0, 2] * 3)
    paths = np.array([f"Testing/s{i}.png" for i in range(6)])
    files = []
    for mode, size, _ in ens.views:
        f = tmp_path / f"{mode}.npz"
        np.savez(f, images=np.stack([make_input(im, mode, size, r.mask)[0] for im, r in zip(images, masks)]),
                 labels=labels, paths=paths, found=np.array([mode != "full" and r.found for r in masks]),
                 mode=np.array(mode), size=np.array(size), margin=np.array(0.25))
        files.append(str(f))
    assert main(["evaluate-cls", "--cls", f"{members[0]},{members[1]}", "--data", *files[::-1],
                 "--out", str(tmp_path / "eval"), "--n-boot", "20"]) == 0
    with open(tmp_path / "eval" / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == paths.tolist()
    want = ens.predict_views({v: np.load(f)["images"] for v, f in zip(ens.views, files)})
    # 1e-5: float sums differ by a few 1e-6 between machines; slices out of order move these members
    # by far more than that
    wrong = ens.predict_views({v: np.load(f)["images"][::-1] for v, f in zip(ens.views, files)})
    assert np.abs(wrong - want).max() > 1e-3
    np.testing.assert_allclose([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows], want, atol=1e-5)
    assert [r["found"] for r in rows] == [str(bool(r.found)).lower() for r in masks]  # stage 1's, from the crop cache
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["source"]["data"] == files[::-1] and metrics["all"]["n"] == 6


def test_onnx_ensemble_runs_members_side_by_side_with_the_same_result(members, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("BRAIN_MRI_CACHE", str(tmp_path))  # exports go to a fresh cache
    ref = load_classifier(f"{members[0]},{members[1]}")
    fast = load_classifier(f"{members[0]},{members[1]}", backend="onnx", threads=2)
    assert fast.parallel and not ref.parallel
    assert all(m.model.session.get_session_options().intra_op_num_threads == 1 for m in fast.members)
    images = _scans(5)
    masks = BrightBlobSegmenter().predict(images)
    views = make_views(images, [r.mask for r in masks], ref.views)
    np.testing.assert_allclose(fast.predict_views(views), ref.predict_views(views), atol=1e-4)


def test_auto_backend_is_onnx_on_the_cpu_only_when_it_can_run(monkeypatch):
    import importlib.util

    from pipeline.cli import auto_backend

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    assert auto_backend("cpu") == "onnx"
    assert auto_backend("cuda") == "torch" and auto_backend("cuda:1") == "torch"
    assert auto_backend("cpu", compile=True) == "torch"
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert auto_backend("cpu") == "torch"


def test_second_opinion_joins_the_mean_only_where_the_members_are_unsure(tmp_path, members):
    """Rows whose mean is unsure get the mean over all networks; the others keep the members' mean,
    and the second-opinion network never sees them."""
    full, crop = Classifier(members[0]), Classifier(members[1])
    extra = Classifier(_tiny(tmp_path / "extra.pt", "full", 40, 7))
    images = _scans(8)
    masks = BrightBlobSegmenter().predict(images)
    views = make_views(images, [r.mask for r in masks], [FULL32, CROP48, ("full", 40, None)])
    pair = (full.predict_proba(views[FULL32]) + crop.predict_proba(views[CROP48])) / 2
    three = (2 * pair + extra.predict_proba(views[("full", 40, None)])) / 3
    below = float(np.median(pair.max(1)))  # half the rows are unsure
    unsure = pair.max(1) < below
    assert 0 < unsure.sum() < len(unsure)

    seen = []
    real = extra.predict_proba
    extra.predict_proba = lambda x: seen.append(len(x)) or real(x)
    ens = ClassifierEnsemble([full, crop], second_opinion=[extra], below=below)
    assert ens.views == (FULL32, CROP48, ("full", 40, None)) and ens.mode == "full+crop"
    got = ens.predict_views(views)
    np.testing.assert_allclose(got[unsure], three[unsure], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got[~unsure], pair[~unsure], rtol=1e-5, atol=1e-7)
    assert seen == [int(unsure.sum())]  # only the unsure rows reached the second opinion
    # at below=1 every row is unsure: the plain mean of all three
    np.testing.assert_allclose(ClassifierEnsemble([full, crop], second_opinion=[extra], below=1.0)
                               .predict_views(views), three, rtol=1e-5, atol=1e-7)
    with pytest.raises(WeightsError, match="below"):
        ClassifierEnsemble([full, crop], second_opinion=[extra])
    wide = Classifier(_tiny(tmp_path / "wide.pt", "crop", 48, 3, margin=0.5))
    with_wide = ClassifierEnsemble([full, crop], second_opinion=[wide], below=1.0)  # its own, wider crop
    assert with_wide.views[-1] == ("crop", 48, 0.5)
    views = make_views(images, [r.mask for r in masks], with_wide.views)
    np.testing.assert_allclose(with_wide.predict_views(views),
                               (2 * pair + wide.predict_proba(views[("crop", 48, 0.5)])) / 3, rtol=1e-5, atol=1e-7)


def test_second_opinion_from_an_ensemble_file_changes_the_fingerprint(tmp_path, members):
    import shutil

    for p in members:
        shutil.copy(p, tmp_path / p.name)
    _tiny(tmp_path / "extra.pt", "full", 40, 7)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"members": ["full.pt", "crop.pt"]}))
    spec = tmp_path / "three.json"
    spec.write_text(json.dumps({"members": ["full.pt", "crop.pt"],
                                "second_opinion": {"members": ["extra.pt"], "below": 0.8}}))
    ens = load_classifier(str(spec))
    assert [m.size for m in ens.second_opinion] == [40] and ens.below == 0.8
    assert ens.meta["second_opinion"]["below"] == 0.8
    assert ("full", 40, None) in ens.views
    # a folder predicted without the second opinion is not resumed as if it had one
    assert ens.fingerprint != load_classifier(str(plain)).fingerprint
    spec.write_text(json.dumps({"members": ["full.pt", "crop.pt"], "second_opinion": ["extra.pt"]}))
    with pytest.raises(WeightsError, match="second_opinion"):
        load_classifier(str(spec))
    spec.write_text(json.dumps({"members": ["full.pt", "crop.pt"], "second_opinion": {"members": ["extra.pt"]}}))
    with pytest.raises(WeightsError, match="below"):
        load_classifier(str(spec))



class _LeftRightClassifier:
    """Scores 'glioma' by how much brighter the left half of its view is than the right."""

    views, mode, size = (FULL32,), "full", 32
    meta = {"model": "left-right", "mode": "full", "size": 32}

    def __init__(self):
        self.calls = []

    def predict_views(self, views):
        x = views[FULL32].astype(np.float64)
        self.calls.append(len(x))
        d = (x[:, :, :16].mean((1, 2)) - x[:, :, 16:].mean((1, 2))) / 32
        logits = np.stack([d, np.zeros_like(d), -d, np.zeros_like(d)], 1)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


def test_mirror_tta_is_the_mean_over_each_view_and_its_mirror():
    from pipeline.classify.predict import predict_views_tta

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32), dtype=np.uint8)
    images[:, :, :10] = 255  # bright on the left: glioma-ish unmirrored, the other way mirrored
    views = {FULL32: images}
    clf = _LeftRightClassifier()
    plain = clf.predict_views(views)
    mirrored = clf.predict_views({FULL32: images[:, :, ::-1]})
    assert (plain[:, 0] > plain[:, 2]).all() and (mirrored[:, 0] < mirrored[:, 2]).all()
    clf.calls.clear()
    got = predict_views_tta(clf, views, "hflip")
    assert clf.calls == [10]  # one pass over the inputs and their mirrors together
    np.testing.assert_allclose(got, (plain + mirrored) / 2)
    np.testing.assert_allclose(got[:, 0], got[:, 2])  # the asymmetry this classifier reads cancels
    np.testing.assert_allclose(predict_views_tta(clf, {FULL32: images[:, :, ::-1]}, "hflip"), got)
    np.testing.assert_array_equal(predict_views_tta(clf, views, "none"), plain)
    with pytest.raises(ValueError, match="tta must be one of"):
        predict_views_tta(clf, views, "vflip")
    cache = {"images": images, "mode": np.array("full"), "size": np.array(32)}
    np.testing.assert_allclose(predict_cache(clf, cache, batch_size=2, tta="hflip"), got)


def test_mirror_tta_on_a_real_ensemble_reads_both_views_mirrored(members):
    from pipeline.classify.predict import predict_views_tta

    ens = load_classifier(f"{members[0]},{members[1]}")
    images = _scans()
    masks = [r.mask for r in BrightBlobSegmenter().predict(images)]
    views = make_views(images, masks, ens.views)
    mirrored = {v: np.ascontiguousarray(x[:, :, ::-1]) for v, x in views.items()}
    got = predict_views_tta(ens, views, "hflip")
    np.testing.assert_allclose(got, (ens.predict_views(views) + ens.predict_views(mirrored)) / 2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(predict_views_tta(ens, mirrored, "hflip"), got, rtol=1e-6, atol=1e-7)


def test_onnx_ensemble_given_one_core_runs_its_members_one_after_the_other(members, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("BRAIN_MRI_CACHE", str(tmp_path))
    assert not load_classifier(f"{members[0]},{members[1]}", backend="onnx", threads=1).parallel
