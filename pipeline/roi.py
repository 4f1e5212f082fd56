"""Regions of interest: turn a slice and its tumor mask into the classifier's input.

Three input modes, one function, so training and inference cannot drift apart:

- ``full``: the whole head, square-cropped (see :mod:`pipeline.preprocess`).
- ``crop``: a square around the tumor box, enlarged by ``margin`` to keep surrounding tissue.
- ``masked``: the same crop with everything outside the dilated tumor mask set to zero.

When no tumor was found (empty mask) ``crop`` and ``masked`` fall back to ``full`` and report
``found=False``; that fallback is part of the contract, not an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from pipeline.preprocess import crop_to_head, resize_square, square_crop

MODES = ("full", "crop", "masked")


@dataclass
class ROI:
    found: bool
    box: tuple[int, int, int, int] | None  # x0, y0, x1, y1 (exclusive) in image pixels
    area_px: int


def mask_roi(mask: np.ndarray | None, min_area: int = 1) -> ROI:
    """Tumor box of a (H, W) mask (any nonzero pixel is tumor)."""
    if mask is None:
        return ROI(False, None, 0)
    fg = mask > 0
    area = int(fg.sum())
    if area < min_area:
        return ROI(False, None, area)
    ys, xs = np.nonzero(fg)
    return ROI(True, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), area)


def make_input(image: np.ndarray, mode: str, size: int, mask: np.ndarray | None = None,
               margin: float = 0.25, dilate_px: int = 8, min_side: int = 48) -> tuple[np.ndarray, ROI]:
    """The classifier input for one slice.

    ``image``: (H, W) uint8; ``mask``: (H, W) 0/255 or None. Returns ``((size, size) uint8, roi)``.
    ``min_side`` keeps tiny tumors from being blown up into a few smeared pixels.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mask is not None and mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape[:2]}")
    roi = mask_roi(mask)
    if mode == "full" or not roi.found:
        return crop_to_head(image, size)[0], roi
    x0, y0, x1, y1 = roi.box
    grow = max(0, min_side - max(x1 - x0, y1 - y0)) / 2
    box = (int(x0 - grow), int(y0 - grow), int(np.ceil(x1 + grow)), int(np.ceil(y1 + grow)))
    source = image
    if mode == "masked":
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
        keep = cv2.dilate((mask > 0).astype(np.uint8), kernel) > 0
        source = np.where(keep, image, 0).astype(image.dtype)
    return resize_square(square_crop(source, box, margin), size), roi


#: What a classifier reads: ``(mode, size, margin)``; ``margin`` is None for ``full`` (it reads no ROI).
View = tuple[str, int, "float | None"]


def view_of(mode: str, size: int, margin: float | None = 0.25) -> View:
    """The canonical key of an input: two crops differ by their margin, whole slices never do."""
    return (mode, int(size), None if mode == "full" else float(0.25 if margin is None else margin))


def make_views(images: Sequence[np.ndarray], masks: Sequence[np.ndarray | None],
               views: Sequence[View]) -> dict[View, np.ndarray]:
    """``{view: (B, size, size) uint8}`` for each view of each (H, W) slice and its mask (or None)."""
    return {(m, size, margin): np.stack([make_input(im, m, size, mask, margin=0.25 if margin is None else margin)[0]
                                         for im, mask in zip(images, masks)])
            for m, size, margin in views}
