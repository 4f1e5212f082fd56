"""Which public source each Kaggle slice came from, for leave-one-source-out evaluation.

The Kaggle set merges figshare (Cheng et al.), SARTAJ and Br35H: every no-tumor slice is
Br35H, the tumor slices are figshare or SARTAJ. A classifier can learn the source instead of
the tumor, and Testing cannot show it (its sources are Training's). Training without one
source and testing on it is the closest proxy for scans from a hospital the model never saw.

A tumor slice is ``figshare`` when the leakage audit's matcher finds a near-copy of it in the
figshare-cheng2017 folder, otherwise ``sartaj`` (the only other tumor source); no-tumor slices
are ``br35h``. Writes ``OUT/sources.csv`` (``path,split,label,source``), one
``OUT/<split>_<source>.txt`` path list per split and source (for ``train-cls --drop`` and
``evaluate-cls --subset``) and ``OUT/sources.json`` (counts).
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

SOURCES = ("figshare", "sartaj", "br35h")


def source_of(label: str, has_figshare_copy: bool) -> str:
    """The source of a Kaggle slice from its class and whether figshare holds a copy of it."""
    if label == "notumor":
        return "br35h"
    return "figshare" if has_figshare_copy else "sartaj"


def tag_sources(kaggle_root: str | os.PathLike, figshare_dir: str | os.PathLike,
                splits: tuple[str, ...] = ("Training", "Testing"), workers: int = 2) -> list[dict]:
    """Rows ``{"path", "split", "label", "source"}`` for every image under ``kaggle_root/<split>``.

    Paths are written as ``<kaggle_root>/<split>/<class>/<file>``, the same strings the class
    caches and the split file hold when built from the same root.
    """
    from pipeline.audit import find_duplicates
    from pipeline.datasets import DatasetError, list_class_folder

    figshare_images = sorted(Path(figshare_dir, "images").glob("*.jpg"))
    if not figshare_images:
        raise DatasetError(f"{figshare_dir}: no images/*.jpg (expected the figshare-cheng2017 layout)")
    items, split_of = [], {}
    for split in splits:
        for path, label in list_class_folder(Path(kaggle_root) / split):
            items.append((str(path), label))
            split_of[str(path)] = split
    tumor_items = [it for it in items if it[1] != "notumor"]
    # figshare on the reference side: its within-set pairs are few, Kaggle's would be many.
    result = find_duplicates([(str(p), "figshare") for p in figshare_images], tumor_items, workers=workers)
    copied = {pair["test_path"] for pair in result["cross"]}
    return [{"path": p, "split": split_of[p], "label": lab, "source": source_of(lab, p in copied)}
            for p, lab in items]


def write_sources(rows: list[dict], out: str | os.PathLike) -> dict:
    """Write ``sources.csv``, the per-split/source path lists and ``sources.json``; return the counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sources.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "split", "label", "source"])
        writer.writeheader()
        writer.writerows(rows)
    for split in sorted({r["split"] for r in rows}):
        for source in SOURCES:
            paths = [r["path"] for r in rows if r["split"] == split and r["source"] == source]
            (out / f"{split.lower()}_{source}.txt").write_text("".join(p + "\n" for p in paths))
    counts = Counter((r["split"], r["label"], r["source"]) for r in rows)
    summary = {split: {label: {s: counts[(split, label, s)] for s in SOURCES if counts[(split, label, s)]}
                       for label in sorted({r["label"] for r in rows})}
               for split in sorted({r["split"] for r in rows})}
    (out / "sources.json").write_text(json.dumps(summary, indent=2))
    return summary

