"""Do two ``predict`` runs on the same folder agree? (CPU vs CUDA, torch vs ONNX, before vs after)

    python bench/compare_predictions.py A/predictions.csv B/predictions.csv [--json OUT.json]

Rows are matched by their path (relative to the input folder). Prints, for each run, accuracy
against the class-folder labels (when the paths have them), then how many labels, "found" flags
and lesion boxes differ, the largest probability difference, and the rows that are errors or are
in one run only. Exit status 0 either way (agreement is a measurement here), unless ``--strict``:
then 1 when anything differs or either run has an error row or a row the other lacks.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def read(path: Path) -> tuple[dict[str, dict], list[str]]:
    """(ok rows by path, paths of error rows)."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return {r["path"]: r for r in rows if r["status"] == "ok"}, [r["path"] for r in rows if r["status"] != "ok"]


def truth(path: str) -> str | None:
    parts = Path(path).parts
    return parts[-2] if len(parts) >= 2 and parts[-2] in CLASSES else None


BOX = ("x0", "y0", "x1", "y1")


def compare(a: dict[str, dict], b: dict[str, dict], errors_a=(), errors_b=()) -> dict:
    shared = sorted(set(a) & set(b))
    probs = [max(abs(float(a[k][f"p_{c}"]) - float(b[k][f"p_{c}"])) for c in CLASSES) for k in shared]
    labelled = [k for k in shared if truth(k)]
    out = {"rows_a": len(a), "rows_b": len(b), "shared": len(shared),
           "error_rows_a": list(errors_a), "error_rows_b": list(errors_b),
           "only_in_a": sorted(set(a) - set(b) - set(errors_b)), "only_in_b": sorted(set(b) - set(a) - set(errors_a)),
           "label_differs": [k for k in shared if a[k]["label"] != b[k]["label"]],
           "found_differs": sum(a[k]["found"] != b[k]["found"] for k in shared),
           "box_differs": sum(any(a[k].get(c) != b[k].get(c) for c in BOX) for k in shared),
           # None, not 0: nothing shared is no evidence of agreement
           "max_abs_prob_diff": max(probs) if probs else None,
           "mean_abs_prob_diff": sum(probs) / len(probs) if probs else None}
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
    p.add_argument("--strict", action="store_true", help="exit 1 unless the runs agree row for row")
    args = p.parse_args(argv)
    (a, errors_a), (b, errors_b) = read(args.a), read(args.b)
    result = compare(a, b, errors_a, errors_b)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    differs = (result["error_rows_a"] or result["error_rows_b"] or result["only_in_a"] or result["only_in_b"]
               or result["label_differs"] or result["found_differs"] or result["box_differs"] or not result["shared"])
    return 1 if args.strict and differs else 0


if __name__ == "__main__":
    sys.exit(main())
