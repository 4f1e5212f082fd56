"""A crop or masked classifier reads masks from the segmenter it was trained on: the cache records
that segmenter, training copies it into the checkpoint, and ``predict --seg auto`` picks it."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from pipeline import CLASSES
from pipeline.classify.models import create_model
from pipeline.classify.predict import Classifier, load_classifier
from pipeline.weights import WeightsError, load_manifest


def checkpoint(path, mode="crop", **meta):
    torch.manual_seed(0)
    torch.save({"state_dict": create_model("smallcnn").state_dict(),
                "meta": {"model": "smallcnn", "mode": mode, "size": 32, "classes": list(CLASSES), **meta}}, path)
    return path


def test_the_shipped_crop_member_names_its_segmenter_and_auto_picks_it(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.phantoms import make_phantom
    from pipeline.weights import resolve, sha256_file

    clf = Classifier("cls-lite0-crop")
    assert clf.segmenter == "seg-lite0-cascade" and load_manifest()["seg-lite0-cascade"]["kind"] == "segmenter"
    src = tmp_path / "scans"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), make_phantom("glioma", 96, 1)[0])
    assert main(["predict", "--input", str(src), "--out", str(tmp_path / "out"), "--cls", "cls-lite0-crop",
                 "--device", "cpu", "--backend", "torch"]) == 0
    used = json.loads((tmp_path / "out" / "predictions.csv.settings.json").read_text())["segmenter"]
    # not the default of `segment` (seg-lite0-fine-cascade): the one its training crops came from
    assert used["weights_sha256"] == sha256_file(resolve("seg-lite0-cascade"))


def test_the_cache_and_the_checkpoint_record_the_segmenter_of_the_masks(tmp_path):
    from pipeline.classify.data import build_cache, load_cache
    from pipeline.classify.train import train
    from pipeline.datasets import Sample
    from pipeline.phantoms import make_phantom

    root, masks = tmp_path / "Training", tmp_path / "segment" / "masks"
    samples = []
    for i, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        (masks / c).mkdir(parents=True)
        for k in range(2):
            image, mask = make_phantom(c, 64, 10 * i + k)[:2]
            cv2.imwrite(str(root / c / f"{k}.png"), image)
            cv2.imwrite(str(masks / c / f"{k}.png"), np.where(mask > 0, 255, 0).astype(np.uint8))
            samples.append(Sample(root / c / f"{k}.png", c))
    (masks.parent / "segments.csv.settings.json").write_text(json.dumps(
        {"model": "unet", "segmenter": {"weights_sha256": "ab" * 32, "threshold": 0.3}}))
    for split in ("train", "val"):
        build_cache(samples, tmp_path / "cache" / f"{split}.npz", mode="crop", size=32, image_root=root,
                    masks_dir=masks, workers=1)
    assert str(load_cache(tmp_path / "cache" / "train.npz")["segmenter_sha256"]) == "ab" * 32
    full = build_cache(samples, tmp_path / "full.npz", mode="full", size=32, workers=1)
    assert "segmenter_sha256" not in load_cache(full)  # whole slices read no masks
    train(str(tmp_path / "cache" / "train.npz"), str(tmp_path / "cache" / "val.npz"), str(tmp_path / "run"),
          model_name="smallcnn", epochs=1, batch_size=8, device="cpu", pretrained=False)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["meta"]["segmenter_sha256"] == "ab" * 32


def test_auto_finds_a_recorded_segmenter_by_hash_and_refuses_an_unknown_one(tmp_path, capsys):
    from pipeline.cli import _auto_segmenter
    from pipeline.config import ConfigError

    listed = load_manifest()["seg-lite0-cascade"]["sha256"]
    known = Classifier(checkpoint(tmp_path / "known.pt", segmenter_sha256=listed))
    assert known.segmenter == "seg-lite0-cascade" and _auto_segmenter(known, "known.pt") == "seg-lite0-cascade"
    unknown = Classifier(checkpoint(tmp_path / "unknown.pt", segmenter_sha256="cd" * 32))
    assert unknown.segmenter is None
    with pytest.raises(ConfigError, match="sha256 cdcdcdcd.*--seg PATH"):
        _auto_segmenter(unknown, "unknown.pt")
    older = Classifier(checkpoint(tmp_path / "older.pt"))  # trained before the record existed
    assert _auto_segmenter(older, "older.pt") == "auto"
    assert "does not record which segmenter" in capsys.readouterr().err
    assert Classifier(checkpoint(tmp_path / "full.pt", mode="full", segmenter_sha256=listed)).segmenter is None


def test_a_list_of_members_agrees_on_one_segmenter(tmp_path):
    listed = load_manifest()["seg-lite0-cascade"]["sha256"]
    a = checkpoint(tmp_path / "a.pt", segmenter_sha256=listed)
    b = checkpoint(tmp_path / "b.pt", mode="masked", segmenter_sha256=listed)
    whole = checkpoint(tmp_path / "whole.pt", mode="full")
    pair = load_classifier(f"{a},{whole}")
    assert pair.segmenter == "seg-lite0-cascade"
    assert load_classifier(f"{a},{b}").segmenter == "seg-lite0-cascade"
    other = checkpoint(tmp_path / "other.pt", segmenter_sha256="ef" * 32)
    with pytest.raises(WeightsError, match="masks of different segmenters"):
        load_classifier(f"{a},{other}")
    assert load_classifier(f"{checkpoint(tmp_path / 'old.pt')},{whole}").segmenter is None


def test_copies_files_beside_and_second_opinions_keep_the_segmenter(tmp_path):
    import shutil

    from pipeline.cli import _auto_segmenter, main
    from pipeline.config import ConfigError
    from pipeline.phantoms import make_phantom
    from pipeline.weights import WEIGHTS_DIR, resolve, sha256_file

    copy = shutil.copy(WEIGHTS_DIR / "cls_lite0_crop_128.pt", tmp_path / "crop_copy.pt")
    assert Classifier(copy).segmenter == "seg-lite0-cascade"  # the same bytes as the listed member
    # a segmenter named in an ensemble file is found beside it, as its members are
    full, crop = checkpoint(tmp_path / "full.pt", mode="full"), checkpoint(tmp_path / "crop.pt")
    shutil.copy(WEIGHTS_DIR / "seg_lite0_cascade.pt", tmp_path / "myseg.pt")
    (tmp_path / "beside.json").write_text(json.dumps({"members": ["full.pt", "crop.pt"], "segmenter": "myseg.pt"}))
    assert load_classifier(tmp_path / "beside.json").segmenter == str(tmp_path / "myseg.pt")
    # one member records a segmenter nobody lists, the other nothing: refused, as that member alone is
    unknown = checkpoint(tmp_path / "unknown.pt", segmenter_sha256="cd" * 32)
    pair = load_classifier(f"{unknown},{crop}")
    with pytest.raises(ConfigError, match="sha256 cdcdcdcd"):
        _auto_segmenter(pair, "pair")
    # whole-slice members with a crop second opinion still read masks: auto gives them the named segmenter
    checkpoint(tmp_path / "full2.pt", mode="full")
    (tmp_path / "second.json").write_text(json.dumps({"members": ["full.pt", "full2.pt"],
                                                      "segmenter": "seg-lite0-cascade",
                                                      "second_opinion": {"members": ["crop.pt"], "below": 0.9}}))
    src = tmp_path / "scans"
    src.mkdir()
    cv2.imwrite(str(src / "a.png"), make_phantom("glioma", 96, 1)[0])
    assert main(["predict", "--input", str(src), "--out", str(tmp_path / "out"), "--cls", str(tmp_path / "second.json"),
                 "--device", "cpu", "--backend", "torch"]) == 0
    used = json.loads((tmp_path / "out" / "predictions.csv.settings.json").read_text())["segmenter"]
    assert used["weights_sha256"] == sha256_file(resolve("seg-lite0-cascade"))
