"""SAM refinement plumbing on a tiny randomly initialised SAM: no download, a few seconds on CPU."""
from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch

from pipeline import weights as W
from pipeline.segment.sam import SAM_CHECKPOINTS, SamRefiner, YoloSamSegmenter, build_sam
from pipeline.segment.yolo import SegResult
from pipeline.weights import WeightsError

IMG = 64  # tiny encoder input size (SAM proper: 1024)


def tiny_sam(seed: int = 0):
    """A real ``Sam`` from segment_anything's own modules, small enough to run in milliseconds."""
    from segment_anything.modeling import (ImageEncoderViT, MaskDecoder, PromptEncoder, Sam,
                                           TwoWayTransformer)

    torch.manual_seed(seed)
    dim = 32
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=IMG, patch_size=16, embed_dim=dim, depth=1, num_heads=1,
                                      out_chans=dim, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(IMG // 16, IMG // 16),
                                     input_image_size=(IMG, IMG), mask_in_chans=4),
        mask_decoder=MaskDecoder(transformer_dim=dim, num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=1),
                                 iou_head_depth=1, iou_head_hidden_dim=16),
    )
    return sam.eval()


@pytest.fixture(scope="module")
def sam():
    return tiny_sam()


def _image(h=100, w=150, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _spy(monkeypatch, refiner, fake=None):
    """Record set_image / predict_torch calls; ``fake(kwargs)`` replaces predict_torch's result."""
    calls = {"set_image": [], "predict_torch": []}
    pred = refiner.predictor
    real_set, real_predict = pred.set_image, pred.predict_torch

    def set_image(image, image_format="RGB"):
        calls["set_image"].append((image.copy(), image_format))
        return real_set(image, image_format)

    def predict_torch(**kwargs):
        calls["predict_torch"].append(kwargs)
        return fake(kwargs) if fake else real_predict(**kwargs)

    monkeypatch.setattr(pred, "set_image", set_image)
    monkeypatch.setattr(pred, "predict_torch", predict_torch)
    return calls


def _scaled(xy: np.ndarray, h: int, w: int) -> np.ndarray:
    """Points (..., 2) x, y mapped to ResizeLongestSide(IMG) input pixels, computed independently."""
    scale = IMG / max(h, w)
    newh, neww = int(h * scale + 0.5), int(w * scale + 0.5)
    return xy * np.array([neww / w, newh / h], np.float32)


@pytest.mark.parametrize("shape", [(100, 150), (150, 100), (37, 64)])
def test_mask_at_original_size(sam, shape):
    image = _image(*shape)
    h, w = shape
    mask = SamRefiner(sam).refine(image, np.array([[w * 0.2, h * 0.3, w * 0.7, h * 0.9]]))
    assert mask.shape == shape and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}


def test_boxes_and_points_are_transformed(sam, monkeypatch):
    h, w = 100, 150
    refiner = SamRefiner(sam)
    calls = _spy(monkeypatch, refiner)
    boxes = np.array([[10, 20, 60, 80], [90, 5, 140, 50]], np.float32)
    refiner.refine(_image(h, w), boxes)
    kw = calls["predict_torch"][0]
    got = kw["boxes"].cpu().numpy()
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got, _scaled(boxes.reshape(-1, 2, 2), h, w).reshape(-1, 4), rtol=1e-5)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    assert kw["point_coords"].shape == (2, 1, 2)
    np.testing.assert_allclose(kw["point_coords"].cpu().numpy()[:, 0], _scaled(centres, h, w), rtol=1e-5)
    assert kw["point_labels"].tolist() == [[1], [1]]
    assert kw["multimask_output"] is True


def test_no_centre_point_and_single_mask(sam, monkeypatch):
    refiner = SamRefiner(sam, multimask=False, use_center_point=False)
    calls = _spy(monkeypatch, refiner)
    mask = refiner.refine(_image(), np.array([[10, 20, 60, 80]]))
    kw = calls["predict_torch"][0]
    assert kw["point_coords"] is None and kw["point_labels"] is None and kw["multimask_output"] is False
    assert mask.shape == (100, 150)


def test_gray_becomes_rgb(sam, monkeypatch):
    refiner = SamRefiner(sam)
    calls = _spy(monkeypatch, refiner)
    image = _image()
    refiner.refine(image, np.array([[10, 20, 60, 80]]))
    seen, fmt = calls["set_image"][0]
    assert seen.shape == (100, 150, 3) and fmt == "RGB"
    assert all((seen[..., c] == image).all() for c in range(3))
    assert refiner.predictor.original_size == (100, 150)


def test_one_embedding_one_batched_prompt_per_scan(sam, monkeypatch):
    refiner = SamRefiner(sam)
    calls = _spy(monkeypatch, refiner)
    boxes = np.array([[10, 20, 60, 80], [90, 5, 140, 50], [0, 0, 150, 100]], np.float32)
    refiner.refine(_image(), boxes)
    assert len(calls["set_image"]) == 1
    assert len(calls["predict_torch"]) == 1
    assert calls["predict_torch"][0]["boxes"].shape == (3, 4)


def test_best_multimask_candidate_is_kept(sam, monkeypatch):
    h, w = 100, 150

    def fake(kwargs):
        k = kwargs["boxes"].shape[0]
        masks = torch.zeros(k, 3, h, w, dtype=torch.bool)
        for b in range(k):
            for c in range(3):  # a distinct stripe per (box, candidate)
                masks[b, c, 10 * (3 * b + c):10 * (3 * b + c) + 5, :] = True
        scores = torch.tensor([[0.1, 0.2, 0.9], [0.8, 0.3, 0.1]])[:k]
        return masks, scores, torch.zeros(k, 3, 16, 16)

    refiner = SamRefiner(sam)
    _spy(monkeypatch, refiner, fake)
    mask = refiner.refine(_image(h, w), np.array([[10, 20, 60, 80], [90, 5, 140, 50]]))
    expected = np.zeros((h, w), np.uint8)
    expected[20:25] = 255  # box 0, candidate 2 (score 0.9)
    expected[30:35] = 255  # box 1, candidate 0 (score 0.8)
    np.testing.assert_array_equal(mask, expected)


def test_no_boxes_no_embedding(sam, monkeypatch):
    refiner = SamRefiner(sam)
    calls = _spy(monkeypatch, refiner)
    mask = refiner.refine(_image(), np.zeros((0, 4), np.float32))
    assert mask.shape == (100, 150) and mask.dtype == np.uint8 and not mask.any()
    assert calls["set_image"] == [] and calls["predict_torch"] == []


class _FakeYolo:
    def __init__(self, boxes):
        self.boxes = boxes

    def predict(self, images):
        return [SegResult(np.full(im.shape[:2], 255, np.uint8), b, np.full(len(b), 0.7, np.float32))
                for im, b in zip(images, self.boxes)]


def test_yolo_sam_segmenter(sam, monkeypatch):
    boxes = [np.array([[10, 20, 60, 80]], np.float32), np.zeros((0, 4), np.float32)]
    refiner = SamRefiner(sam)
    calls = _spy(monkeypatch, refiner)
    images = [_image(100, 150), _image(80, 60, seed=1)]
    out = YoloSamSegmenter(_FakeYolo(boxes), refiner).predict(images)
    assert len(out) == 2 and len(calls["set_image"]) == 1
    assert out[0].mask.shape == (100, 150) and out[1].mask.shape == (80, 60)
    assert not out[1].mask.any()  # YOLO's all-255 mask is replaced by SAM's
    np.testing.assert_array_equal(out[0].boxes, boxes[0])
    np.testing.assert_array_equal(out[0].scores, np.float32([0.7]))


# --- checkpoints -------------------------------------------------------------------------------

@pytest.fixture
def tiny_manifest(tmp_path, monkeypatch):
    """A tmp weights dir + manifest holding a tiny SAM as ``sam_vit_b``; vit_b is built tiny."""
    import segment_anything

    state = tiny_sam(seed=1).state_dict()
    path = tmp_path / "tiny_sam.pth"
    torch.save(state, path)
    manifest = {"sam_vit_b": {"name": "sam_vit_b", "file": path.name, "url": "https://example.invalid/tiny_sam.pth",
                              "sha256": W.sha256_file(path), "license": "Apache-2.0", "kind": "sam"}}
    (tmp_path / "manifest.json").write_text(json.dumps({"weights": list(manifest.values())}))
    monkeypatch.setattr(W, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(W, "MANIFEST", tmp_path / "manifest.json")
    monkeypatch.setitem(segment_anything.sam_model_registry, "vit_b", lambda checkpoint=None: tiny_sam(seed=2))
    return path, state


def test_build_sam_loads_weights_only(tiny_manifest, monkeypatch):
    path, state = tiny_manifest
    seen = []
    real_load = torch.load

    def load(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load)
    sam = build_sam("vit_b")
    assert seen == [True]
    assert not sam.training
    for k, v in sam.state_dict().items():
        torch.testing.assert_close(v, state[k])


def test_build_sam_refuses_tampered_file(tiny_manifest):
    path, _ = tiny_manifest
    with open(path, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(WeightsError, match="sha256"):
        build_sam("vit_b")


class Payload:  # a pickled custom object: weights_only refuses it
    pass


def test_build_sam_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, path)
    with pytest.raises(WeightsError, match="weights-only"):
        build_sam("vit_b", checkpoint=path, manifest={})


def test_missing_checkpoint_message(tiny_manifest):
    path, _ = tiny_manifest
    path.unlink()
    with pytest.raises(WeightsError) as info:
        build_sam("vit_b")
    msg = str(info.value)
    assert str(path) in msg and "https://example.invalid/tiny_sam.pth" in msg
    assert "make weights" in msg and "--download sam_vit_b" in msg and "--model yolo" in msg


def test_real_manifest_lists_sam():
    manifest = W.load_manifest(W.MANIFEST)
    for name in SAM_CHECKPOINTS.values():
        entry = manifest[name]
        assert entry["kind"] == "sam" and entry["license"] == "Apache-2.0"
        assert entry["url"].endswith(entry["file"]) and len(entry["sha256"]) == 64


def test_build_sam_records_its_file_and_refuses_another_model_type(tiny_manifest, tmp_path):
    path, _ = tiny_manifest
    assert build_sam("vit_b").checkpoint_sha256 == W.sha256_file(path)  # what a resumed run compares
    entries = json.loads((tmp_path / "manifest.json").read_text())["weights"]
    entries.append({**entries[0], "name": "sam_vit_h", "model_type": "vit_h"})
    (tmp_path / "manifest.json").write_text(json.dumps({"weights": entries}))
    with pytest.raises(WeightsError, match="sam_vit_h is a SAM vit_h checkpoint, not vit_b: pass --sam-model vit_h"):
        build_sam("vit_b", checkpoint="sam_vit_h")


def test_yolo_sam_takes_its_boxes_from_the_yolo_segmenter(monkeypatch):
    # without --weights it took the overall default segmenter, a U-Net cascade
    import pipeline.segment.sam as sam_module
    from pipeline.config import ConfigError
    from pipeline.segment.yolo import YoloSegmenter
    from pipeline.segment.run import build_segmenter

    tiny = tiny_sam()
    tiny.checkpoint_sha256 = "f" * 64
    monkeypatch.setattr(sam_module, "build_sam", lambda *a, **k: tiny)
    seg = build_segmenter("yolo+sam")
    assert isinstance(seg, YoloSamSegmenter) and isinstance(seg.yolo, YoloSegmenter)
    assert seg.fingerprint["sam"] == ["vit_b", "f" * 64]
    with pytest.raises(ConfigError, match="needs a yolo checkpoint"):
        build_segmenter("yolo+sam", weights="seg-lite0-cascade")


def test_backend_auto_runs_a_yolo_segmenter_with_torch():
    # predict --backend auto picks ONNX Runtime on the CPU, which cannot run YOLO: that failed naming a flag not given
    from pipeline.cli import load_segmenter
    from pipeline.segment.yolo import YoloSegmenter

    assert isinstance(load_segmenter("seg-yolov8n-256", "cpu", "onnx", backend_chosen=False), YoloSegmenter)
    with pytest.raises(WeightsError, match="--backend onnx"):
        load_segmenter("seg-yolov8n-256", "cpu", "onnx")
