"""SAM refinement of YOLO boxes: one image embedding per scan, all of its boxes in one batched prompt.

SAM's own builder opens its checkpoint with a plain ``torch.load`` (a pickle that may run code);
:func:`build_sam` builds the network empty and loads a sha256-checked state dict with
``weights_only=True`` instead.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from pipeline import weights as _weights
from pipeline.segment.yolo import SegResult
from pipeline.weights import WeightsError

SAM_CHECKPOINTS = {"vit_b": "sam_vit_b", "vit_l": "sam_vit_l", "vit_h": "sam_vit_h"}


def build_sam(model_type: str = "vit_b", checkpoint: str | os.PathLike | None = None, device: str = "cpu",
              manifest: dict | None = None):
    """A ``segment_anything.Sam`` in eval mode with verified weights.

    ``checkpoint``: a manifest name or a path; default the manifest entry of ``model_type``
    (``SAM_CHECKPOINTS``). ``manifest`` defaults to ``weights/manifest.json``.
    """
    import torch
    from segment_anything import sam_model_registry

    if model_type not in SAM_CHECKPOINTS:
        raise WeightsError(f"SAM model type {model_type!r}: expected one of {', '.join(SAM_CHECKPOINTS)}")
    manifest = _weights.load_manifest(_weights.MANIFEST) if manifest is None else manifest
    name = str(checkpoint) if checkpoint is not None else SAM_CHECKPOINTS[model_type]
    entry = manifest.get(name)
    if checkpoint is None and entry is None:
        raise WeightsError(f"{name}: not listed in {_weights.MANIFEST}; pass a checkpoint path")
    if entry is not None and entry.get("model_type", model_type) != model_type:
        raise WeightsError(f"{name} is a SAM {entry['model_type']} checkpoint, not {model_type}: pass "
                           f"--sam-model {entry['model_type']}")
    if entry is not None and not (_weights.WEIGHTS_DIR / entry["file"]).is_file():
        raise WeightsError(
            f"SAM checkpoint missing: {_weights.WEIGHTS_DIR / entry['file']} (manifest entry {name!r}). "
            f"Run `python -m pipeline weights --download {name}` (`make weights` fetches sam_vit_b), which downloads "
            f"{entry.get('url')}, or copy the file there by hand. `--model yolo` works without it.")
    path = _weights.resolve(name, manifest=manifest)  # sha256-checked when the manifest lists it
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: not a loadable weights-only SAM checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    sam = sam_model_registry[model_type](checkpoint=None)
    try:
        sam.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise WeightsError(f"{path}: does not fit SAM {model_type} ({exc})"[:2000]) from exc
    # resumed runs must use the same weights; a listed file was just checked against the manifest's sha256
    sam.checkpoint_sha256 = (entry or {}).get("sha256") or _weights.sha256_file(path)
    return sam.to(device).eval()


class SamRefiner:
    """Box-prompted SAM masks for gray (H, W) uint8 images.

    ``multimask``: ask for SAM's 3 candidate masks per box and keep the one with the best predicted
    IoU. ``use_center_point``: add each box's centre as a foreground click.
    """

    def __init__(self, sam_model, multimask: bool = True, use_center_point: bool = True):
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(sam_model)
        self.multimask, self.use_center_point = multimask, use_center_point

    def refine(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Union of SAM's masks for ``boxes`` (K, 4) x0, y0, x1, y1 in image pixels -> (H, W) uint8 0/255.

        ``image`` (H, W) gray, or (H, W, 3) taken as BGR like the YOLO segmenter.
        """
        import torch

        h, w = image.shape[:2]
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return np.zeros((h, w), np.uint8)
        boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
        if image.ndim == 2:
            self.predictor.set_image(np.ascontiguousarray(np.stack([image] * 3, axis=-1)), image_format="RGB")
        else:
            self.predictor.set_image(np.ascontiguousarray(image), image_format="BGR")
        p = self.predictor
        device = p.device
        box_t = p.transform.apply_boxes_torch(torch.as_tensor(boxes, device=device), (h, w))
        coords = labels = None
        if self.use_center_point:
            centres = torch.as_tensor((boxes[:, :2] + boxes[:, 2:]) / 2, device=device)[:, None, :]  # (K, 1, 2)
            coords = p.transform.apply_coords_torch(centres, (h, w))
            labels = torch.ones(coords.shape[:2], dtype=torch.int, device=device)  # (K, 1)
        masks, scores, _ = p.predict_torch(point_coords=coords, point_labels=labels, boxes=box_t,
                                           multimask_output=self.multimask)
        # masks (K, C, H, W) bool at the original size, scores (K, C)
        if tuple(masks.shape[-2:]) != (h, w):
            raise RuntimeError(f"SAM returned masks of {tuple(masks.shape[-2:])}, expected {(h, w)}")
        best = scores.argmax(dim=1)
        chosen = masks[torch.arange(len(best), device=masks.device), best]  # (K, H, W)
        return (chosen.any(dim=0).cpu().numpy().astype(np.uint8) * 255)


class YoloSamSegmenter:
    """YOLO finds the boxes, SAM draws the masks; same ``predict(images) -> list[SegResult]`` as YOLO.

    ``yolo``: anything with ``.predict(images) -> list[SegResult]``. Boxes and scores are YOLO's.
    """

    name = "yolo+sam"

    def __init__(self, yolo, refiner: SamRefiner):
        self.yolo, self.refiner = yolo, refiner

    def predict(self, images: Sequence[np.ndarray]) -> list[SegResult]:
        """Each image (H, W) uint8 (or (H, W, 3) BGR); masks come back (H, W) uint8 0/255."""
        out = []
        for image, res in zip(images, self.yolo.predict(images)):
            mask = self.refiner.refine(image, res.boxes)
            out.append(SegResult(mask, res.boxes, res.scores))
        return out
