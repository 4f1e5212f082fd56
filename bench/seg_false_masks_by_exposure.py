"""False tumor masks on the Testing no-tumor slices, split by whether the segmenter trained on a copy.

The Kaggle Testing no-tumor slices are mostly near-copies of Training ones (the leakage audit),
and the shipped segmenters trained on 600 Training no-tumor slices as backgrounds. A false-mask
rate on Testing therefore mixes slices the segmenter saw (through a copy) with slices it did not.
This splits it, from files the pipeline writes:

    python bench/seg_false_masks_by_exposure.py --segments runs/s25/notumor_seg-lite0-fine-cascade/segments.csv \
        --split weights/seg_lite0_cascade_split.csv --duplicates runs/audit/duplicates.csv

``--segments``: ``segment``'s CSV over ``Testing/notumor``; ``--split``: the segmenter's ``seg-data``
split (``source,name,split``; backgrounds are ``background_<Training stem>``); ``--duplicates``: the
audit's Testing-Training pairs.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import PurePosixPath


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--segments", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--duplicates", required=True)
    a = p.parse_args(argv)
    with open(a.split, newline="") as fh:
        seen_stems = {r["name"][len("background_"):] for r in csv.DictReader(fh)
                      if r["source"] == "background" and r["split"] == "train"}
    copies: dict[str, set[str]] = {}
    with open(a.duplicates, newline="") as fh:
        for r in csv.DictReader(fh):
            test = PurePosixPath(r["test_path"])
            if test.parent.name == "notumor":  # segments.csv holds paths under Testing/notumor
                copies.setdefault(test.name, set()).add(PurePosixPath(r["train_path"]).stem)
    groups = {"copy among its training backgrounds": [0, 0], "no such copy": [0, 0]}
    with open(a.segments, newline="") as fh:
        for r in csv.DictReader(fh):
            if r["status"] != "ok":
                continue
            seen = bool(copies.get(PurePosixPath(r["path"]).name, set()) & seen_stems)
            g = groups["copy among its training backgrounds" if seen else "no such copy"]
            g[0] += 1
            g[1] += r["found"] == "true"
    out = {k: {"slices": n, "false_masks": f, "rate": round(f / n, 4) if n else None} for k, (n, f) in groups.items()}
    total_n, total_f = (sum(v[i] for v in groups.values()) for i in (0, 1))
    out["all"] = {"slices": total_n, "false_masks": total_f, "rate": round(total_f / total_n, 4) if total_n else None}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
