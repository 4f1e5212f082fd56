"""Do two ``predict`` runs on the same folder agree? (CPU vs CUDA, torch vs ONNX, before vs after)

    python bench/compare_predictions.py A/predictions.csv B/predictions.csv [--json OUT.json]

Rows are matched by their path (relative to the input folder). Prints, for each run, accuracy
against the class-folder labels (when the paths have them), then how many labels and "found"
flags differ and the largest probability difference. Exit status 0 either way: agreement is a
measurement here, not a test.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def read(path: Path) -> dict[str, dict]:
    with path.open(newline="") as fh:
        return {row["path"]: row for row in csv.DictReader(fh) if row["status"] == "ok"}


def truth(path: str) -> str | None:
    parts = Path(path).parts
    return parts[-2] if len(parts) >= 2 and parts[-2] in CLASSES else None


def compare(a: dict[str, dict], b: dict[str, dict]) -> dict:
    shared = sorted(set(a) & set(b))
    probs = [max(abs(float(a[k][f"p_{c}"]) - float(b[k][f"p_{c}"])) for c in CLASSES) for k in shared]
    labelled = [k for k in shared if truth(k)]
    out = {"rows_a": len(a), "rows_b": len(b), "shared": len(shared),
           "label_differs": [k for k in shared if a[k]["label"] != b[k]["label"]],
           "found_differs": sum(a[k]["found"] != b[k]["found"] for k in shared),
           "max_abs_prob_diff": max(probs, default=0.0),
           "mean_abs_prob_diff": sum(probs) / len(probs) if probs else 0.0}
    for name, run in (("a", a), ("b", b)):
        if labelled:
            right = sum(run[k]["label"] == truth(k) for k in labelled)
            out[f"accuracy_{name}"] = right / len(labelled)
            out[f"errors_{name}"] = len(labelled) - right
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    result = compare(read(args.a), read(args.b))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
