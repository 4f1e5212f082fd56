"""Masks -> YOLO polygon labels, and the YOLO-seg dataset folder built from the masked slices.

One class, ``tumor``: the type of tumor is stage 2's question, and pooling the three types
gives the segmenter three times the examples of each shape of lesion. Kaggle no-tumor slices
from the classifier's *training* split are added as background images (empty label files) so
the segmenter learns not to draw a tumor on a healthy slice.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
import yaml

from pipeline.datasets import list_mask_dataset, read_split
from pipeline.folders import read_image_file


def mask_to_polygons(mask: np.ndarray, min_area: float = 16.0, epsilon_frac: float = 0.004
                     ) -> list[np.ndarray]:
    """Outer contours of a (H, W) mask as polygons normalised to 0..1, each (K, 2) in (x, y) order.

    Regions of fewer than ``min_area`` pixels are dropped as labelling specks, unless every region
    of the mask is that small: then the largest is kept, so a slice with a lesion never becomes a
    background image. Contours are simplified by ``epsilon_frac`` of the image diagonal (sub-pixel
    at 512 px) to keep label files small; a region the simplification would cut below a triangle
    keeps its whole contour, and one of one or two pixels its pixels' outline.
    """
    h, w = mask.shape[:2]
    binary = (mask > 127).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    eps = epsilon_frac * float(np.hypot(h, w))
    areas = []
    for contour in contours:
        region = np.zeros_like(binary)
        cv2.drawContours(region, [contour], -1, 1, thickness=cv2.FILLED)
        areas.append(int(region.sum()))  # pixels, not the area inside the boundary pixels' centres
    keep = [i for i, a in enumerate(areas) if a >= min_area]
    if not keep and areas:
        keep = [int(np.argmax(areas))]
    polygons = []
    for i in keep:
        contour = contours[i]
        approx = cv2.approxPolyDP(contour, eps, True).reshape(-1, 2).astype(np.float64)
        if len(approx) < 3:  # the whole contour has 3 points or more once a region has 3 pixels
            approx = contour.reshape(-1, 2).astype(np.float64)
        if len(approx) < 3:  # one or two pixels: the outline of their pixel squares
            (x0, y0), (x1, y1) = approx.min(0), approx.max(0) + 1
            approx = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
        approx[:, 0] /= w
        approx[:, 1] /= h
        polygons.append(np.clip(approx, 0, 1))
    return polygons


def polygons_to_label(polygons: Iterable[np.ndarray], class_id: int = 0) -> str:
    """YOLO-seg label text: one line ``class x1 y1 x2 y2 ...`` per polygon."""
    return "".join(f"{class_id} " + " ".join(f"{v:.6f}" for v in poly.reshape(-1)) + "\n" for poly in polygons)


def polygons_to_mask(polygons: Iterable[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise normalised polygons back to a (H, W) 0/255 mask (the inverse, for checks)."""
    h, w = shape
    mask = np.zeros((h, w), np.uint8)
    pts = [np.round(p * [w, h]).astype(np.int32) for p in polygons]
    if pts:
        cv2.fillPoly(mask, pts, 255)
    return mask


#: written into ``out`` before the first link: what a later run may remove is only ever ours
BUILD_MARKER = ".seg-data-build"


def _older_build(out: Path) -> bool:
    """A build from before the marker: its ``data.yaml`` is the one seg-data writes for this folder."""
    try:
        data = yaml.safe_load((out / "data.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("names") == {0: "tumor"} and data.get("path") == str(out.resolve())


def _clear_previous_build(out: Path) -> None:
    """Remove what an earlier ``build_yolo_dataset`` wrote into ``out``: its image and mask links,
    the label file of each linked image, the U-Net cache.

    Only where its marker shows it ran. A folder with ``images/``, ``labels/`` or ``masks/`` and no
    marker (a dataset given as ``--out`` by mistake), a linked sub-folder, or files it did not
    write left after the cleanup: refused, with nothing of the user's removed.
    """
    subs = [out / sub for sub in ("images", "labels", "masks") if (out / sub).exists() or (out / sub).is_symlink()]
    if not subs:
        return
    linked = [p.name for p in subs if p.is_symlink()]
    if linked:
        raise ValueError(f"{out}: {', '.join(linked)} is a link to another folder; choose an empty --out")
    if not (out / BUILD_MARKER).is_file() and not _older_build(out):
        raise ValueError(f"{out}: holds {', '.join(p.name + '/' for p in subs)} that seg-data did not write "
                         f"(no {BUILD_MARKER}); choose an empty --out (this one may be a dataset)")
    linked_stems = set()
    for sub in ("images", "masks"):
        for path in sorted((out / sub).rglob("*")) if (out / sub).is_dir() else []:
            if path.is_symlink():
                if sub == "images":
                    linked_stems.add((path.parent.name, path.stem))
                path.unlink()
    for path in sorted((out / "labels").rglob("*.txt")) if (out / "labels").is_dir() else []:
        if (path.parent.name, path.stem) in linked_stems:
            path.unlink()
    # the U-Net's decoded cache, and ultralytics' label caches (labels/train.cache, ...)
    for stale in [*out.glob("unet_cache_*.npz"), *out.glob("labels/*.cache")]:
        stale.unlink()
    left = [p for sub in subs for p in sorted(sub.rglob("*")) if not p.is_dir()]
    if left:
        raise ValueError(f"{out}: holds files seg-data did not write ({', '.join(str(p.relative_to(out)) for p in left[:3])}"
                         f"{', ...' if len(left) > 3 else ''}); move them out or choose an empty --out")
    for sub in subs:
        for path in sorted(sub.rglob("*"), reverse=True):
            if path.is_dir():
                path.rmdir()


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    os.symlink(os.path.abspath(src), dst)


def seg_split_ids(names: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Deterministic random split of slice names into train/val/test."""
    order = sorted(names)
    random.Random(seed).shuffle(order)
    n_val, n_test = round(len(order) * val_fraction), round(len(order) * test_fraction)
    return {n: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, n in enumerate(order)}


def copies_of(candidates: list[Path], reference_dir: str | os.PathLike) -> set[str]:
    """Those of ``candidates`` that are (near-)copies of an image in the Kaggle-layout ``reference_dir``.

    The figshare and BRISC slices are also Kaggle images; a segmenter trained on a slice that is
    in Testing would segment it from memory and bias the masked-vs-full comparison, so those
    slices are kept out of its training data (found with the leakage audit's own matcher).
    """
    from pipeline.audit import find_duplicates
    from pipeline.datasets import list_class_folder

    reference = [(str(p), label) for p, label in list_class_folder(reference_dir)]
    result = find_duplicates(reference, [(str(p), "tumor") for p in candidates])
    return {pair["test_path"] for pair in result["cross"]}


def build_yolo_dataset(out: str | os.PathLike, figshare: str | os.PathLike | None,
                       brisc: str | os.PathLike | None = None, cls_split: str | os.PathLike | None = None,
                       cls_root: str | os.PathLike | None = None, n_background: int = 600,
                       val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                       exclude_copies_of: str | os.PathLike | None = None) -> Path:
    """Write ``out/{images,labels}/{train,val,test}`` (images symlinked) and ``out/data.yaml``.

    figshare slices are split train/val/test (test is the held-out set for the model card);
    BRISC slices go to train and val only; background slices come from the ``notumor`` class of
    the classifier split (its train part to train, its val part to val). Also writes
    ``out/split.csv`` (``source,name,split``) and ``out/masks/<split>/<name>.png`` links to the
    ground truth, so ``evaluate-seg`` can read them.
    """
    out = Path(out)
    # every input is read and split before anything in ``out`` is touched
    planned = []
    excluded: set[str] = set()
    sources = [("figshare", figshare, test_fraction), ("brisc", brisc, 0.0)]
    for source, root, test_frac in sources:
        if not root:
            continue
        samples = list_mask_dataset(root)
        if exclude_copies_of:
            drop = copies_of([s.image for s in samples], exclude_copies_of)
            excluded |= drop
            samples = [s for s in samples if str(s.image) not in drop]
        split = seg_split_ids([s.image.stem for s in samples], val_fraction, test_frac, seed)
        planned += [(source, s, split[s.image.stem]) for s in samples]
    labels = {}
    for source, s, part in planned:  # read and checked here, so a bad mask leaves an earlier build whole
        mask = read_image_file(s.mask, cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise FileNotFoundError(f"{s.mask}: unreadable mask")
        if mask.any() and not (mask > 127).any():
            # every stage reads these linked masks as tumor above 127: a 0/1 label mask or a dark
            # colour one would train and score as a slice with no lesion, without a word
            raise ValueError(f"{s.mask}: a mask with values (up to {int(mask.max())}) but none above 127; seg-data "
                             f"needs 0/255 masks (tumor 255): convert it, e.g. np.where(mask > 0, 255, 0)")
        labels[s.mask] = polygons_to_label(mask_to_polygons(mask))
    cls = read_split(cls_split, cls_root) if cls_split and n_background else None
    # a rerun (another seed, another classifier split) starts from empty folders: links left from
    # the last run would put one slice in two parts, a held-out slice among the training ones;
    # and the U-Net's decoded cache of the old assignment goes with them
    _clear_previous_build(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_MARKER).write_text("written by seg-data (pipeline.segment.yolo_data); a rerun may remove the links "
                                    "and label files it made here\n")
    rows = []
    for source, s, part in planned:
        name = f"{source}_{s.image.stem}"
        _link(s.image, out / "images" / part / f"{name}{s.image.suffix.lower()}")
        _link(s.mask, out / "masks" / part / f"{name}.png")
        label = out / "labels" / part / f"{name}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text(labels[s.mask])
        rows.append((source, name, part))
    if cls is not None:
        rng = random.Random(seed)
        for part, share in (("train", 1.0), ("val", val_fraction / (1 - val_fraction - test_fraction))):
            negatives = [s for s in cls.get(part, []) if s.label == "notumor"]
            if exclude_copies_of:  # a background copied into Testing would flatter its false-mask rate there
                drop = copies_of([s.path for s in negatives], exclude_copies_of)
                excluded |= drop
                negatives = [s for s in negatives if str(s.path) not in drop]
            rng.shuffle(negatives)
            for s in negatives[: round(n_background * share)]:
                name = f"background_{s.path.stem}"
                _link(s.path, out / "images" / part / f"{name}{s.path.suffix.lower()}")
                label = out / "labels" / part / f"{name}.txt"
                label.parent.mkdir(parents=True, exist_ok=True)
                label.write_text("")
                rows.append(("background", name, part))
    (out / "excluded.txt").write_text("".join(f"{p}\n" for p in sorted(excluded)), encoding="utf-8",
                                      errors="surrogateescape")
    with (out / "split.csv").open("w", encoding="utf-8", errors="surrogateescape") as fh:
        fh.write("source,name,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    data = {"path": str(out.resolve()), "train": "images/train", "val": "images/val", "test": "images/test",
            "names": {0: "tumor"}}
    (out / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return out / "data.yaml"
