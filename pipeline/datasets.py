"""Datasets on disk: Kaggle class folders, image+mask folders, and the saved train/validation split.

Every later stage reads the split file written here, so a model is never selected on Testing.
"""
from __future__ import annotations

import csv
import json
import os
import random
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, NamedTuple

from pipeline import CLASSES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")

#: Folder names seen in public brain-tumor datasets, mapped onto the canonical classes.
CLASS_ALIASES = {
    "glioma": "glioma", "glioma_tumor": "glioma", "gliomas": "glioma", "gl": "glioma",
    "meningioma": "meningioma", "meningioma_tumor": "meningioma", "meningiomas": "meningioma", "me": "meningioma",
    "notumor": "notumor", "no_tumor": "notumor", "no": "notumor", "normal": "notumor", "healthy": "notumor",
    "none": "notumor", "no tumor": "notumor", "nt": "notumor",
    "pituitary": "pituitary", "pituitary_tumor": "pituitary", "pituitary tumor": "pituitary", "pi": "pituitary",
}
#: figshare `.mat` / labels.csv integer codes.
FIGSHARE_LABELS = {1: "meningioma", 2: "glioma", 3: "pituitary"}


class DatasetError(ValueError):
    """A dataset folder does not have the expected layout; the message names the path."""


class Sample(NamedTuple):
    path: Path
    label: str


class MaskedSample(NamedTuple):
    image: Path
    mask: Path
    label: str | None


def canonical_class(name: str) -> str:
    """Map a class-folder name (``glioma_tumor``, ``No Tumor``, ...) onto a canonical class."""
    key = "_".join(name.strip().lower().replace("-", " ").replace("_", " ").split())  # "Glioma Tumor" too
    if key in CLASS_ALIASES:
        return CLASS_ALIASES[key]
    if key.replace("_", " ") in CLASS_ALIASES:
        return CLASS_ALIASES[key.replace("_", " ")]
    if key.replace("_", "") in CLASS_ALIASES:
        return CLASS_ALIASES[key.replace("_", "")]
    raise DatasetError(f"{name!r}: unknown class folder; expected one of {', '.join(CLASSES)} "
                       f"(or an alias such as glioma_tumor, no_tumor)")


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def list_class_folder(root: str | os.PathLike) -> list[Sample]:
    """Images of a Kaggle-layout folder ``root/<class>/**/<image>``, sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory")
    samples: list[Sample] = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if not class_dirs:
        raise DatasetError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    for class_dir in class_dirs:
        try:
            label = canonical_class(class_dir.name)
        except DatasetError as exc:
            raise DatasetError(f"{class_dir}: {exc}") from None
        for path in sorted(class_dir.rglob("*")):
            # hidden folders (.ipynb_checkpoints) are skipped as `segment` skips them, or their
            # images would need masks that never get made
            hidden = any(part.startswith(".") for part in path.relative_to(class_dir).parts)
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not hidden:
                samples.append(Sample(path, label))
    if not samples:
        raise DatasetError(f"{root}: class folders hold no images")
    return samples


_BRISC_CLASS = re.compile(r"_(gl|me|pi|no)_(ax|co|sa)_")


def list_mask_dataset(root: str | os.PathLike) -> list[MaskedSample]:
    """Pairs of ``root/images/<id>.*`` and ``root/masks/<id>.png``.

    The label comes from ``root/labels.csv`` (``id,label``) when present, else from a
    BRISC-style name (``..._gl_ax_...``), else ``None``. Images without a mask are an error.
    """
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir() or not masks_dir.is_dir():
        raise DatasetError(f"{root}: expected sub-folders images/ and masks/")
    labels: dict[str, str] = {}
    labels_csv = root / "labels.csv"
    if labels_csv.is_file():
        with labels_csv.open(newline="") as fh:
            for row in csv.DictReader(fh):
                value = row["label"].strip()
                labels[row["id"].strip()] = (FIGSHARE_LABELS[int(value)] if value.isdigit()
                                             else canonical_class(value))
    masks = {p.stem: p for p in masks_dir.iterdir() if p.is_file() and _visible(p)}
    samples: list[MaskedSample] = []
    for image in sorted(p for p in images_dir.iterdir() if p.is_file() and _visible(p)):
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if image.stem not in masks:
            raise DatasetError(f"{image}: no mask {masks_dir}/{image.stem}.png")
        label = labels.get(image.stem)
        if label is None:
            match = _BRISC_CLASS.search(image.stem)
            if match:
                label = canonical_class(match.group(1))
        samples.append(MaskedSample(image, masks[image.stem], label))
    if not samples:
        raise DatasetError(f"{root}: images/ holds no images")
    return samples


def stratified_split(samples: Iterable[Sample], val_fraction: float = 0.15, seed: int = 0,
                     groups: dict[str, str] | None = None) -> dict[str, str]:
    """Assign each sample to ``train`` or ``val``, stratified by class and deterministic in ``seed``.

    ``groups`` maps a path to a group id (near-duplicates from the audit): a group never straddles
    the split, so validation accuracy is not inflated by copies of training images.
    Returns ``{str(path): "train" | "val"}``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups = groups or {}
    by_class: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path, label in samples:
        key = str(path)
        by_class[label][groups.get(key, key)].append(key)
    # Shuffle groups by a name that does not depend on how the folder was spelled, so the same
    # data always gives the same split.
    order_key = {gid: min(Path(k).as_posix().rsplit("/", 2)[-2] + "/" + Path(k).name for k in members)
                 for cls in by_class.values() for gid, members in cls.items()}
    assignment: dict[str, str] = {}
    group_split: dict[str, str] = {}  # a group filed under two classes goes where its first class put it
    rng = random.Random(seed)
    for label in sorted(by_class):
        group_ids = sorted(by_class[label], key=lambda g: order_key[g])
        rng.shuffle(group_ids)
        n_total = sum(len(by_class[label][g]) for g in group_ids)
        target, n_val = round(n_total * val_fraction), 0
        for gid in group_ids:
            members = by_class[label][gid]
            split = group_split.get(gid) or ("val" if n_val < target else "train")
            group_split[gid] = split
            n_val += len(members) if split == "val" else 0
            for key in members:
                assignment[key] = split
    return assignment


def write_split(path: str | os.PathLike, samples: Iterable[Sample], assignment: dict[str, str],
                root: str | os.PathLike | None = None) -> Path:
    """Write ``path,label,split`` (paths relative to ``root`` when given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:  # names as on disk
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        for sample_path, label in samples:
            shown = os.path.relpath(sample_path, root) if root else str(sample_path)
            writer.writerow([shown, label, assignment[str(sample_path)]])
    os.replace(tmp, path)
    return path


def read_split(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, list[Sample]]:
    """Read a split file back: ``{"train": [...], "val": [...]}`` with paths joined to ``root``."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: split file not found (make it with `python -m pipeline split`)")
    out: dict[str, list[Sample]] = {"train": [], "val": []}
    with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"path", "label", "split"} <= set(reader.fieldnames):
            raise DatasetError(f"{path}: expected columns path,label,split")
        for row in reader:
            sample_path = Path(root) / row["path"] if root else Path(row["path"])
            out.setdefault(row["split"], []).append(Sample(sample_path, canonical_class(row["label"])))
    return out


def duplicate_groups(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Union-find over duplicate pairs -> ``{path: group representative}``."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {x: find(x) for x in parent}


def _audit_cwd(train_duplicates_csv: Path) -> str:
    """The directory the audit that wrote ``train_duplicates_csv`` ran from (its ``audit.json``), else ``.``."""
    try:
        return json.loads(train_duplicates_csv.with_name("audit.json").read_text()).get("cwd") or "."
    except (OSError, ValueError):
        return "."


def make_split(train_dir: str | os.PathLike, out: str | os.PathLike, val_fraction: float = 0.15,
               seed: int = 0, train_duplicates_csv: str | os.PathLike | None = None) -> dict[str, int]:
    """Carve a validation split from ``train_dir`` and save it; returns counts per split."""
    samples = list_class_folder(train_dir)
    groups = None
    if train_duplicates_csv and not Path(train_duplicates_csv).is_file():
        raise DatasetError(f"{train_duplicates_csv}: not found (run `audit` first, or leave out --train-duplicates)")
    if train_duplicates_csv:
        # relative paths are the audit's, as it was given them: resolve them where it ran
        with open(train_duplicates_csv, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            reader = csv.DictReader(fh)
            if not {"path_a", "path_b"} <= set(reader.fieldnames or []):
                raise DatasetError(f"{train_duplicates_csv}: expected columns path_a,path_b (the audit's "
                                   f"train_duplicates.csv), got {','.join(reader.fieldnames or [])}")
            pairs = [(r["path_a"], r["path_b"]) for r in reader]
        groups = {}
        # the audit's directory first; the current one when the checkout has moved since
        for base in dict.fromkeys((_audit_cwd(Path(train_duplicates_csv)), ".")):
            by_real = duplicate_groups((os.path.realpath(os.path.join(base, a)),
                                        os.path.realpath(os.path.join(base, b))) for a, b in pairs)
            groups = {str(p): by_real[os.path.realpath(p)] for p, _ in samples if os.path.realpath(p) in by_real}
            if groups:
                break
        if pairs and not groups:
            print(f"warning: none of the {len(pairs)} duplicate pairs in {train_duplicates_csv} names an image "
                  f"under {train_dir}; copies may straddle the split (was the audit run on this folder?)",
                  file=sys.stderr)
    assignment = stratified_split(samples, val_fraction, seed, groups)
    if "val" not in assignment.values():
        raise DatasetError(f"{train_dir}: {len(samples)} images give no validation image at --val-fraction "
                           f"{val_fraction}; add images or raise the fraction")
    if "train" not in assignment.values():
        raise DatasetError(f"{train_dir}: {len(samples)} images give no training image at --val-fraction "
                           f"{val_fraction}; lower the fraction")
    write_split(out, samples, assignment, root=train_dir)
    counts: dict[str, int] = defaultdict(int)
    for split in assignment.values():
        counts[split] += 1
    return dict(counts)
