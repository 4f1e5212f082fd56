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
import io
import json
import os
import sys
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

    figshare_images = sorted(p for p in Path(figshare_dir, "images").glob("*")
                             if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not figshare_images:
        raise DatasetError(f"{figshare_dir}: no images/<id>.jpg|.png (expected the figshare-cheng2017 layout)")
    items, split_of = [], {}
    for split in splits:
        for path, label in list_class_folder(Path(kaggle_root) / split):
            items.append((str(path), label))
            split_of[str(path)] = split
    tumor_items = [it for it in items if it[1] != "notumor"]
    # figshare on the reference side: its within-set pairs are few, Kaggle's would be many.
    result = find_duplicates([(str(p), "figshare") for p in figshare_images], tumor_items, workers=workers)
    copied = {pair["test_path"] for pair in result["cross"]}
    # a tumor slice that could not be read was never compared: calling it SARTAJ would be a guess
    unread = {e["path"] for e in result["errors"] if e.get("split") == "test"}
    for path in sorted(unread):
        print(f"warning: {path}: unreadable, so its source is unknown", file=sys.stderr)
    return [{"path": p, "split": split_of[p], "label": lab,
             "source": "unknown" if p in unread else source_of(lab, p in copied)} for p, lab in items]


def write_sources(rows: list[dict], out: str | os.PathLike) -> dict:
    """Write ``sources.csv``, the per-split/source path lists and ``sources.json``; return the counts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    present = [*SOURCES, *sorted({r["source"] for r in rows} - set(SOURCES))]  # "unknown" where a file was unread

    def write_text(path: Path, text: str) -> None:  # names as on disk, whatever their bytes; whole or not at all
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, path)

    for split in sorted({r["split"] for r in rows}):
        for source in present:
            paths = [r["path"] for r in rows if r["split"] == split and r["source"] == source]
            write_text(out / f"{split.lower()}_{source}.txt", "".join(p + "\n" for p in paths))
    counts = Counter((r["split"], r["label"], r["source"]) for r in rows)
    summary = {split: {label: {s: counts[(split, label, s)] for s in present if counts[(split, label, s)]}
                       for label in sorted({r["label"] for r in rows})}
               for split in sorted({r["split"] for r in rows})}
    write_text(out / "sources.json", json.dumps(summary, indent=2))
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=["path", "split", "label", "source"], lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "sources.csv", buf.getvalue())  # last: Make takes it as the sign that all is written
    return summary

