"""Choose the segmenter's detection threshold on the validation split (never on Testing).

The rule: the highest mean Dice on validation tumor slices among thresholds whose false-mask
rate on validation no-tumor slices stays within ``max_false_rate``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from pipeline.folders import read_image_file
from pipeline.scans import read_scan


SLICE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".dcm")  # 2D scans; volumes are not slices


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred > 0, truth > 127
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2 * (p & t).sum() / denom)


def choose_conf(table: list[dict], max_false_rate: float) -> dict:
    """The row with the highest mean Dice among those within the false-mask budget; else the fewest false masks.
    Ties go to fewer false masks, then to the higher threshold (the stricter one)."""
    ok = [r for r in table if r["false_mask_rate"] is None or r["false_mask_rate"] <= max_false_rate]
    if ok:
        return max(ok, key=lambda r: (r["mean_dice"] or 0, -(r["false_mask_rate"] or 0), r["conf"]))
    return min(table, key=lambda r: (r["false_mask_rate"], -(r["mean_dice"] or 0)))


def tune_conf(weights: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
              confs: Sequence[float] = (0.1, 0.25, 0.4, 0.55), max_false_rate: float = 0.03,
              device: str = "cpu", batch: int = 16, min_areas: Sequence[int] = (None,),
              extra_no_tumor: Sequence[str | os.PathLike] = (), refines: Sequence[int] = (None,)) -> dict:
    """Score each threshold on ``data_dir/images/val`` (from ``seg-data``) and write ``tune.json``.

    ``min_areas`` (U-Net cascade only): smallest coarse region kept, swept with each threshold.
    ``refines`` (U-Net cascade only): extra fine passes on the fine net's own box, swept likewise.
    ``extra_no_tumor``: more no-tumor scans (files, folders, or ``.txt`` lists of paths) counted with the
    validation ones in the false-mask rate; one already among them (same file) counts once.
    """
    from pipeline.segment.load import load_segmenter

    data_dir, out = Path(data_dir), Path(out_dir)
    images = sorted((data_dir / "images" / "val").iterdir())
    if not images:
        raise FileNotFoundError(f"{data_dir}/images/val: no validation images (run `seg-data`)")
    mask_paths = [data_dir / "masks" / "val" / f"{p.stem}.png" for p in images]  # background slices have none
    truths = [read_image_file(m, cv2.IMREAD_GRAYSCALE) if m.is_file() else None for m in mask_paths]
    seen, extra = {p.resolve() for p in images}, []
    for p in _scan_paths(extra_no_tumor):
        if p.resolve() not in seen:
            seen.add(p.resolve())
            extra.append(p)
    images += extra
    truths += [None] * (len(images) - len(truths))
    scans = [read_scan(p).image for p in images]
    table = []
    for conf, min_area, refine in [(c, a, k) for c in confs for a in min_areas for k in refines]:
        seg = load_segmenter(weights, device=device, conf=conf)
        for attr, value, flag in (("min_area", min_area, "--min-areas"), ("refine", refine, "--refines")):
            if value is not None:
                if not hasattr(seg, attr):
                    raise ValueError(f"{weights}: {flag} applies to the U-Net cascade only")
                setattr(seg, attr, int(value))
        preds = [r.mask for i in range(0, len(scans), batch) for r in seg.predict(scans[i:i + batch])]
        tumor = [(p, t) for p, t in zip(preds, truths) if t is not None and (t > 127).any()]
        healthy = [p for p, t in zip(preds, truths) if t is None or not (t > 127).any()]
        table.append({"conf": conf, **({"min_area": int(min_area)} if min_area is not None else {}),
                      **({"refine": int(refine)} if refine is not None else {}),
                      "n_tumor": len(tumor), "n_no_tumor": len(healthy),
                      "mean_dice": float(np.mean([_dice(p, t) for p, t in tumor])) if tumor else None,
                      "detection_rate": float(np.mean([p.any() for p, _ in tumor])) if tumor else None,
                      "false_mask_rate": float(np.mean([p.any() for p in healthy])) if healthy else None})
    best = choose_conf(table, max_false_rate)
    result = {"weights": str(weights), "split": "val", "max_false_rate": max_false_rate, "table": table,
              "n_extra_no_tumor": len(extra),
              "chosen_conf": best["conf"], "chosen_min_area": best.get("min_area"),
              **({"chosen_refine": best["refine"]} if "refine" in best else {}), "rule": "highest mean Dice with false-mask rate <= max_false_rate"}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(result, indent=2))
    return result


def _scan_paths(items: Sequence[str | os.PathLike]) -> list[Path]:
    from pipeline.folders import iter_input_files

    paths = []
    for item in map(Path, items):
        if item.is_dir():
            paths += [p for p in iter_input_files(item) if p.suffix.lower() in SLICE_SUFFIXES]
        elif item.suffix.lower() == ".txt":
            paths += [Path(line.strip()) for line in item.read_text().splitlines() if line.strip()]
        else:
            paths.append(item)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such no-tumor scan ({len(missing)} missing)")
    return paths


def _passes(text: str) -> int:
    import argparse

    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a number of passes is 0 or more")
    return value


def add_arguments(p) -> None:
    p.add_argument("--weights", required=True, help="segmenter checkpoint (weights-only, from `export`)")
    p.add_argument("--data", required=True, help="YOLO-seg dataset folder from `seg-data` (uses images/val)")
    p.add_argument("--out", required=True, help="folder for tune.json")
    p.add_argument("--confs", type=float, nargs="+", default=[0.1, 0.25, 0.4, 0.55])
    p.add_argument("--max-false-rate", type=float, default=0.03)
    p.add_argument("--min-areas", type=int, nargs="+", help="U-Net cascade: also sweep the smallest coarse "
                                                             "region kept (coarse pixels)")
    p.add_argument("--refines", type=_passes, nargs="+", help="U-Net cascade: also sweep the extra fine passes "
                                                               "on the fine net's own box (0 = none)")
    p.add_argument("--extra-no-tumor", nargs="+", default=[],
                   help="more no-tumor scans for the false-mask rate: files, folders or .txt lists of paths "
                        "(for example the no-tumor slices of the classifier's validation split)")


def run(args) -> int:
    result = tune_conf(args.weights, args.data, args.out, args.confs, args.max_false_rate, args.device,
                       min_areas=args.min_areas or (None,), extra_no_tumor=args.extra_no_tumor,
                       refines=args.refines or (None,))
    for row in result["table"]:
        print(json.dumps(row))
    print(f"chosen conf: {result['chosen_conf']}" + (f", min_area: {result['chosen_min_area']}"
                                                     if result.get("chosen_min_area") is not None else "")
          + (f", refine: {result['chosen_refine']}" if "chosen_refine" in result else ""))
    return 0
