"""Batch processing of a scan folder: read -> segment -> ROI -> classify -> ``predictions.csv``.

Resumable and safe (see :mod:`pipeline.folders`): every input gets exactly one row, even across
``kill -9`` and re-runs. Inputs are only read; the output folder is never the input folder.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Protocol, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from pipeline import CLASSES
from pipeline.folders import Item, iter_batches, reading_settings, start_folder_run, write_png_atomic
from pipeline.roi import make_views, view_of
from pipeline.scans import is_blank

COLUMNS = ["path", "label", "confidence", *[f"p_{c}" for c in CLASSES], "found", "x0", "y0", "x1", "y1",
           "mode", "status", "error"]
class Segmenter(Protocol):
    def predict(self, images: Sequence[np.ndarray]) -> list: ...


class ClassifierLike(Protocol):
    mode: str
    size: int

    def predict_proba(self, images: np.ndarray) -> np.ndarray: ...


def _fmt(x: float) -> str:
    return f"{x:.6f}"


def run_predict(input_dir: str | os.PathLike, out_dir: str | os.PathLike, classifier: ClassifierLike,
                segmenter: Segmenter | None = None, mode: str | None = None, batch_size: int = 32,
                workers: int = 2, overlays: bool = False, nifti_slices="nonempty", progress: bool | None = None,
                margin: float = 0.25, gradcam: bool = False, dicom_window: str = "file") -> dict:
    """Process every file under ``input_dir``; returns counts. See the module docstring for guarantees."""
    mode = mode or classifier.mode
    if mode == classifier.mode and hasattr(classifier, "views"):
        views = tuple(classifier.views)
    elif len(getattr(classifier, "members", [classifier])) > 1:
        raise ValueError(f"mode {mode!r}: an ensemble reads its members' own inputs ({classifier.mode})")
    else:
        views = (view_of(mode, classifier.size, margin),)
    if any(v[0] != "full" for v in views) and segmenter is None:
        raise ValueError(f"mode {mode!r} needs a segmenter (--seg)")
    margins = sorted({v[2] for v in views if v[2] is not None})
    # one margin is recorded as a number, as before margins were per view, so older folders still resume
    settings = {"mode": mode, "margin": margins[0] if len(margins) == 1 else (margins or margin),
                "classifier": getattr(classifier, "fingerprint", None),
                "segmenter": getattr(segmenter, "fingerprint", None) if segmenter is not None else "none"}
    # recorded only when on, so folders made before these keys existed still resume: a rerun that
    # adds --overlays to a finished folder is refused rather than silently writing none
    settings.update({k: True for k, on in (("overlays", overlays), ("gradcam", gradcam)) if on})
    settings.update(reading_settings(nifti_slices, dicom_window))
    _adopt_older_picture_settings(Path(out_dir), settings)
    run = start_folder_run(input_dir, out_dir, "predictions.csv", COLUMNS, settings=settings)
    root, out, results, files, todo = run.root, run.out, run.results, run.files, run.todo
    counts = {"files": len(files), "skipped_done": len(files) - len(todo), "rows_written": 0, "errors": 0}

    bar = tqdm(total=len(todo), desc="predict", unit="file", disable=None if progress is None else not progress, smoothing=0.1)

    def flush(items: list[Item]) -> None:
        # a blank slice has nothing to classify: a label there would be a guess about nothing
        items = [Item(it.key, None, "blank image: every pixel has the same value after the intensity window")
                 if it.scan is not None and is_blank(it.scan.image) else it for it in items]
        ok = [it for it in items if it.scan is not None]
        rows = {it.key: {"path": it.key, "mode": mode, "status": "error", "error": it.error}
                for it in items if it.scan is None}
        if ok:
            images = [it.scan.image for it in ok]
            segs = segmenter.predict(images) if segmenter is not None else [None] * len(ok)
            inputs = make_views(images, [seg.mask if seg is not None else None for seg in segs], views)
            probs = (classifier.predict_views(inputs) if len(views) > 1
                     else classifier.predict_proba(inputs[views[0]]))
            for it, seg, p in zip(ok, segs, probs):
                row = {"path": it.key, "label": CLASSES[int(p.argmax())], "confidence": _fmt(p.max()),
                       **{f"p_{c}": _fmt(v) for c, v in zip(CLASSES, p)}, "mode": mode, "status": "ok", "error": ""}
                if seg is not None:
                    row["found"] = str(bool(seg.found)).lower()
                    if seg.found:
                        ys, xs = np.nonzero(seg.mask)
                        row.update(x0=int(xs.min()), y0=int(ys.min()), x1=int(xs.max()) + 1, y1=int(ys.max()) + 1)
                rows[it.key] = row
                if overlays:
                    _write_overlay(out / "overlays" / (it.key.replace("#z=", "_z") + ".png"), it.scan.image,
                                   seg.mask if seg is not None else None, row["label"], float(p.max()))
            if gradcam:
                # one map per member (an ensemble has no single network to explain), of the joint label
                members = getattr(classifier, "members", [classifier])
                subs = [m.mode for m in members]
                subs = subs if len(set(subs)) == len(subs) else [f"{i}_{m}" for i, m in enumerate(subs)]
                for member, sub in zip(members, subs):
                    x_all = inputs[member.views[0]] if len(members) > 1 else inputs[views[0]]
                    sub = Path("gradcam", sub) if len(members) > 1 else Path("gradcam")
                    for it, x, p in zip(ok, x_all, probs):
                        _write_gradcam(out / sub / (it.key.replace("#z=", "_z") + ".png"), member, x,
                                       int(p.argmax()))
        ordered = [rows[it.key] for it in items]
        results.write(ordered)
        counts["rows_written"] += len(ordered)
        counts["errors"] += sum(r["status"] == "error" for r in ordered)

    if run.unlisted:
        flush(run.unlisted)
    for batch in iter_batches(todo, root, results.done, batch_size, nifti_slices, workers, bar.update, dicom_window):
        flush(batch)
    bar.close()
    return counts


def _adopt_older_picture_settings(out: Path, settings: dict) -> None:
    """A folder made before --overlays/--gradcam were recorded, with them on (its ``overlays/`` or
    ``gradcam/`` exists), resumes under the same command: the keys are added to its record."""
    import json

    path = out / "predictions.csv.settings.json"
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    added = {k: True for k in ("overlays", "gradcam") if settings.get(k) and k not in old and (out / k).is_dir()}
    if added:  # atomically: a torn record would stop every later run of this folder
        from pipeline.folders import write_atomic

        text = json.dumps({**old, **added}, indent=2, sort_keys=True)
        write_atomic(path, lambda fh: fh.write(text.encode()))


def _write_gradcam(path: Path, classifier, x: np.ndarray, target: int) -> None:
    """The classifier's input (S x S) with the Grad-CAM map of ``target`` blended in, upscaled to >= 256 px."""
    from pipeline.classify.gradcam import grad_cam, normalise

    device = getattr(classifier, "device", "cpu")
    cam = grad_cam(classifier.torch_model, normalise(x[None], device), target_class=target)
    heat = cv2.applyColorMap(np.uint8(255 * cam), cv2.COLORMAP_JET)
    blend = cv2.addWeighted(cv2.cvtColor(x, cv2.COLOR_GRAY2BGR), 0.6, heat, 0.4, 0)
    scale = max(1, -(-256 // x.shape[0]))  # ceil: a 192 px input comes out at 384, not 192
    blend = cv2.resize(blend, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    cv2.putText(blend, CLASSES[target], (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    _write_picture(path, blend)


def _write_overlay(path: Path, image: np.ndarray, mask: np.ndarray | None, label: str, confidence: float) -> None:
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, (0, 0, 255), max(1, image.shape[0] // 256))
    scale = max(0.4, image.shape[0] / 700)
    cv2.putText(canvas, f"{label} {confidence:.2f}", (8, int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (0, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA)
    _write_picture(path, canvas)


def _write_picture(path: Path, image: np.ndarray) -> None:
    """An overlay or Grad-CAM picture: secondary to the row, so a name the file system refuses (too
    long, say) is reported and the run goes on. Not cv2.imwrite: it crashes on names that are not UTF-8."""
    try:
        write_png_atomic(path, image)
    except OSError as exc:
        print(f"warning: {path}: picture not written ({exc.strerror or exc})", file=sys.stderr)
