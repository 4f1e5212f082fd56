"""Where a U-Net cascade loses Dice: a development tool for the validation split (the default;
the held-out test split is for reporting, and Kaggle Testing has no masks).

For every tumor slice it compares the cascade's mask with the fine net's mask given the true
lesion box (an oracle localiser), and measures how the coarse net's largest region differs from
the lesion box. ``missed`` slices got no mask: ``regions`` in ``slices.csv`` tells whether the
coarse net found nothing (0) or the fine net drew nothing where it did. Slices below Dice 0.5
that got a mask are sorted into (the geometry is of the largest coarse region only; the fine
net redraws up to two):

- ``elsewhere``: the coarse box covers under 10 % of the lesion box (a wrong region);
- ``over``: the mask is over 1.5x the lesion's area;
- ``under``: the mask is under 0.6x the lesion's area;
- ``misplaced``: about the right size, in the wrong place.

Writes ``diagnosis.json`` (summary) and ``slices.csv`` (one row per tumor slice).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipeline.folders import read_image_file
from pipeline.scans import read_scan

CATEGORIES = ("elsewhere", "over", "under", "misplaced")


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred > 0, truth > 0
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2 * (p & t).sum() / denom)


def box_geometry(found: Sequence[float], truth: Sequence[float]) -> dict:
    """Found box vs lesion box (x0, y0, x1, y1): longer-side ratio, centre offset in lesion sides
    (per axis, the larger), and the share of the lesion box the found box covers."""
    fw, fh = found[2] - found[0], found[3] - found[1]
    tw, th = truth[2] - truth[0], truth[3] - truth[1]
    side = max(tw, th)
    ix = max(0.0, min(found[2], truth[2]) - max(found[0], truth[0]))
    iy = max(0.0, min(found[3], truth[3]) - max(found[1], truth[1]))
    return {"side_ratio": float(max(fw, fh) / side),
            "centre_offset": float(max(abs((found[0] + found[2]) - (truth[0] + truth[2])),
                                       abs((found[1] + found[3]) - (truth[1] + truth[3]))) / 2 / side),
            "lesion_covered": float(ix * iy / (tw * th))}


def category(dice_value: float, area_ratio: float, lesion_covered: float | None) -> str:
    """``ok``, ``missed`` or one of :data:`CATEGORIES` for a slice (see the module docstring)."""
    if area_ratio == 0:
        return "missed"
    if dice_value >= 0.5:
        return "ok"
    if lesion_covered is not None and lesion_covered < 0.1:
        return "elsewhere"
    if area_ratio > 1.5:
        return "over"
    if area_ratio < 0.6:
        return "under"
    return "misplaced"


def summarise(rows: list[dict]) -> dict:
    """Means, counts per category and box statistics over :func:`diagnose_cascade` rows."""
    def pct(key, qs):
        values = [r[key] for r in rows if r.get(key) is not None]
        return {f"p{q}": round(float(np.percentile(values, q)), 3) for q in qs} if values else {}

    counts = {c: sum(r["category"] == c for r in rows) for c in ("ok", "missed", *CATEGORIES)}
    return {"n_tumor": len(rows),
            "mean_dice": float(np.mean([r["dice"] for r in rows])),
            "mean_dice_true_box": float(np.mean([r["dice_true_box"] for r in rows])),
            "detection_rate": float(np.mean([r["category"] != "missed" for r in rows])),
            "categories": counts,
            "bad_with_true_box_dice_below_0.5": sum(r["category"] not in ("ok", "missed") and r["dice_true_box"] < 0.5
                                                    for r in rows),
            "coarse_box_side_ratio": pct("side_ratio", (5, 10, 50, 90, 95)),
            "coarse_box_centre_offset": pct("centre_offset", (50, 75, 90, 95))}


def diagnose_cascade(seg, images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                     names: Sequence[str] | None = None, source: str = "segmenter",
                     chunk: int = 64) -> list[dict]:
    """One row per (H, W) uint8 image with a non-empty (H, W) truth mask; ``seg`` a
    :class:`pipeline.segment.unet.UNetCascadeSegmenter` without ``boxes_from`` (``source`` names
    it in the error otherwise). Images go through the nets ``chunk`` at a time, so memory does
    not grow with the split."""
    if not hasattr(seg, "coarse_regions") or getattr(seg, "boxes_from", None) is not None:
        raise ValueError(f"{source}: diagnose-seg needs a U-Net cascade segmenter (coarse and fine nets)")
    names = list(names) if names is not None else [str(i) for i in range(len(images))]
    if not len(names) == len(images) == len(truths):
        raise ValueError(f"{len(images)} images, {len(truths)} truth masks and {len(names)} names: one each")
    rows = []
    for i in range(0, len(images), chunk):
        rows += _diagnose_chunk(seg, list(images[i:i + chunk]), truths[i:i + chunk], names[i:i + chunk])
    return rows


def _diagnose_chunk(seg, images: list[np.ndarray], truths: Sequence[np.ndarray], names: Sequence[str]) -> list[dict]:
    from pipeline.segment.unet import crop_square, lesion_box, paste_square, square_box

    truths = [t > 127 if t.dtype == np.uint8 else t > 0 for t in truths]
    preds = seg.predict(images)
    regions = seg.coarse_regions(images)
    oracle_boxes = [square_box(lesion_box(t), seg.margin, *t.shape) for t in truths]
    oracle = seg._probs(seg.fine, [crop_square(seg_image, sq, seg.fine_size)
                                    for seg_image, sq in zip(images, oracle_boxes)])
    rows = []
    for name, t, pred, rs, sq, p in zip(names, truths, preds, regions, oracle_boxes, oracle):
        d = dice(pred.mask, t)
        area_ratio = float((pred.mask > 0).sum() / t.sum())
        geometry = box_geometry(rs[0]["box"], lesion_box(t)) if rs else {}
        rows.append({"name": name, "dice": round(d, 4),
                     "dice_true_box": round(dice(paste_square(p, sq, *t.shape) > 0.5, t), 4),
                     "area_ratio": round(area_ratio, 3), "regions": len(rs),
                     **{k: round(v, 3) for k, v in geometry.items()},
                     "category": category(d, area_ratio, geometry.get("lesion_covered"))})
    return rows


def diagnose(weights: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
             split: str = "val", device: str = "cpu") -> dict:
    """Run :func:`diagnose_cascade` on ``data_dir/images/<split>`` (from ``seg-data``); write the files."""
    from pipeline.segment.load import load_segmenter

    data_dir, out = Path(data_dir), Path(out_dir)
    folder = data_dir / "images" / split
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such split folder (run `seg-data`)")
    images, truths, names = [], [], []
    for path in sorted(folder.iterdir()):
        mask_path = data_dir / "masks" / split / f"{path.stem}.png"
        truth = read_image_file(mask_path, cv2.IMREAD_GRAYSCALE) if mask_path.is_file() else None
        if truth is None or not (truth > 127).any():
            continue  # no-tumor slices: tune-seg and evaluate-seg count their false masks
        images.append(read_scan(path).image)
        truths.append(truth)
        names.append(path.name)
    if not images:
        raise FileNotFoundError(f"{folder}: no tumor slices with masks")
    rows = diagnose_cascade(load_segmenter(weights, device=device), images, truths, names, source=str(weights))
    result = {"weights": str(weights), "split": split, **summarise(rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps(result, indent=2))
    with (out / "slices.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)), restval="")
        writer.writeheader()
        writer.writerows(rows)
    return result


def add_arguments(p) -> None:
    p.add_argument("--weights", required=True, help="U-Net cascade checkpoint (a file or a manifest name)")
    p.add_argument("--data", required=True, help="folder from `seg-data` (images/<split>, masks/<split>)")
    p.add_argument("--out", required=True, help="folder for diagnosis.json and slices.csv")
    p.add_argument("--split", default="val", help="split folder of seg-data to read (default val: choose on "
                                                     "validation; test is the held-out split, for reporting)")


def run(args) -> int:
    result = diagnose(args.weights, args.data, args.out, args.split, args.device or "cpu")
    print(json.dumps(result, indent=2))
    return 0
