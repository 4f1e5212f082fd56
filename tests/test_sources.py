"""Source tagging (leave-one-source-out), subset metrics and train-cls --drop."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import CLASSES
from pipeline.evaluate import classification_metrics, tumor_vs_none
from pipeline.evaluate_cls import evaluate_predictions, parse_subsets
from pipeline.sources import source_of, tag_sources, write_sources
from tests.test_audit import _near_copy, _scan, _write


def test_source_of_follows_class_and_figshare_copy():
    assert source_of("notumor", True) == "br35h"
    assert source_of("notumor", False) == "br35h"
    assert source_of("glioma", True) == "figshare"
    assert source_of("pituitary", False) == "sartaj"


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    figshare = root / "figshare"
    fig_images = [_write(figshare / "images" / f"{i}.jpg", _scan(300 + i)) for i in range(3)]
    kaggle = root / "kaggle"
    # a re-framed, re-encoded figshare slice in Training and one in Testing; an unrelated tumor;
    # a no-tumor slice that is (by construction) also a figshare copy: no-tumor is always br35h.
    copy_train = _near_copy(fig_images[0], kaggle / "Training" / "glioma" / "a.jpg")
    copy_test = _near_copy(fig_images[1], kaggle / "Testing" / "meningioma" / "b.jpg")
    other = _write(kaggle / "Training" / "pituitary" / "c.jpg", _scan(400))
    none = _near_copy(fig_images[2], kaggle / "Testing" / "notumor" / "d.jpg")
    rows = tag_sources(kaggle, figshare)
    out = root / "out"
    summary = write_sources(rows, out)
    return {"rows": {Path(r["path"]).name: r for r in rows}, "out": out, "summary": summary,
            "paths": [copy_train, copy_test, other, none]}


def test_tumor_slices_copied_from_figshare_are_figshare_others_sartaj(tagged):
    rows = tagged["rows"]
    assert {n: (r["split"], r["label"], r["source"]) for n, r in rows.items()} == {
        "a.jpg": ("Training", "glioma", "figshare"),
        "b.jpg": ("Testing", "meningioma", "figshare"),
        "c.jpg": ("Training", "pituitary", "sartaj"),
        "d.jpg": ("Testing", "notumor", "br35h"),
    }


def test_sources_files_list_each_split_and_source(tagged):
    out = tagged["out"]
    with open(out / "sources.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert [Path(p).name for p in (out / "training_sartaj.txt").read_text().split()] == ["c.jpg"]
    assert [Path(p).name for p in (out / "testing_figshare.txt").read_text().split()] == ["b.jpg"]
    assert (out / "testing_sartaj.txt").read_text() == ""
    assert json.loads((out / "sources.json").read_text())["Testing"]["notumor"] == {"br35h": 1}


def test_missing_figshare_images_is_a_clear_error(tmp_path):
    (tmp_path / "Training" / "glioma").mkdir(parents=True)
    with pytest.raises(ValueError, match="images"):
        tag_sources(tmp_path, tmp_path / "nofigshare")


def test_unreadable_and_odd_names_are_tagged_as_they_are(tmp_path, capsys):
    import os

    import cv2

    figshare = tmp_path / "figshare"
    fig = _write(figshare / "images" / "0.jpg", _scan(300))
    cv2.imwrite(str(figshare / "images" / "1.png"), _scan(301))  # a PNG export of the set counts too
    kaggle = tmp_path / "kaggle"
    _near_copy(fig, kaggle / "Training" / "glioma" / "a.jpg")
    _near_copy(figshare / "images" / "1.png", kaggle / "Training" / "glioma" / "from_png.jpg")
    (kaggle / "Training" / "glioma" / "broken.jpg").write_bytes(b"not an image")
    odd = os.path.join(os.fsencode(kaggle / "Training" / "pituitary"), b"z\xe9.jpg")  # not UTF-8
    os.makedirs(os.path.dirname(odd), exist_ok=True)
    with open(odd, "wb") as fh:
        fh.write(cv2.imencode(".jpg", _scan(400))[1].tobytes())
    rows = {Path(r["path"]).name: r["source"] for r in tag_sources(kaggle, figshare, splits=("Training",))}
    assert rows["broken.jpg"] == "unknown" and "broken.jpg: unreadable" in capsys.readouterr().err
    assert rows["a.jpg"] == rows["from_png.jpg"] == "figshare" and rows[os.fsdecode(b"z\xe9.jpg")] == "sartaj"
    out = tmp_path / "out"
    write_sources(tag_sources(kaggle, figshare, splits=("Training",)), out)
    assert b"z\xe9.jpg" in (out / "training_sartaj.txt").read_bytes()  # written back byte for byte
    assert [Path(p).name for p in (out / "training_unknown.txt").read_text().split()] == ["broken.jpg"]
    assert not list(out.glob(".*.tmp"))


def test_tumor_vs_none_against_hand_counts():
    # rows true, columns predicted, in CLASSES order (glioma, meningioma, notumor, pituitary)
    k = CLASSES.index("notumor")
    cm = np.zeros((4, 4), int)
    cm[0, 0], cm[0, 1], cm[0, k] = 5, 2, 3      # 7 of 10 gliomas called some tumor
    cm[k, k], cm[k, 3] = 8, 2                   # 8 of 10 no-tumor slices called no tumor
    cm[3, 3] = 10
    t = tumor_vs_none(cm)
    assert t == {"tumor_found": 17 / 20, "notumor_correct": 0.8, "n_tumor": 20, "n_notumor": 10}
    y_true = [0] * 3 + [k]
    y_pred = [1, k, 0, k]
    m = classification_metrics(y_true, y_pred)["tumor_vs_none"]
    assert m["tumor_found"] == pytest.approx(2 / 3) and m["notumor_correct"] == 1.0


def test_subset_metrics_cover_only_listed_paths(tmp_path):
    paths = [str(tmp_path / f"{i}.jpg") for i in range(4)]
    pred = {"paths": paths, "y_true": np.array([0, 0, 2, 3]), "y_pred": np.array([0, 2, 2, 1])}
    listed = tmp_path / "sub.txt"
    listed.write_text(paths[0] + "\n" + paths[1] + "\n")
    result = evaluate_predictions(pred, n_boot=20, subsets=parse_subsets([f"held={listed}"]))
    sub = result["subsets"]["held"]
    assert sub["n"] == 2 and sub["accuracy"] == 0.5
    assert sub["tumor_vs_none"]["tumor_found"] == 0.5
    assert result["all"]["n"] == 4
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_subsets(["nolist"])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        parse_subsets([f"x={tmp_path / 'missing.txt'}"])


def _cache(path: Path, names: list[str], labels: list[int]) -> Path:
    np.savez(path, images=np.zeros((len(names), 16, 16), np.uint8), labels=np.array(labels),
             paths=np.array(names), found=np.zeros(len(names), bool), mode=np.array("full"),
             size=np.array(16), margin=np.array(0.25))
    return path


def test_drop_leaves_listed_slices_out_of_training(tmp_path):
    from pipeline.classify.train import _without, train

    names = [str(tmp_path / f"s{i}.jpg") for i in range(6)]
    cache = dict(np.load(_cache(tmp_path / "train.npz", names, [0, 1, 2, 3, 0, 1])))
    listed = tmp_path / "drop.txt"
    listed.write_text(names[1] + "\n" + names[4] + "\n")
    kept = _without(cache, str(listed))
    assert list(kept["paths"]) == [names[i] for i in (0, 2, 3, 5)]
    assert list(kept["labels"]) == [0, 2, 3, 1] and kept["images"].shape == (4, 16, 16)
    assert str(kept["mode"]) == "full"

    _cache(tmp_path / "val.npz", names[:2], [0, 1])
    nothing = tmp_path / "other.txt"
    nothing.write_text(str(tmp_path / "elsewhere.jpg") + "\n")
    with pytest.raises(ValueError, match="none of its paths"):
        train(str(tmp_path / "train.npz"), str(tmp_path / "val.npz"), str(tmp_path / "run"), model_name="smallcnn",
              pretrained=False, epochs=1, drop=str(nothing))
