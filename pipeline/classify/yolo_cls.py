"""YOLOv8-cls baseline on the same split, the same inputs and the same image size as the CNNs.

The cached inputs (:mod:`pipeline.classify.data`) are written out as PNG class folders, the
layout ultralytics' classifier trains on, so the baseline sees exactly what the CNNs see.
Predictions come out in the ``predictions.csv`` format that ``compare`` reads.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np

from pipeline import CLASSES
from pipeline.classify.data import load_cache
from pipeline.config import REPO_ROOT
from pipeline.evaluate_cls import write_predictions

PRETRAINED_CLS = REPO_ROOT / "weights" / "yolov8n-cls.pt"


def export_cache_as_folders(caches: dict[str, str | os.PathLike], out: str | os.PathLike) -> Path:
    """Write ``out/<split>/<class>/<index>.png`` for each ``{split: cache.npz}``."""
    out = Path(out)
    for split, cache in caches.items():
        data = load_cache(cache)
        for c in CLASSES:  # an earlier export's images, of another (or an older) cache
            for old in (out / split / c).glob("*.png"):
                if re.fullmatch(r"\d{5,}\.png", old.name):
                    old.unlink()
        for i, (image, label) in enumerate(zip(data["images"], data["labels"])):
            folder = out / split / CLASSES[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / f"{i:05d}.png"), image)
    return out


def train_yolo_cls(data_dir: str | os.PathLike, out_dir: str | os.PathLike, imgsz: int = 128, epochs: int = 10,
                   batch: int = 64, device: str = "cpu", seed: int = 0, workers: int = 2,
                   time_hours: float | None = None) -> Path:
    """Train YOLOv8n-cls from ``weights/yolov8n-cls.pt`` when present, else from the YAML (offline)."""
    from pipeline.segment.yolo import offline_ultralytics

    offline_ultralytics()
    from ultralytics import YOLO

    out_dir = Path(out_dir).resolve()
    from pipeline.segment.yolo import verified_pretrained

    source = str(verified_pretrained("yolov8n-cls")) if PRETRAINED_CLS.is_file() else "yolov8n-cls.yaml"
    # ultralytics' classifier ignores ``degrees``: its geometric augmentation is a random resized
    # crop of 50-100 % of the area (``scale=0.5``, its default, kept so that earlier runs reproduce)
    # plus the flip; not the CNNs' rotation/affine
    cuda = str(device).startswith("cuda")
    kwargs = dict(data=str(Path(data_dir).resolve()), imgsz=imgsz, epochs=epochs, batch=batch,
                  device=device.replace("cuda:", "") if cuda else "cpu", seed=seed, deterministic=True,
                  workers=workers, project=str(out_dir.parent), name=out_dir.name, exist_ok=True, plots=False,
                  amp=cuda, pretrained=source.endswith(".pt"), verbose=False, fliplr=0.5, scale=0.5,
                  auto_augment=None, erasing=0.0, hsv_h=0.0, hsv_s=0.0, hsv_v=0.2)
    if time_hours:
        kwargs["time"] = time_hours
    YOLO(source).train(**kwargs)
    return out_dir / "weights" / "best.pt"


def predict_yolo_cls(weights: str | os.PathLike, cache: str | os.PathLike, out_csv: str | os.PathLike,
                     device: str = "cpu", batch: int = 64) -> Path:
    """Classify a cache with a trained YOLO-cls model; write ``predictions.csv`` for ``compare``."""
    from pipeline.segment.yolo import offline_ultralytics

    offline_ultralytics()
    from ultralytics import YOLO

    model = YOLO(str(weights), task="classify")
    names = model.names
    missing = [c for c in CLASSES if c not in names.values()]
    if missing:
        raise ValueError(f"{weights}: the YOLO-cls model has no class {', '.join(missing)} (it has "
                         f"{', '.join(map(str, names.values()))}); was it trained on a cache missing that class?")
    order = [next(k for k, v in names.items() if v == c) for c in CLASSES]
    data = load_cache(cache)
    imgsz = int(data["size"])
    probs = []
    for i in range(0, len(data["labels"]), batch):
        images = [cv2.cvtColor(im, cv2.COLOR_GRAY2BGR) for im in data["images"][i:i + batch]]
        probs += [res.probs.data.cpu().numpy()[order] for res in
                  model.predict(images, imgsz=imgsz, device=device, verbose=False)]
    # written whole or not at all: a run killed here keeps the previous file for compare
    return write_predictions(out_csv, [str(p) for p in data["paths"]], data["labels"],
                             np.asarray(probs, np.float64).reshape(-1, len(CLASSES)), found=data["found"])


def check_all_classes(cache: str | os.PathLike) -> None:
    """Raise ValueError naming the classes a train or val cache has no slice of (before any training)."""
    with np.load(cache) as data:  # the labels only: the images are read once, by the export
        labels = set(int(v) for v in data["labels"])
    missing = [c for i, c in enumerate(CLASSES) if i not in labels]
    if missing:
        raise ValueError(f"{cache}: no slice of class {', '.join(missing)}; YOLO-cls learns its classes "
                         f"from the folders it is given, so every class needs slices in train and val")
