"""``evaluate-seg``: compare predicted tumor masks with ground truth -> metrics.json, per_image.csv,
worst_cases.png.

Pairing: a predicted mask and a truth mask belong together when their paths relative to their
folders agree up to the file suffix (``a/b/x.png`` <-> ``a/b/x.png`` or ``a/b/x.jpg``). The
prediction folder may be the ``segment`` output folder itself (its ``masks/`` is used). A truth
mask without a prediction is reported (``status=missing_pred`` in per_image.csv, listed in
metrics.json) and left out of every metric; a prediction without a truth mask is only counted.

Masks: a pixel is tumor when its value is ``> threshold`` (default 127, for 0/255 masks); in a label
image (integers up to ``LABEL_MAX``, 8: 0/1 or BraTS-style 0/1/2/4, with a background of 0 or one value
throughout) when ``> 0``; in a float map within [0, 1] when ``> threshold`` (default 0.5). An explicit
``threshold`` applies to the predictions only: truth masks are always read by the defaults, so a
probability cut for float predictions never lets a 0/255 truth's JPEG edge values in.
Linked sub-folders are followed, as ``segment`` follows them in its input.

Per-image metrics use MONAI (``DiceMetric``, ``MeanIoU``, ``HausdorffDistanceMetric(percentile=95)``,
symmetric, in pixels, on mask edges). Empty-mask conventions:

* truth non-empty, prediction non-empty: MONAI's values;
* truth non-empty, prediction empty (a missed tumor): Dice 0, IoU 0, HD95 NaN -- the slice counts
  against the detection rate and in the Dice/IoU means, and is left out of the HD95 mean and median
  (``hd95.n`` says how many slices the HD95 summary covers, ``hd95.missed`` how many were left out);
* truth empty, prediction empty: Dice 1, IoU 1, HD95 0;
* truth empty, prediction non-empty (a false mask): Dice 0, IoU 0, HD95 NaN.

The Dice / IoU / HD95 summaries in metrics.json (``tumor_slices``) cover tumor slices only (truth
non-empty); slices with an empty truth are judged by the false-mask rate. Rates:

* ``detection_rate``: tumor slices with any predicted tumor pixel / tumor slices;
* ``hit_rate``: tumor slices whose prediction overlaps the truth (Dice > 0) / tumor slices;
* ``false_mask_rate``: no-tumor slices with any predicted tumor pixel / no-tumor slices, where the
  no-tumor slices are the paired slices with an empty truth plus every mask in ``no_tumor_dir``
  (predicted masks of slices known to hold no tumor); each part is also reported on its own.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pipeline.folders import read_image_file

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PER_IMAGE_COLUMNS = ["set", "path", "status", "tumor", "found", "truth_px", "pred_px", "dice", "iou", "hd95", "error"]


# --- reading ---------------------------------------------------------------------------------------

def resolve_pred_dir(pred_dir: str | os.PathLike) -> Path:
    """The folder holding predicted masks: ``pred_dir/masks`` when ``pred_dir`` is a ``segment`` output."""
    pred = Path(pred_dir)
    if not pred.is_dir():
        raise FileNotFoundError(f"{pred_dir}: folder not found")
    masks = pred / "masks"
    if masks.is_dir() and ((pred / "segments.csv").is_file() or not any(
            p.suffix.lower() in MASK_SUFFIXES for p in pred.iterdir() if p.is_file())):
        return masks
    return pred


def list_masks(folder: str | os.PathLike) -> dict[str, Path]:
    """``{relative path without suffix: file}`` for every non-hidden mask image under ``folder``.

    When two files differ only by suffix the ``.png`` one wins (then the first in sorted order).
    """
    root = Path(folder)
    out: dict[str, Path] = {}
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link loop, or one folder linked in twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in MASK_SUFFIXES:
                continue
            path = Path(dirpath) / name
            key = path.relative_to(root).with_suffix("").as_posix()
            if key not in out or (path.suffix.lower() == ".png" and out[key].suffix.lower() != ".png"):
                out[key] = path
    return dict(sorted(out.items()))


#: a mask whose largest value is at most this is a label image (0/1, 0/1/2/4), not a 0-255 map
LABEL_MAX = 8


def read_mask(path: str | os.PathLike, threshold: float | None = None) -> np.ndarray:
    """(H, W) bool tumor mask; ValueError when the file is not a readable image.

    A label image (integers up to ``LABEL_MAX`` with a background of 0, or one value throughout) is
    read as ``> 0``; a float map within [0, 1] as ``> threshold`` (default 0.5); anything else as
    ``> threshold`` (default 127)."""
    raw = read_image_file(path, cv2.IMREAD_UNCHANGED)
    if raw is None or raw.size == 0:
        raise ValueError(f"{path}: not a readable mask image")
    if raw.ndim == 3:
        raw = raw[..., :3].max(axis=-1)
    lo, hi = raw.min(), raw.max()
    if raw.dtype.kind == "f" and 0 <= lo and hi <= 1:
        return raw > (0.5 if threshold is None else threshold)
    # a faint 0-255 map over a non-zero background is not a label image
    if raw.dtype.kind in "iu" and hi <= LABEL_MAX and (lo == 0 or lo == hi):
        return raw > 0
    return raw > (127 if threshold is None else threshold)


# --- metrics ---------------------------------------------------------------------------------------

class MaskMetrics:
    """Per-image Dice, IoU and HD95 with MONAI metric objects and the module's empty-mask conventions."""

    def __init__(self):
        from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

        self.dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
        self.iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)
        self.hd95 = HausdorffDistanceMetric(include_background=True, percentile=95, directed=False,
                                            reduction="none")

    def __call__(self, pred: np.ndarray, truth: np.ndarray) -> dict:
        """``pred``, ``truth``: (H, W) bool of the same shape -> {dice, iou, hd95, found, tumor, ...}."""
        if pred.shape != truth.shape:
            raise ValueError(f"prediction is {pred.shape[0]}x{pred.shape[1]}, truth {truth.shape[0]}x{truth.shape[1]}")
        found, tumor = bool(pred.any()), bool(truth.any())
        out = {"tumor": tumor, "found": found, "truth_px": int(truth.sum()), "pred_px": int(pred.sum())}
        if not tumor:
            out.update(dice=1.0 if not found else 0.0, iou=1.0 if not found else 0.0, hd95=0.0 if not found else math.nan)
            return out
        import torch

        p = torch.from_numpy(pred.astype(np.float32))[None, None]
        t = torch.from_numpy(truth.astype(np.float32))[None, None]
        out["dice"] = float(self.dice(y_pred=p, y=t).item())
        out["iou"] = float(self.iou(y_pred=p, y=t).item())
        if found:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecated internal argument
                out["hd95"] = float(self.hd95(y_pred=p, y=t).item())
        else:
            out["hd95"] = math.nan
        for metric in (self.dice, self.iou, self.hd95):
            metric.reset()  # one image at a time: keep the buffers from growing
        return out


def _summary(values) -> dict:
    arr = np.asarray([v for v in values if not math.isnan(v)], np.float64)
    if not arr.size:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std()), "n": int(arr.size)}


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


# --- the evaluation --------------------------------------------------------------------------------

@dataclass
class _Row:
    set: str
    path: str
    status: str = "ok"
    values: dict = field(default_factory=dict)
    error: str = ""

    def csv(self) -> dict:
        v = self.values
        fmt = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6f}"  # noqa: E731
        return {"set": self.set, "path": self.path, "status": self.status,
                "tumor": "" if "tumor" not in v else str(v["tumor"]).lower(),
                "found": "" if "found" not in v else str(v["found"]).lower(),
                "truth_px": v.get("truth_px", ""), "pred_px": v.get("pred_px", ""),
                "dice": fmt(v.get("dice")), "iou": fmt(v.get("iou")), "hd95": fmt(v.get("hd95")), "error": self.error}


def evaluate_segmentation(pred_dir: str | os.PathLike, truth_dir: str | os.PathLike, out_dir: str | os.PathLike,
                          threshold: float | None = None, no_tumor_dir: str | os.PathLike | None = None,
                          images_dir: str | os.PathLike | None = None, n_worst: int = 8) -> dict:
    """Score predicted masks against truth masks; writes metrics.json, per_image.csv and worst_cases.png
    under ``out_dir`` and returns the metrics.json content. Conventions: see the module docstring."""
    truth_root = Path(truth_dir)
    if not truth_root.is_dir():
        raise FileNotFoundError(f"{truth_dir}: truth folder not found")
    pred_root = resolve_pred_dir(pred_dir)
    preds, truths = list_masks(pred_root), list_masks(truth_root)
    if not truths:
        raise ValueError(f"{truth_dir}: no mask images ({', '.join(MASK_SUFFIXES)}) found")
    if not set(truths) & set(preds):
        raise ValueError(f"no predicted mask in {pred_root} has the relative path of a truth mask in {truth_dir} "
                         f"(e.g. truth {next(iter(truths))!r}"
                         + (f", prediction {next(iter(preds))!r}" if preds else ", and no prediction at all")
                         + "); pairs are matched by path relative to each folder, without the suffix")
    metrics = MaskMetrics()
    rows: list[_Row] = []
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    for key, truth_path in truths.items():
        if key not in preds:
            rows.append(_Row("paired", key, "missing_pred", error="no predicted mask with this relative path"))
            continue
        try:
            # the threshold is the predictions' (a probability cut, say); the truth is read by its own kind
            truth, pred = read_mask(truth_path), read_mask(preds[key], threshold)
            values = metrics(pred, truth)
        except ValueError as exc:
            rows.append(_Row("paired", key, "error", error=str(exc)))
            continue
        rows.append(_Row("paired", key, values=values))
        if values["tumor"]:
            cache[key] = (truth, pred)

    no_tumor_rows: list[_Row] = []
    if no_tumor_dir is not None:
        nt_root = resolve_pred_dir(no_tumor_dir)
        for key, path in list_masks(nt_root).items():
            try:
                pred = read_mask(path, threshold)
                no_tumor_rows.append(_Row("no_tumor", key, values=metrics(pred, np.zeros_like(pred))))
            except ValueError as exc:
                no_tumor_rows.append(_Row("no_tumor", key, "error", error=str(exc)))

    ok = [r for r in rows if r.status == "ok"]
    tumor = [r.values for r in ok if r.values["tumor"]]
    empty = [r.values for r in ok if not r.values["tumor"]]
    nt = [r.values for r in no_tumor_rows if r.status == "ok"]
    false_empty, false_nt = sum(v["found"] for v in empty), sum(v["found"] for v in nt)
    hd = _summary([v["hd95"] for v in tumor])
    hd["missed"] = sum(not v["found"] for v in tumor)
    result = {
        "parameters": {"pred_dir": str(pred_root), "truth_dir": str(truth_root),
                       "no_tumor_dir": None if no_tumor_dir is None else str(no_tumor_dir),
                       "images_dir": None if images_dir is None else str(images_dir), "threshold": "auto" if threshold is None else threshold,
                       "n_worst": n_worst, "hd95_units": "pixels",
                       "conventions": {"both_empty": "dice=iou=1, hd95=0 (not in the tumor-slice summaries)",
                                       "missed_tumor": "dice=iou=0, hd95=NaN left out of the hd95 summary "
                                                       "(counted in hd95.missed and the detection rate)",
                                       "false_mask": "dice=iou=0, hd95=NaN (counted in the false-mask rate)",
                                       "missing_pred": "truth without prediction: left out of all metrics",
                                       "error": "a pair that cannot be scored (unreadable, another size): left "
                                                "out of all metrics, listed in per_image.csv"}},
        "counts": {"truth_masks": len(truths), "pred_masks": len(preds), "paired": len(ok),
                   "missing_pred": sum(r.status == "missing_pred" for r in rows),
                   "unpaired_pred": len(set(preds) - set(truths)),
                   "errors": sum(r.status == "error" for r in rows + no_tumor_rows),
                   "tumor_slices": len(tumor), "empty_truth_slices": len(empty), "no_tumor_dir_masks": len(nt)},
        "tumor_slices": {"dice": _summary([v["dice"] for v in tumor]), "iou": _summary([v["iou"] for v in tumor]),
                         "hd95": hd},
        "detection_rate": _rate(sum(v["found"] for v in tumor), len(tumor)),
        "hit_rate": _rate(sum(v["dice"] > 0 for v in tumor), len(tumor)),
        "false_mask_rate": _rate(false_empty + false_nt, len(empty) + len(nt)),
        "false_mask_rate_empty_truth": _rate(false_empty, len(empty)),
        "false_mask_rate_no_tumor_dir": _rate(false_nt, len(nt)),
        "missing_pred": [r.path for r in rows if r.status == "missing_pred"][:200],
        "errors": [f"{r.set}:{r.path}: {r.error}" for r in rows + no_tumor_rows if r.status == "error"][:200],
    }

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "per_image.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.DictWriter(fh, fieldnames=PER_IMAGE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(r.csv() for r in rows + no_tumor_rows)
    worst = sorted((r for r in ok if r.values["tumor"]), key=lambda r: (r.values["dice"], r.path))[:max(0, n_worst)]
    result["worst_cases"] = [{"path": r.path, "dice": r.values["dice"]} for r in worst]
    plot_worst_cases(out / "worst_cases.png", [(r.path, r.values["dice"], *cache[r.path]) for r in worst],
                     images_dir)
    (out / "metrics.json").write_text(json.dumps(_json_safe(result), indent=2, allow_nan=False) + "\n")
    return result


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --- the worst-cases figure ------------------------------------------------------------------------

_SLICE_KEY = re.compile(r"(.+)_z(\d+)$")


def find_image(images_dir: str | os.PathLike, key: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The scan behind mask ``key`` (relative path without suffix) as (H, W) uint8, or None.

    Tries ``key`` itself (suffix-less DICOM, or names kept whole), ``key.<any suffix>``, and for a
    volume slice ``<volume>_zNN`` slice NN of ``<volume>``. An image of another shape is ignored.
    """
    from pipeline.scans import read_scans

    root = Path(images_dir)
    candidates: list[tuple[Path, object]] = []
    m = _SLICE_KEY.match(key)
    if m and (root / m.group(1)).is_file():
        candidates.append((root / m.group(1), [int(m.group(2))]))
    if (root / key).is_file():
        candidates.append((root / key, "middle"))
    parent, name = (root / key).parent, Path(key).name
    if parent.is_dir():
        candidates += [(p, "middle") for p in sorted(parent.glob(glob_escape(name) + ".*"))
                       if p.is_file() and p.name[len(name):].count(".") <= 2]
    for path, slices in candidates:
        try:
            scans = read_scans(path, nifti_slices=slices)
        except Exception:  # noqa: BLE001 - a picture is optional; never fail the evaluation for it
            continue
        if scans and scans[0].image.shape[:2] == tuple(shape):
            return scans[0].image
    return None


def glob_escape(text: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", text)


def plot_worst_cases(path: str | os.PathLike, cases: list[tuple[str, float, np.ndarray, np.ndarray]],
                     images_dir: str | os.PathLike | None = None, ncols: int = 4) -> None:
    """Grid of ``(key, dice, truth, pred)`` cases: the scan (when found under ``images_dir``; else a black
    background) with the truth outline in green and the prediction outline in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(cases)
    cols = max(1, min(ncols, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(3.2 * cols, 3.5 * rows + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    if not cases:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no tumor slices to show", ha="center", va="center")
    for i, (key, dice, truth, pred) in enumerate(cases):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = find_image(images_dir, key, truth.shape) if images_dir is not None else None
        ax.imshow(image if image is not None else np.zeros(truth.shape, np.uint8), cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        for mask, color in ((truth, "lime"), (pred, "red")):
            if mask.any():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=color, linewidths=1.0)
        shown = key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # a name that is not UTF-8
        title = shown if len(shown) <= 34 else "..." + shown[-31:]
        ax.set_title(f"{title}\nDice {dice:.3f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("lowest-Dice tumor slices (green: truth, red: prediction)", fontsize=10)
    fig.savefig(str(path))


# --- CLI -------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="predicted masks: a folder of PNGs or a `segment` output folder")
    p.add_argument("--truth", required=True, help="ground-truth masks with the same relative names")
    p.add_argument("--out", required=True, help="output folder: metrics.json, per_image.csv, worst_cases.png")
    p.add_argument("--images", help="scans folder (the `segment` input) to draw under the worst cases")
    p.add_argument("--no-tumor", help="predicted masks of slices known to hold no tumor (false-mask rate)")
    p.add_argument("--threshold", type=float, help="predictions only: a pixel is tumor when its value is above this "
                   "(default 127; 0.5 in a float map within [0, 1]); in a label image (0 to at most 8, background 0) "
                   "any value above 0. Truth masks are always read by those defaults")
    p.add_argument("--n-worst", type=int, default=8, help="how many lowest-Dice slices to draw")


def run(args) -> int:
    result = evaluate_segmentation(args.pred, args.truth, args.out, threshold=args.threshold,
                                   no_tumor_dir=args.no_tumor, images_dir=args.images, n_worst=args.n_worst)
    keys = ("counts", "tumor_slices", "detection_rate", "hit_rate", "false_mask_rate")
    print(json.dumps(_json_safe({k: result[k] for k in keys}), indent=2))
    left_out = result["counts"]["errors"] + result["counts"]["missing_pred"]
    if left_out:  # the means above are over fewer slices than the truth folder holds: say so where it is read
        print(f"warning: {left_out} mask(s) left out of every figure above ({result['counts']['errors']} that could "
              f"not be scored, {result['counts']['missing_pred']} without a prediction); see status in "
              f"{Path(args.out) / 'per_image.csv'}", file=sys.stderr)
    return 0
