import csv

import numpy as np
import pytest

from pipeline import CLASSES
from pipeline.classify.yolo_cls import export_cache_as_folders, predict_yolo_cls, train_yolo_cls
from tests.fakes import phantom_cls_caches


@pytest.fixture(scope="module")
def tiny_caches(tmp_path_factory):
    return phantom_cls_caches(tmp_path_factory.mktemp("cache"), {"train": 6, "val": 2, "testing": 3}, 32)


def test_cache_exported_as_class_folders(tiny_caches, tmp_path):
    out = export_cache_as_folders({"train": tiny_caches / "train.npz"}, tmp_path)
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(CLASSES)
    assert all(len(list((out / "train" / c).glob("*.png"))) == 6 for c in CLASSES)


def test_yolo_cls_trains_offline_and_writes_compare_predictions(tiny_caches, tmp_path):
    folders = export_cache_as_folders({"train": tiny_caches / "train.npz", "val": tiny_caches / "val.npz"},
                                      tmp_path / "images")
    best = train_yolo_cls(folders, tmp_path / "run", imgsz=32, epochs=1, batch=8, workers=0)
    assert best.is_file()
    out = predict_yolo_cls(best, tiny_caches / "testing.npz", tmp_path / "pred.csv")
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    for row in rows:
        probs = [float(row[f"p_{c}"]) for c in CLASSES]
        assert abs(sum(probs) - 1) < 1e-3
        assert row["pred"] == CLASSES[int(np.argmax(probs))]
    assert [r["true"] for r in rows] == [CLASSES[k] for k in np.repeat(np.arange(4), 3)]

    # a run that dies before its file is complete keeps the previous one whole (compare would score a
    # cut-off file): the rows go to a temporary file, renamed over the old one as the last step
    import os

    before = out.read_bytes()

    def killed_before_rename(src, dst):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", killed_before_rename)
        with pytest.raises(KeyboardInterrupt):
            predict_yolo_cls(best, tiny_caches / "testing.npz", out, batch=5)
    assert out.read_bytes() == before


def test_train_yolo_cls_refuses_caches_of_another_view(tiny_caches, tmp_path, capsys):
    import shutil

    from pipeline.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for part in ("train", "val"):
        shutil.copy(tiny_caches / f"{part}.npz", data / f"{part}.npz")
    (tmp_path / "big").mkdir()
    phantom_cls_caches(tmp_path / "big", {"testing": 3}, 48)  # scored at another size than trained
    shutil.copy(tmp_path / "big" / "testing.npz", data / "testing.npz")
    assert main(["train-yolo-cls", "--data", str(data), "--out", str(tmp_path / "out"), "--epochs", "1"]) != 0
    assert "testing.npz is mode=full size=48" in capsys.readouterr().err
    assert not (tmp_path / "out" / "run").exists()  # refused before any training


@pytest.mark.parametrize("part", ["train", "val"])
def test_train_yolo_cls_refuses_a_cache_missing_a_class_before_training(tiny_caches, tmp_path, capsys, part):
    # in val too: ultralytics numbers each split's class folders on its own, so val's labels would shift
    import shutil

    from pipeline.cli import main

    data = tmp_path / "data"
    data.mkdir()
    for other in ("train", "val"):
        shutil.copy(tiny_caches / f"{other}.npz", data / f"{other}.npz")
    with np.load(tiny_caches / f"{part}.npz") as cache:
        arrays = {k: cache[k] for k in cache.files}
    keep = arrays["labels"] != CLASSES.index("meningioma")
    n = len(arrays["labels"])
    np.savez(data / f"{part}.npz", **{k: (v[keep] if v.ndim and len(v) == n else v) for k, v in arrays.items()})
    assert main(["train-yolo-cls", "--data", str(data), "--out", str(tmp_path / "out"), "--epochs", "1"]) != 0
    assert f"{part}.npz: no slice of class meningioma" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
