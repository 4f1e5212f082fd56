"""Stand-ins shared by tests: cheap, deterministic replacements for trained models."""
from __future__ import annotations

import cv2
import numpy as np

from pipeline.segment.yolo import SegResult


class BrightBlobSegmenter:
    """Stands in for YOLO: marks bright pixels inside the skull as tumor."""

    def predict(self, images):
        out = []
        for im in images:
            k = max(3, im.shape[0] // 12)
            inside = cv2.erode((im > 20).astype(np.uint8), np.ones((k, k), np.uint8))
            mask = np.where((im > 225) & (inside > 0), 255, 0).astype(np.uint8)
            mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
            found = bool(mask.any())
            out.append(SegResult(mask, np.zeros((int(found), 4), np.float32), np.ones(int(found), np.float32)))
        return out


def phantom_cls_caches(root, per_class: dict[str, int], size: int, seed: int = 0):
    """Classifier caches of phantoms, one ``root/<split>.npz`` per entry (``{"train": 6, ...}``
    slices per class), in the format ``crop`` writes for ``full`` inputs. Returns ``root``."""
    from pathlib import Path

    from pipeline import CLASSES
    from pipeline.phantoms import make_phantom

    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        labels = np.repeat(np.arange(len(CLASSES)), n)
        images = np.stack([make_phantom(CLASSES[k], size, rng)[0] for k in labels])
        np.savez(root / f"{split}.npz", images=images, labels=labels,
                 paths=np.array([f"{split}/{CLASSES[k]}/{i}.png" for i, k in enumerate(labels)]),
                 found=np.zeros(len(labels), bool), mode=np.array("full"), size=np.array(size))
    return root
