"""Batch processing of a scan folder: read -> segment -> ROI -> classify -> ``predictions.csv``.

Resumable and safe: a row is written for every input exactly once. Rows are appended in whole
lines and flushed (and fsync'd) per batch; on restart a torn last line from a killed run is cut
off, inputs already in the CSV are skipped, and the rest are processed. Inputs are only read.
"""
from __future__ import annotations

import csv
import io
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from pipeline import CLASSES
from pipeline.roi import make_input
from pipeline.scans import Scan, ScanReadError, read_scans

COLUMNS = ["path", "label", "confidence", *[f"p_{c}" for c in CLASSES], "found", "x0", "y0", "x1", "y1",
           "mode", "status", "error"]
VOLUME_SUFFIXES = (".nii", ".nii.gz")


class Segmenter(Protocol):
    def predict(self, images: Sequence[np.ndarray]) -> list: ...


class ClassifierLike(Protocol):
    mode: str
    size: int

    def predict_proba(self, images: np.ndarray) -> np.ndarray: ...


def iter_input_files(root: Path, exclude: Path | None = None) -> Iterator[Path]:
    """Every non-hidden file under ``root``, sorted, except those under ``exclude`` (the output)."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not (exclude and (here / d).resolve() == exclude))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield here / name


class ResultsCSV:
    """Append-only CSV that survives ``kill -9``: whole lines per write, torn tail repaired on open."""

    def __init__(self, path: Path, columns: Sequence[str] = COLUMNS):
        self.path, self.columns = path, list(columns)
        self.done: set[str] = set()
        self.done_files: set[str] = set()
        if path.exists() and path.stat().st_size > 0:
            self._repair_and_load()
        else:
            self._append([",".join(self.columns)], header=True)

    def _repair_and_load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a killed run left half a line: drop it, that input is redone
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
            data = data[:end]
        reader = csv.DictReader(io.StringIO(data.decode()))
        if reader.fieldnames != self.columns:
            raise ValueError(f"{self.path}: existing file has columns {reader.fieldnames}, expected {self.columns}; "
                             f"use another --out")
        for row in reader:
            self.done.add(row["path"])
            self.done_files.add(row["path"].split("#z=")[0])

    def _append(self, lines: list[str], header: bool = False) -> None:
        with open(self.path, "a", newline="") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())

    def write(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n", extrasaction="ignore")
        for row in rows:
            writer.writerow(row)
            self.done.add(row["path"])
        if rows:
            self._append(buf.getvalue().rstrip("\n").split("\n"))


@dataclass
class _Item:
    key: str           # path relative to the input root, with #z=NN for volume slices
    scan: Scan | None
    error: str = ""


def _read(path: Path, root: Path, nifti_slices) -> list[_Item]:
    rel = path.relative_to(root).as_posix()
    try:
        scans = read_scans(path, nifti_slices=nifti_slices)
    except ScanReadError as exc:
        return [_Item(rel, None, exc.reason)]
    except Exception as exc:  # one bad file must never stop the folder
        return [_Item(rel, None, f"{type(exc).__name__}: {exc}")]
    if not scans:
        return [_Item(rel, None, "no slice selected (volume is blank)")]
    items = []
    for scan in scans:
        suffix = scan.key[len(str(path)):] if scan.key.startswith(str(path)) else ""
        items.append(_Item(rel + suffix, scan))
    return items


def _fmt(x: float) -> str:
    return f"{x:.6f}"


def run_predict(input_dir: str | os.PathLike, out_dir: str | os.PathLike, classifier: ClassifierLike,
                segmenter: Segmenter | None = None, mode: str | None = None, batch_size: int = 32,
                workers: int = 2, overlays: bool = False, nifti_slices="nonempty", progress: bool | None = None,
                margin: float = 0.25) -> dict:
    """Process every file under ``input_dir``; returns counts. See the module docstring for guarantees."""
    root = Path(input_dir).resolve()
    out = Path(out_dir).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder not found")
    if out == root:
        raise ValueError(f"--out {out_dir} is the input folder; choose another folder so no input is overwritten")
    mode = mode or classifier.mode
    if mode != "full" and segmenter is None:
        raise ValueError(f"mode {mode!r} needs a segmenter (--seg)")
    out.mkdir(parents=True, exist_ok=True)
    results = ResultsCSV(out / "predictions.csv")
    exclude = out if root in out.parents else None
    files = [p for p in iter_input_files(root, exclude)]
    todo = [p for p in files if p.relative_to(root).as_posix() not in results.done
            or p.name.lower().endswith(VOLUME_SUFFIXES)]
    counts = {"files": len(files), "skipped_done": len(files) - len(todo), "rows_written": 0, "errors": 0}

    bar = tqdm(total=len(todo), desc="predict", unit="file", disable=None if progress is None else not progress, smoothing=0.1)
    pending: list[_Item] = []

    def flush(items: list[_Item]) -> None:
        ok = [it for it in items if it.scan is not None]
        rows = {it.key: {"path": it.key, "mode": mode, "status": "error", "error": it.error}
                for it in items if it.scan is None}
        if ok:
            images = [it.scan.image for it in ok]
            segs = segmenter.predict(images) if segmenter is not None else [None] * len(ok)
            inputs = np.stack([make_input(im, mode, classifier.size, seg.mask if seg is not None else None,
                                          margin=margin)[0] for im, seg in zip(images, segs)])
            probs = classifier.predict_proba(inputs)
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
        ordered = [rows[it.key] for it in items]
        results.write(ordered)
        counts["rows_written"] += len(ordered)
        counts["errors"] += sum(r["status"] == "error" for r in ordered)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        # A bounded window of reads in flight keeps memory flat whatever the folder's size.
        window: deque = deque()
        files_iter = iter(todo)

        def refill():
            while len(window) < 2 * batch_size:
                try:
                    p = next(files_iter)
                except StopIteration:
                    return
                window.append(pool.submit(_read, p, root, nifti_slices))

        refill()
        while window:
            items = window.popleft().result()
            refill()
            bar.update(1)
            for it in items:
                if it.key not in results.done:
                    pending.append(it)
            if len(pending) >= batch_size:
                flush(pending[:batch_size])
                pending = pending[batch_size:]
        while pending:
            flush(pending[:batch_size])
            pending = pending[batch_size:]
    bar.close()
    return counts


def _write_overlay(path: Path, image: np.ndarray, mask: np.ndarray | None, label: str, confidence: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if mask is not None and mask.any():
        contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(canvas, contours, -1, (0, 0, 255), max(1, image.shape[0] // 256))
    scale = max(0.4, image.shape[0] / 700)
    cv2.putText(canvas, f"{label} {confidence:.2f}", (8, int(28 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                (0, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA)
    cv2.imwrite(str(path), canvas)
