"""YOLOv8-seg: training offline and batched inference that returns full-resolution masks.

Ultralytics reaches out to the network for fonts, hub sync, pretrained checkpoints and its AMP
check; :func:`offline_ultralytics` turns off what can be turned off, and training uses
``plots=False`` (plots fetch a font) and ``amp`` only on CUDA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipeline.config import REPO_ROOT

PRETRAINED_SEG = REPO_ROOT / "weights" / "yolov8n-seg.pt"


def offline_ultralytics() -> None:
    """Keep ultralytics from phoning home (hub sync, analytics); safe to call many times."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics.utils import SETTINGS

    if SETTINGS.get("sync", False):
        SETTINGS.update({"sync": False})


def verified_pretrained(name: str) -> Path:
    """A pretrained ultralytics checkpoint from the manifest, only if its sha256 is recorded and matches.

    Ultralytics ``.pt`` files are pickles, so an unrecorded file is refused rather than opened.
    """
    from pipeline.weights import WeightsError, load_manifest, resolve

    entry = load_manifest().get(name)
    if not entry or not entry.get("sha256"):
        raise WeightsError(f"{name}: no sha256 recorded in weights/manifest.json, so the file is not opened "
                           f"(it is a pickle). `python -m pipeline weights --download {name}` fetches it and "
                           f"records its sha256; a copy placed by hand, once checked against the publisher's "
                           f"sha256, is recorded by `python -m pipeline weights --record {name}`; or remove it "
                           f"to train from the YAML")
    return resolve(name)


def train_yolo_seg(data_yaml: str | os.PathLike, out_dir: str | os.PathLike, imgsz: int = 256, epochs: int = 30,
                   batch: int = 16, device: str = "cpu", seed: int = 0, workers: int = 2,
                   model: str | None = None, patience: int = 10, time_hours: float | None = None,
                   resume: bool = False) -> Path:
    """Train YOLOv8n-seg; from ``weights/yolov8n-seg.pt`` when present, else from the YAML.

    Returns the path of ``best.pt``. ``time_hours`` caps wall time (ultralytics' ``time``).
    """
    offline_ultralytics()
    from ultralytics import YOLO

    out_dir = Path(out_dir).resolve()  # ultralytics nests a relative project under runs/<task>/
    last = out_dir / "weights" / "last.pt"
    if resume and last.is_file():
        yolo = YOLO(str(last))
        yolo.train(resume=True)
        return out_dir / "weights" / "best.pt"
    source = model or (str(verified_pretrained("yolov8n-seg")) if PRETRAINED_SEG.is_file() else "yolov8n-seg.yaml")
    yolo = YOLO(source)
    cuda = str(device).startswith("cuda")
    kwargs = dict(data=str(data_yaml), imgsz=imgsz, epochs=epochs, batch=batch, device=device.replace("cuda:", "")
                  if cuda else "cpu", seed=seed, deterministic=True, workers=workers, project=str(out_dir.parent),
                  name=out_dir.name, exist_ok=True, plots=False, amp=cuda, cache="ram", patience=patience,
                  pretrained=source.endswith(".pt"), single_cls=True, verbose=False, val=True,
                  degrees=10.0, fliplr=0.5, scale=0.3, translate=0.1, mosaic=1.0, close_mosaic=3)
    if time_hours:
        kwargs["time"] = time_hours
    yolo.train(**kwargs)
    return out_dir / "weights" / "best.pt"


@dataclass
class SegResult:
    """One slice's segmentation: ``mask`` (H, W) uint8 0/255 at the input's size."""

    mask: np.ndarray
    boxes: np.ndarray   # (K, 4) x0, y0, x1, y1 in input pixels
    scores: np.ndarray  # (K,)

    @property
    def found(self) -> bool:
        return len(self.scores) > 0 and bool(self.mask.any())


class YoloSegmenter:
    """Batched YOLOv8-seg inference on gray (H, W) uint8 slices of any size.

    ``conf`` is the detection threshold (chosen on the validation split); ``max_det`` instances
    are merged into one tumor mask per slice.
    """

    name = "yolo"

    def __init__(self, weights: str | os.PathLike, imgsz: int = 256, conf: float = 0.25, iou: float = 0.5,
                 device: str = "cpu", max_det: int = 3, half: bool = False):
        offline_ultralytics()
        from ultralytics import YOLO

        self.model = YOLO(str(weights), task="segment")
        self.imgsz, self.conf, self.iou, self.device, self.max_det = imgsz, conf, iou, device, max_det
        self.half = half and str(device).startswith("cuda")

    def predict(self, images: Sequence[np.ndarray]) -> list[SegResult]:
        """Segment a batch; each image (H, W) uint8 (or (H, W, 3)). Masks come back at (H, W)."""
        bgr = [cv2.cvtColor(im, cv2.COLOR_GRAY2BGR) if im.ndim == 2 else im for im in images]
        extra = {"half": True} if self.half else {}
        results = self.model.predict(bgr, imgsz=self.imgsz, conf=self.conf, iou=self.iou, device=self.device,
                                     max_det=self.max_det, verbose=False, retina_masks=False, **extra)
        out = []
        for image, res in zip(bgr, results):
            h, w = image.shape[:2]
            mask = np.zeros((h, w), np.uint8)
            if res.boxes is None or len(res.boxes) == 0:
                out.append(SegResult(mask, np.zeros((0, 4), np.float32), np.zeros(0, np.float32)))
                continue
            boxes = res.boxes.xyxy.cpu().numpy().astype(np.float32)
            scores = res.boxes.conf.cpu().numpy().astype(np.float32)
            if res.masks is not None:
                # Masks come at the letterboxed network size; map them back through ultralytics' own
                # polygon output, which is already in original-image coordinates.
                for poly in res.masks.xy:
                    if len(poly) >= 3:
                        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 255)
            out.append(SegResult(mask, boxes, scores))
        return out
