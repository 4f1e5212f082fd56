"""Synthetic brain-like slices with exact tumor masks, for tests and a demo that needs no data.

Each class leaves a different trace, loosely like the real tumors: glioma is a large irregular
ring-enhancing mass inside a hemisphere, meningioma a bright round mass against the skull,
pituitary a small bright lesion at the skull base in the midline, notumor has no lesion.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import cv2
import numpy as np

from pipeline import CLASSES


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    noise = rng.standard_normal((size, size)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return noise / (noise.std() + 1e-6)


def make_phantom(label: str, size: int = 256, rng: np.random.Generator | int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic axial slice.

    Returns ``(image, mask)``, both ``(size, size)`` uint8; mask is 0/255 and all zero for notumor.
    """
    if label not in CLASSES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASSES}")
    rng = np.random.default_rng(rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy = size / 2 + rng.uniform(-0.03, 0.03) * size
    cx = size / 2 + rng.uniform(-0.03, 0.03) * size
    ry, rx = size * rng.uniform(0.38, 0.44), size * rng.uniform(0.30, 0.36)
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)

    image = np.zeros((size, size), np.float32)
    skull = (r > 0.92) & (r <= 1.0)
    brain = r <= 0.92
    image[skull] = 0.85
    tissue = 0.45 + 0.06 * _smooth_noise(rng, size, size / 40) + 0.03 * _smooth_noise(rng, size, size / 120)
    image[brain] = tissue[brain]
    # Ventricles: two dark crescents near the centre, as on a real axial slice.
    for side in (-1, 1):
        v = (((yy - cy) / (0.18 * ry)) ** 2 + ((xx - cx - side * 0.12 * rx) / (0.06 * rx)) ** 2) <= 1
        image[v] = 0.15

    mask = np.zeros((size, size), bool)
    if label != "notumor":
        if label == "glioma":
            radius = size * rng.uniform(0.09, 0.14)
            ang = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0.25, 0.5)
            ly, lx = cy + dist * ry * np.sin(ang), cx + dist * rx * np.cos(ang)
            theta = np.arctan2(yy - ly, xx - lx)
            wobble = 1 + 0.25 * np.sin(3 * theta + rng.uniform(0, 6)) + 0.15 * np.sin(5 * theta + rng.uniform(0, 6))
            rr = np.sqrt((yy - ly) ** 2 + (xx - lx) ** 2) / (radius * wobble)
            mask = (rr <= 1) & brain
            ring = mask & (rr > 0.7)
            image[mask] = 0.3 + 0.04 * _smooth_noise(rng, size, 2)[mask]
            image[ring] = 0.8
        elif label == "meningioma":
            radius = size * rng.uniform(0.06, 0.1)
            ang = rng.uniform(-np.pi, 0)
            ly, lx = cy + 0.8 * ry * np.sin(ang), cx + 0.8 * rx * np.cos(ang)
            rr = np.sqrt((yy - ly) ** 2 + (xx - lx) ** 2) / radius
            mask = (rr <= 1) & brain
            image[mask] = 0.9 + 0.03 * _smooth_noise(rng, size, 3)[mask]
        else:  # pituitary
            radius = size * rng.uniform(0.035, 0.055)
            ly, lx = cy + 0.55 * ry, cx + rng.uniform(-0.03, 0.03) * size
            rr = np.sqrt(((yy - ly) / (0.8 * radius)) ** 2 + ((xx - lx) / radius) ** 2)
            mask = (rr <= 1) & brain
            image[mask] = 0.95
    image += 0.02 * rng.standard_normal(image.shape).astype(np.float32)
    image = np.clip(image, 0, 1)
    image[r > 1.0] = 0
    return (image * 255).round().astype(np.uint8), (mask.astype(np.uint8) * 255)


def write_phantom_dataset(root: str | os.PathLike, n_per_class: int = 20, size: int = 256, seed: int = 0,
                          splits: dict[str, float] | None = None) -> Path:
    """Write a phantom dataset in the Kaggle layout plus masks.

    Layout: ``root/<split>/<class>/<name>.png`` and ``root/masks/<split>/<class>/<name>.png``
    (the mask tree mirrors the image tree), plus the Training slices with a tumor again in the
    figshare layout (``root/seg/images``, ``root/seg/masks``, ``root/seg/labels.csv``) so the
    segmenter's data preparation runs on phantoms unchanged. ``splits`` maps split names to their
    share of ``n_per_class``; default ``{"Training": 0.75, "Testing": 0.25}``.
    """
    root = Path(root)
    splits = splits or {"Training": 0.75, "Testing": 0.25}
    _clear_earlier_phantoms(root, [*splits, "masks", "seg"])
    rng = np.random.default_rng(seed)
    seg_labels = []
    for split, share in splits.items():
        count = max(1, round(n_per_class * share))
        for label in CLASSES:
            img_dir = root / split / label
            mask_dir = root / "masks" / split / label
            img_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image, mask = make_phantom(label, size, rng)
                name = f"{split[:2].lower()}-{label[:2]}_{i:04d}.png"
                _write_png(img_dir / name, image)
                _write_png(mask_dir / name, mask)
                if split == "Training" and label != "notumor":
                    (root / "seg" / "images").mkdir(parents=True, exist_ok=True)
                    (root / "seg" / "masks").mkdir(parents=True, exist_ok=True)
                    stem = Path(name).stem
                    _write_png(root / "seg" / "images" / name, image)
                    _write_png(root / "seg" / "masks" / name, mask)
                    seg_labels.append(f"{stem},{label}\n")
    if seg_labels:
        (root / "seg" / "labels.csv").write_text("id,label\n" + "".join(seg_labels))
    return root


#: The folders a phantom run wrote under its root; only those are ever removed by a later run.
PHANTOM_RECORD = ".phantoms.json"


def _clear_earlier_phantoms(root: Path, names: list[str]) -> None:
    """Remove what an earlier run wrote, so a rerun with fewer slices or another seed leaves no
    stale file behind; a folder of the same name that no run of ours wrote is refused, not removed."""
    record = root / PHANTOM_RECORD
    try:
        ours = set(json.loads(record.read_text()))
    except (OSError, ValueError, TypeError):
        ours = set()
    # only plain names directly under root are ever removed, whatever the record says
    ours = {n for n in ours if isinstance(n, str) and n not in ("", ".", "..") and Path(n).name == n}
    # a folder from before the record existed is ours when it holds phantom files only (or nothing)
    ours |= {n for n in names if (root / n).is_dir() and not (root / n).is_symlink() and _phantom_files_only(root / n)}
    clash = [n for n in names if (root / n).exists() and n not in ours]
    if clash:
        raise FileExistsError(f"{root / clash[0]}: exists and was not written by `phantoms`; "
                              "give an empty or new folder")
    root.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(sorted(ours | set(names))))  # first, so a killed run is cleared next time
    for name in ours:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


_PHANTOM_NAME = re.compile(r"[a-z]{2}-[a-z]{2}_\d{4}\.png")


def _phantom_files_only(folder: Path) -> bool:
    """Every file under ``folder`` is one a phantom run writes (its PNG names, seg's labels.csv)."""
    return all(_PHANTOM_NAME.fullmatch(f.name) or f.name == "labels.csv"
               for f in folder.rglob("*") if not f.is_dir())


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):  # OpenCV reports a failed write by its return value only
        raise OSError(f"{path}: could not be written")
