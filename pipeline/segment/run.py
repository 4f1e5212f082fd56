"""``segment``: tumor masks for every scan in a folder -> ``OUT/masks/`` + ``OUT/segments.csv``.

Outputs
-------
* ``OUT/masks/<mask name>``: one PNG per readable slice, the input's H x W, uint8 0 (background)
  / 255 (tumor); an all-zero PNG where nothing was found. Mask names mirror the input tree:

  - a 2D file ``a/b/x.jpg`` -> ``masks/a/b/x.png`` (its suffix, ``.nii.gz`` included, replaced by ``.png``);
  - a suffix-less file (DICOM ``IM0001``) -> ``masks/IM0001.png``;
  - a volume slice ``a/vol.nii.gz#z=07`` -> ``masks/a/vol.nii.gz_z07.png`` (full name + ``_zNN``),
    and for a NIfTI the slices together, back in its own voxel grid with its affine:
    ``masks/a/vol.nii.gz_mask.nii.gz`` (uint8 1 / 0; slices not segmented are 0), to overlay on the scan;
  - if two inputs of one folder would get the same name (``x.jpg`` and ``x.png``), each of them
    keeps its full name instead: ``x.jpg.png``, ``x.png.png``; a scan done by an earlier run keeps
    the name it got then, and a new one that would take it gets its full name. Every name that is
    not the plain one is listed in ``OUT/mask_names.csv`` (``path,mask``).

* ``OUT/segments.csv``: columns ``path,found,x0,y0,x1,y1,area_px,score,model,status,error``;
  ``path`` relative to the input folder (``file.nii.gz#z=NN`` for volume slices); box = the mask's
  bounding box, ``x1``/``y1`` exclusive, empty when nothing was found; ``area_px`` = tumor pixels;
  ``score`` = the highest detection confidence (empty when none); ``status`` ``ok`` | ``error``
  with the reason in ``error`` (an unreadable file never stops the run).

Resumable like ``predict`` (:class:`pipeline.folders.ResultsCSV`): every mask of a batch is written
atomically (temporary file + ``os.replace``) before that batch's rows, so a row always points to a
complete mask; a re-run skips inputs already in the CSV and writes nothing for them.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
from collections import Counter
from typing import Sequence

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.folders import Item, iter_batches, reading_settings, start_folder_run, write_png_atomic
from pipeline.roi import mask_roi
from pipeline.scans import parse_nifti_slices

SEG_COLUMNS = ["path", "found", "x0", "y0", "x1", "y1", "area_px", "score", "model", "status", "error"]
MODELS = ("unet", "yolo", "yolo+sam", "yolo+unet")
CSV_NAME = "segments.csv"
MASKS_DIR = "masks"


# --- mask names ------------------------------------------------------------------------------------

def _strip_suffix(name: str) -> str:
    low = name.lower()
    if low.endswith(".nii.gz"):
        return name[: -len(".nii.gz")]
    stem, dot, suffix = name.rpartition(".")
    return stem if dot and stem else name


def mask_names(rel_paths: Sequence[str]) -> dict[str, str]:
    """``{input relative path: mask relative path}`` for whole-file inputs (see the module docstring)."""
    parts = {rel: rel.rpartition("/") for rel in rel_paths}  # (folder, "/" or "", file name)
    stems = {rel: (folder, sep, _strip_suffix(base)) for rel, (folder, sep, base) in parts.items()}
    taken = Counter((folder, stem.lower()) for folder, _, stem in stems.values())
    clashing = {rel for rel, (folder, _, stem) in stems.items() if taken[(folder, stem.lower())] > 1}
    names = {rel: folder + sep + stem + ".png" for rel, (folder, sep, stem) in stems.items() if rel not in clashing}
    given = {_name_key(n) for n in names.values()}
    for rel in sorted(clashing):  # a fallback (the whole name) gives way to another file's own (x.png.png)
        names[rel] = _fallback_name(rel, given)
    return names


def _name_key(name: str) -> tuple[str, str]:
    """How names are compared: the folder as spelt, the file name in any case (case-blind file systems)."""
    folder, _, base = name.rpartition("/")
    return folder, base.lower()


def _fallback_name(rel: str, given: set[tuple[str, str]]) -> str:
    """``rel`` + ``.png``, or ``rel~N.png`` where that is taken; added to ``given``."""
    name, n = rel + ".png", 0
    while _name_key(name) in given:
        n += 1
        name = f"{rel}~{n}.png"
    given.add(_name_key(name))
    return name


#: ``OUT/mask_names.csv`` (``path,mask``): every whole-file input whose mask is not named by the plain
#: rule (its suffix replaced by ``.png``), as segment named it. A rerun keeps the names of what is done,
#: even when files added since would make them clash, and ``crop --masks`` reads them from here.
NAMES_RECORD = "mask_names.csv"


def plain_mask_name(rel: str) -> str:
    folder, sep, base = rel.rpartition("/")
    return folder + sep + _strip_suffix(base) + ".png"


def read_mask_names(out: str | os.PathLike) -> dict[str, str] | None:
    """``{input path: mask path}`` recorded in ``out``, or None where no run recorded them (older runs)."""
    import csv

    path = os.path.join(out, NAMES_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames and not {"path", "mask"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected the columns path,mask, found {','.join(reader.fieldnames)}; "
                             f"the masks of that folder cannot be matched to their scans")
        return {row["path"]: row["mask"] for row in reader}


def settle_mask_names(rels: Sequence[str], done: set[str], recorded: dict[str, str] | None,
                      masks_root: str | os.PathLike | None = None) -> dict[str, str]:
    """Mask names for ``rels`` in a run that may resume: the inputs already ``done`` keep the names
    they were written under (``recorded``, else the plain rule); the others get :func:`mask_names`'
    names, or a fallback where those are taken.

    With no record at all (a folder from before it), a done input's name is read off ``masks_root``:
    the rule over today's files where that mask is there, else its plain name where that one is (a
    clashing file was added since), else the rule."""
    from pipeline.folders import csv_key

    fresh = mask_names(rels)
    here = {csv_key(rel) for rel in rels}
    gone = [key for key in done if "#z=" not in key and key not in here]

    def on_disk(name: str) -> bool:
        return masks_root is not None and os.path.isfile(os.path.join(masks_root, name))

    def older(rel: str) -> str:
        return fresh[rel] if on_disk(fresh[rel]) or not on_disk(plain_mask_name(rel)) else plain_mask_name(rel)

    is_done = [rel for rel in rels if csv_key(rel) in done]
    names = {rel: (older(rel) if recorded is None else recorded.get(rel) or plain_mask_name(rel)) for rel in is_done}

    given = {_name_key(n) for n in names.values()}
    # the masks of inputs done and gone since: a new file must not take them
    if recorded is not None:
        given |= {_name_key(recorded.get(key) or plain_mask_name(key)) for key in gone}
    else:
        given |= {_name_key(plain_mask_name(key)) for key in gone if on_disk(plain_mask_name(key))}
    clashing = []
    for rel in sorted(set(rels) - set(is_done)):
        if _name_key(fresh[rel]) in given:
            clashing.append(rel)
        else:
            names[rel] = fresh[rel]
            given.add(_name_key(fresh[rel]))
    for rel in clashing:
        names[rel] = _fallback_name(rel, given)
    return names


def _write_mask_names(out, names: dict[str, str], recorded: dict[str, str] | None) -> None:
    import csv
    import io

    from pipeline.folders import write_atomic

    kept = {rel: n for rel, n in (recorded or {}).items() if rel not in names}  # inputs gone since: their masks stay
    record = {**kept, **{rel: n for rel, n in names.items() if n != plain_mask_name(rel)}}
    if record == (recorded or {}) and recorded is not None:
        return
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["path", "mask"])
    writer.writerows(sorted(record.items()))
    data = text.getvalue().encode("utf-8", "surrogateescape")
    write_atomic(os.path.join(out, NAMES_RECORD), lambda fh: fh.write(data))


def mask_relpath(key: str, names: dict[str, str] | None = None) -> str:
    """Mask path (relative to ``OUT/masks``) for a CSV ``path``: ``vol.nii.gz#z=07`` -> ``vol.nii.gz_z07.png``."""
    if "#z=" in key:
        return key.replace("#z=", "_z") + ".png"
    return (names or {}).get(key) or mask_names([key])[key]


# --- the run ---------------------------------------------------------------------------------------

def run_segment(input_dir: str | os.PathLike, out_dir: str | os.PathLike, segmenter,
                batch_size: int = 16, workers: int = 2, nifti_slices="nonempty", model_name: str = "yolo",
                progress: bool | None = None, dicom_window: str = "file") -> dict:
    """Segment every file under ``input_dir``; returns counts. See the module docstring for the outputs."""
    batch_size = max(1, int(batch_size))
    settings = {"model": model_name, "segmenter": getattr(segmenter, "fingerprint", None)}
    settings.update(reading_settings(nifti_slices, dicom_window))
    run = start_folder_run(input_dir, out_dir, CSV_NAME, SEG_COLUMNS, settings=settings)
    root, out, results, files, todo = run.root, run.out, run.results, run.files, run.todo
    masks_root = out / MASKS_DIR
    recorded = read_mask_names(out)
    names = settle_mask_names([p.relative_to(root).as_posix() for p in files], results.done, recorded, masks_root)
    _write_mask_names(out, names, recorded)  # before any mask: a mask is never under an unrecorded name
    counts = {"files": len(files), "skipped_done": len(files) - len(todo), "rows_written": 0, "errors": 0,
              "found": 0}

    def flush(items: list[Item]) -> None:
        rows = {it.key: {"path": it.key, "model": model_name, "status": "error", "error": it.error}
                for it in items if it.scan is None}
        ok = [it for it in items if it.scan is not None]
        segs = segmenter.predict([it.scan.image for it in ok]) if ok else []
        if len(segs) != len(ok):
            raise RuntimeError(f"segmenter returned {len(segs)} results for {len(ok)} images")
        for it, seg in zip(ok, segs):
            h, w = it.scan.image.shape[:2]
            mask = np.asarray(seg.mask)
            if mask.shape != (h, w):
                rows[it.key] = {"path": it.key, "model": model_name, "status": "error",
                                "error": f"segmenter returned a {mask.shape} mask for a {(h, w)} image"}
                continue
            mask = np.where(mask > 0, 255, 0).astype(np.uint8)
            target = masks_root / mask_relpath(it.key, names)
            try:
                write_png_atomic(target, mask)
            except OSError as exc:  # a name the file system refuses: this scan's row says so
                # (or one a folder of masks already holds: an input folder spelt like this mask)
                if exc.errno not in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL, errno.EEXIST, errno.EISDIR,
                                     errno.ENOTDIR):
                    raise  # a full disk or a permission: the run stops and a rerun resumes
                rows[it.key] = {"path": it.key, "model": model_name, "status": "error",
                                "error": f"{target}: mask not written ({exc.strerror or exc})"}
                continue
            roi = mask_roi(mask)
            scores = np.asarray(seg.scores, np.float64).reshape(-1)
            found = bool(len(scores) > 0 and roi.found)
            row = {"path": it.key, "found": str(found).lower(), "area_px": roi.area_px,
                   "score": f"{scores.max():.4f}" if len(scores) else "", "model": model_name,
                   "status": "ok", "error": ""}
            if roi.found:
                row.update(zip(("x0", "y0", "x1", "y1"), roi.box))
            rows[it.key] = row
            counts["found"] += found
        ordered = [rows[it.key] for it in items]
        results.write(ordered)  # after the masks: a row never points to a missing or partial mask
        counts["rows_written"] += len(ordered)
        counts["errors"] += sum(r["status"] == "error" for r in ordered)

    bar = tqdm(total=len(todo), desc="segment", unit="file", disable=None if progress is None else not progress,
               smoothing=0.1)
    if run.unlisted:
        flush(run.unlisted)
    for batch in iter_batches(todo, root, results.done, batch_size, nifti_slices, workers, bar.update, dicom_window):
        flush(batch)
    bar.close()
    counts["mask_volumes"] = write_mask_volumes(root, files, results.done, masks_root, names)
    return counts


def write_mask_volumes(root, files, done: set[str], masks_root, names: dict[str, str]) -> int:
    """``masks/<volume>_mask.nii.gz`` for every NIfTI input with slice masks: those PNGs put back into
    the file's own voxel grid (:func:`pipeline.scans.write_nifti_mask`). Written when missing or older
    than one of its slices, so a resumed run completes it; returns how many were written. A volume
    that cannot be written is a warning: its slice masks and rows stand."""
    import sys
    from collections import defaultdict

    from pipeline.folders import csv_key, read_image_file
    from pipeline.scans import write_nifti_mask

    by_volume: dict[str, list[str]] = defaultdict(list)  # once, not per volume: folders of thousands
    for k in done:
        base, sep, z = k.rpartition("#z=")
        if sep and z.isdigit():
            by_volume[base].append(z)
    written = 0
    for path in files:
        rel = path.relative_to(root).as_posix()
        if not rel.lower().endswith((".nii", ".nii.gz")):
            continue
        key = csv_key(rel)
        # the PNGs carry the real name (a line break kept), the CSV keys its one-line form
        slices = {int(z): masks_root / mask_relpath(f"{rel}#z={z}") for z in by_volume.get(key, ())}
        if not slices and key in done:  # a 2D NIfTI: one row, one mask under its own name
            slices = {0: masks_root / mask_relpath(rel, names)}
        slices = {z: png for z, png in slices.items() if png.is_file()}
        if not slices:
            continue
        dest = masks_root / f"{rel}_mask.nii.gz"
        if dest.is_file() and dest.stat().st_mtime >= max(png.stat().st_mtime for png in slices.values()):
            continue
        try:
            masks = {z: read_image_file(png, cv2.IMREAD_GRAYSCALE) for z, png in slices.items()}
            if any(m is None for m in masks.values()):
                raise ValueError("a slice mask could not be read back")
            write_nifti_mask(path, masks, dest)
        except Exception as exc:  # noqa: BLE001 - one volume (a DICOM named .nii, say) must not stop the folder
            print(f"warning: {dest}: mask volume not written ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        written += 1
    return written


# --- building the segmenter ------------------------------------------------------------------------

def default_segmenter_name(arch: str | None = None) -> str:
    """The manifest's segmenter: the one with ``"default": true``, or with ``arch`` (``unet`` | ``yolo``)
    the default among those of that architecture, else the first of it. WeightsError when there is none."""
    from pipeline.weights import MANIFEST, WeightsError, load_manifest

    shipped = [(n, e) for n, e in load_manifest().items() if e.get("kind") == "segmenter"]
    if arch:
        shipped = [(n, e) for n, e in shipped if e.get("arch", "yolo") == arch]
    shipped.sort(key=lambda ne: not ne[1].get("default"))
    if not shipped or (not arch and not shipped[0][1].get("default")):
        what = f"{arch} segmenter" if arch else "default segmenter"
        raise WeightsError(f"no {what}: {MANIFEST} has no entry with \"kind\": \"segmenter\""
                           + (f", \"arch\": \"{arch}\"" if arch else ", \"default\": true")
                           + ". Train one (`make seg-train`) and list it there, or pass --weights PATH.pt")
    return shipped[0][0]


def build_segmenter(model: str | None = None, weights: str | None = None, device: str = "cpu",
                    imgsz: int | None = None, conf: float | None = None, sam_model: str | None = None,
                    sam_checkpoint: str | None = None, unet_weights: str | None = None, backend: str = "torch"):
    """An object with ``predict(list of (H, W) uint8) -> [SegResult]``.

    ``model``: ``unet`` (U-Net cascade) | ``yolo`` | ``yolo+sam`` (SAM redraws the boxes of ``weights``)
    | ``yolo+unet`` (the cascade's fine U-Net redraws YOLO's boxes) | None (whatever ``weights`` holds).
    ``weights`` defaults to the manifest's segmenter of the needed architecture. ``backend``: ``torch`` |
    ``onnx`` (ONNX Runtime on the CPU, U-Net networks only).
    """
    from pipeline.config import ConfigError
    from pipeline.segment.load import load_segmenter, segmenter_arch

    if model is not None and model not in MODELS:
        raise ConfigError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    box_arch = {"unet": "unet", "yolo": "yolo", "yolo+unet": "yolo", "yolo+sam": "yolo"}.get(model)
    weights = weights or default_segmenter_name(box_arch)
    held = segmenter_arch(weights) if model is not None else box_arch
    if held != box_arch:
        raise ConfigError(f"--model {model} needs a {box_arch} checkpoint; {weights} holds a {held} segmenter")
    sam = None
    if model == "yolo+sam":  # SAM first: its missing checkpoint is the likelier problem
        try:
            from pipeline.segment.sam import SamRefiner, YoloSamSegmenter, build_sam
        except ModuleNotFoundError as exc:
            if exc.name != "pipeline.segment.sam":
                raise
            raise ConfigError("--model yolo+sam: pipeline/segment/sam.py is not in this checkout") from exc
        kw = {"checkpoint": sam_checkpoint} if sam_checkpoint else {}
        sam = build_sam(sam_model or "vit_b", device=device, **kw)
    boxes = load_segmenter(weights, device=device, imgsz=imgsz, conf=conf,
                           backend=backend if model in (None, "unet") else "torch")
    if sam is not None:
        combined = YoloSamSegmenter(boxes, SamRefiner(sam))
        combined.fingerprint = {"boxes": getattr(boxes, "fingerprint", None),
                                "sam": [sam_model or "vit_b", getattr(sam, "checkpoint_sha256", sam_checkpoint)]}
        return combined
    if model == "yolo+unet":
        unet_weights = unet_weights or default_segmenter_name("unet")
        if segmenter_arch(unet_weights) != "unet":
            raise ConfigError(f"--unet-weights {unet_weights}: not a U-Net cascade checkpoint")
        cascade = load_segmenter(unet_weights, device=device, backend=backend)
        cascade.coarse, cascade.boxes_from = None, boxes
        cascade.fingerprint = {"boxes": getattr(boxes, "fingerprint", None), "fine": cascade.fingerprint}
        return cascade
    return boxes


# --- CLI -------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder of scans (walked recursively; any format)")
    p.add_argument("--out", required=True, help="output folder: segments.csv and masks/ (resumable)")
    p.add_argument("--model", choices=MODELS,
                   help="unet (coarse U-Net finds, fine U-Net draws) | yolo | yolo+sam (SAM redraws the boxes) "
                        "| yolo+unet (the fine U-Net redraws YOLO's boxes); default: what --weights holds")
    p.add_argument("--weights", help="segmenter checkpoint: a manifest name or a weights-only .pt "
                                     "(default: the manifest's default segmenter for --model)")
    p.add_argument("--unet-weights", help="--model yolo+unet: the U-Net cascade whose fine net is used "
                                          "(default: the manifest's unet segmenter)")
    p.add_argument("--sam-model", choices=["vit_b", "vit_l", "vit_h"], default="vit_b",
                   help="SAM variant for --model yolo+sam")
    p.add_argument("--sam-checkpoint", help="SAM weights: a manifest name or a path (default: the manifest "
                                            "entry of --sam-model, e.g. sam_vit_b)")
    p.add_argument("--imgsz", type=int, help="network input size (default: the checkpoint's)")
    p.add_argument("--conf", type=float, help="detection threshold: YOLO confidence or the U-Net's coarse "
                                              "probability (default: the checkpoint's)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: run the U-Net networks with ONNX Runtime (CPU)")
    from pipeline.cli import _positive_int, add_dicom_window_argument

    p.add_argument("--batch-size", type=_positive_int, default=16, help="scans per forward pass (default 16)")
    p.add_argument("--workers", type=_positive_int, default=2, help="reader threads (default 2)")
    p.add_argument("--nifti-slices", type=parse_nifti_slices, default="nonempty",
                   help="all | middle | nonempty | comma list: which slices of a NIfTI volume or frames of a "
                        "multi-frame DICOM")
    add_dicom_window_argument(p)


def run(args) -> int:
    segmenter = build_segmenter(args.model, getattr(args, "weights", None), device=getattr(args, "device", "cpu"),
                                imgsz=getattr(args, "imgsz", None), conf=getattr(args, "conf", None),
                                sam_model=getattr(args, "sam_model", None),
                                sam_checkpoint=getattr(args, "sam_checkpoint", None),
                                unet_weights=getattr(args, "unet_weights", None),
                                backend=getattr(args, "backend", None) or "torch")
    slices = args.nifti_slices
    if isinstance(slices, str) and slices not in ("all", "middle", "nonempty"):  # from a config file
        slices = parse_nifti_slices(slices)
    counts = run_segment(args.input, args.out, segmenter, batch_size=args.batch_size or 16,
                         workers=args.workers or 2, nifti_slices=slices, model_name=args.model or getattr(segmenter, "name", "segmenter"),
                         dicom_window=getattr(args, "dicom_window", None) or "file")
    print(json.dumps(counts))
    return 0
