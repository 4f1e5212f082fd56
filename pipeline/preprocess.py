"""Slice-level preprocessing shared by every stage: crop to the head, square, resize.

Cropping every slice to the head first removes the framing cue: in the Kaggle set the
no-tumor source is tightly cropped while tumor sources show the whole head with margins,
so an uncropped classifier can learn the framing instead of the tumor.
"""
from __future__ import annotations

import cv2
import numpy as np


def head_box(image: np.ndarray, threshold: int | None = None) -> tuple[int, int, int, int]:
    """Bounding box ``(x0, y0, x1, y1)`` (x1/y1 exclusive) of the largest bright component.

    ``image``: (H, W) uint8. The threshold defaults to a fraction of Otsu's so dark tissue
    inside the skull still counts. An empty image gives the whole frame.
    """
    h, w = image.shape[:2]
    small_scale = 256 / max(h, w)
    small = cv2.resize(image, (max(1, round(w * small_scale)), max(1, round(h * small_scale))),
                       interpolation=cv2.INTER_AREA) if small_scale < 1 else image
    blurred = cv2.GaussianBlur(small, (5, 5), 0)
    if threshold is None:
        otsu, _ = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(8, int(otsu * 0.35))
    fg = (blurred > threshold).astype(np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    if n <= 1:
        return 0, 0, w, h
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, bw, bh = stats[largest, :4]
    scale = 1 / small_scale if small_scale < 1 else 1.0
    x0, y0 = int(np.floor(x * scale)), int(np.floor(y * scale))
    x1, y1 = int(np.ceil((x + bw) * scale)), int(np.ceil((y + bh) * scale))
    return max(0, x0), max(0, y0), min(w, x1), min(h, y1)


#: The largest crop margin accepted: 10 x the lesion box on each side is already a 21 x wider square.
MAX_MARGIN = 10.0


def square_crop(image: np.ndarray, box: tuple[int, int, int, int], margin: float = 0.0) -> np.ndarray:
    """Crop ``box`` enlarged by ``margin`` (fraction of its longer side) to a square, zero-padded.

    ``image``: (H, W) or (H, W, C). Returns (S, S[, C]) with S the enlarged longer side.
    """
    if not 0 <= margin <= MAX_MARGIN:  # below 0 the square shrinks to nothing; far above, it fills memory
        raise ValueError(f"margin must be between 0 and {MAX_MARGIN:g}, got {margin}")
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0, 1)
    side = int(round(side * (1 + 2 * margin)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sx0, sy0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    out = np.zeros((side, side) + image.shape[2:], image.dtype)
    h, w = image.shape[:2]
    ix0, iy0, ix1, iy1 = max(0, sx0), max(0, sy0), min(w, sx0 + side), min(h, sy0 + side)
    if ix1 > ix0 and iy1 > iy0:
        out[iy0 - sy0:iy1 - sy0, ix0 - sx0:ix1 - sx0] = image[iy0:iy1, ix0:ix1]
    return out


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a square image to ``(size, size)`` (area when shrinking, linear when growing)."""
    interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def crop_to_head(image: np.ndarray, size: int | None = None, margin: float = 0.02
                 ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Square crop around the head, optionally resized. Returns ``(crop, head_box)``."""
    box = head_box(image)
    crop = square_crop(image, box, margin)
    return (resize_square(crop, size) if size else crop), box
