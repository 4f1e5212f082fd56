"""``evaluate-cls``: score a classifier on a cached test split -> ``predictions.csv`` + ``metrics.json``.

Either ``--cls WEIGHTS --data CACHE.npz`` (the classifier is run on the cache, whose mode and
size must be the classifier's own) or ``--predictions CSV`` written by anything else (e.g. an
external YOLOv8-cls baseline) in the same column layout::

    path,true,pred,confidence,p_glioma,p_meningioma,p_notumor,p_pituitary,found

``true``/``pred`` are class names (or indices); only ``path``, ``true`` and ``pred`` are required.
A ``predictions.csv`` from ``predict`` (column ``label``, no ``true``) is accepted too when the
true class can be read from each file's parent folder (Kaggle layout).

With ``--clean clean_test.txt`` (from ``audit``) metrics are also reported on the Testing
images that have no near-copy in Training, matched by resolved path.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline import CLASSES
from pipeline.evaluate import bootstrap_cis, classification_metrics
from pipeline.roi import view_of

PRED_COLUMNS = ["path", "true", "pred", "confidence", *[f"p_{c}" for c in CLASSES], "found"]
REQUIRED_COLUMNS = ("path", "true", "pred")


# --- predictions.csv ------------------------------------------------------------------------------

def _class_index(value: str, where: str) -> int:
    value = str(value).strip()
    if value in CLASSES:
        return CLASSES.index(value)
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(CLASSES):
        return int(value)
    raise ValueError(f"{where}: {value!r} is not a class ({', '.join(CLASSES)}) or class index")


def write_predictions(path: str | os.PathLike, paths: Sequence[str], y_true: Sequence[int], probs: np.ndarray,
                      found: Sequence[bool] | None = None) -> Path:
    """Write ``predictions.csv`` (pred = argmax of ``probs``, confidence = its probability)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    probs = np.asarray(probs, np.float64)
    pred = probs.argmax(1)
    tmp = path.with_suffix(".tmp.csv")
    with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(PRED_COLUMNS)
        for i, p in enumerate(paths):
            f = "" if found is None else str(bool(found[i])).lower()
            w.writerow([p, CLASSES[int(y_true[i])], CLASSES[int(pred[i])], f"{probs[i, pred[i]]:.6f}",
                        *[f"{v:.6f}" for v in probs[i]], f])
    os.replace(tmp, path)
    return path


def read_predictions(path: str | os.PathLike) -> dict:
    """Read a predictions CSV -> ``{"paths": list[str], "y_true": (N,), "y_pred": (N,), "probs": (N, 4) or None,
    "found": list[str], "skipped": list[str], "source": str}``. Raises ValueError naming what is missing.

    ``skipped``: paths of the rows ``predict`` could not read (status error, no label), in file
    order; they are not classifications, so they are left out of every metric but counted.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "predictions.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions CSV not found (write it with `evaluate-cls`)")
    # predict writes a file name that is not UTF-8 byte for byte; read it back the same way
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        rows = list(reader)
    # the prediction: `pred`, or predict's `label`; the truth: `true`, or the class folder of `path`
    pred_col = "pred" if "pred" in cols else "label" if "label" in cols else None
    from_folder = "true" not in cols
    if pred_col is None or "path" not in cols or (from_folder and pred_col != "label"):
        missing = [c for c in REQUIRED_COLUMNS if c not in cols]
        raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(PRED_COLUMNS)}, "
                         f"or predict's columns (path,label,...) with or without a `true` column")

    def scored(row: dict) -> bool:
        """Rows `predict` could not read (status error, no label) are skipped; an ok row without
        its `pred` or `label` is a damaged file, refused below by the class check."""
        if row.get("status", "ok") not in ("ok", "", None):
            return False
        # without a status column an empty label is the only sign of a read error
        return "status" in cols or pred_col != "label" or bool(row.get("label"))

    paths, y_true, y_pred, kept, skipped = [], [], [], [], []
    for i, row in enumerate(rows, start=2):
        if not scored(row):
            skipped.append(row["path"])
            continue
        if from_folder:
            parent = Path(row["path"]).parent.name
            if parent not in CLASSES:
                raise ValueError(f"{path}: no `true` column and the parent folder {parent!r} of line {i} is not "
                                 f"a class; add a `true` column")
            y_true.append(CLASSES.index(parent))
        else:
            y_true.append(_class_index(row["true"], f"{path}:{i}"))
        y_pred.append(_class_index(row[pred_col], f"{path}:{i}"))
        paths.append(row["path"])
        kept.append(row)
    prob_cols = [f"p_{c}" for c in CLASSES]
    probs = None
    if all(c in cols for c in prob_cols) and all(r[c] not in ("", None) for r in kept for c in prob_cols):
        probs = np.array([[float(r[c]) for c in prob_cols] for r in kept], np.float64).reshape(-1, len(CLASSES))
    return {"paths": paths, "y_true": np.array(y_true, np.int64), "y_pred": np.array(y_pred, np.int64),
            "probs": probs, "found": [r.get("found", "") or "" for r in kept], "skipped": skipped,
            "source": str(path)}


# --- matching paths to clean_test.txt -------------------------------------------------------------

def _resolved(p: str) -> str:
    return str(Path(p).resolve())


def _tail(p: str, k: int = 3) -> str:
    return "/".join(Path(str(p).replace("\\", "/")).parts[-k:])


#: How paths of two lists are matched, in order: resolved, then ``Testing/<class>/<file>``, then
#: ``<class>/<file>`` (``predict`` writes paths relative to its input). Shared by :func:`clean_mask`
#: and the pairing of runs in :mod:`pipeline.report`.
PATH_KEYS = (("resolved path", _resolved), ("last three path components", lambda p: _tail(p, 3)),
             ("last two path components", lambda p: _tail(p, 2)))


def clean_mask(paths: Sequence[str], clean: set[str]) -> tuple[np.ndarray, str]:
    """Which ``paths`` are in the clean set (resolved paths, as :func:`pipeline.audit.load_clean_list` gives).

    Paths are resolved against the current directory. If none matches that way (the CSV was
    written from another directory), the last three components (``Testing/<class>/<file>``)
    are compared instead, then the last two (``<class>/<file>``, as ``predict`` writes paths
    relative to its input); the second value says which match was used.
    """
    mask = np.array([_resolved(p) in clean for p in paths], bool)
    if mask.any() or not paths or not clean:
        return mask, "resolved path"
    for how, key in PATH_KEYS[1:]:
        # the paths as written, where the list has them: a linked image resolves to another name
        tails = {key(c) for c in [*clean, *getattr(clean, "written", ())]}
        tail_mask = np.array([key(p) in tails for p in paths], bool)
        if tail_mask.any():
            print(f"warning: no path matched the clean list after resolving against {Path.cwd()}; matched "
                  f"{int(tail_mask.sum())} by their {how.replace(' path', '')} instead", file=sys.stderr)
            return tail_mask, how
    print(f"warning: none of the {len(paths)} paths is in the clean list (compared as resolved paths and by "
          f"their last three or two components): the clean subset is empty", file=sys.stderr)
    return mask, "resolved path"


def load_clean(path: str | os.PathLike | None) -> set[str] | None:
    if not path:
        return None
    from pipeline.audit import load_clean_list

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: clean list not found (run `audit` first)")
    return load_clean_list(path)


# --- metrics ----------------------------------------------------------------------------------

def _jsonable(obj):
    """NaN -> None and numpy scalars/tuples -> plain JSON values."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else float(obj)
    return obj


def metrics_with_ci(y_true: Sequence[int], y_pred: Sequence[int], n_boot: int = 1000, seed: int = 0,
                    alpha: float = 0.05) -> dict:
    """:func:`classification_metrics` plus ``"ci"``: percentile-bootstrap intervals of every metric."""
    m = classification_metrics(y_true, y_pred)
    m["ci"] = bootstrap_cis(y_true, y_pred, n_boot=n_boot, seed=seed, alpha=alpha)
    m["ci_level"] = 1 - alpha
    return m


def evaluate_predictions(pred: dict, clean: set[str] | None = None, n_boot: int = 1000, seed: int = 0,
                         alpha: float = 0.05, subsets: dict[str, set[str]] | None = None) -> dict:
    """``{"n_skipped": rows not scored, "all": metrics, "clean": metrics or absent, "subsets": {name: metrics}
    or absent}`` for a :func:`read_predictions` result. ``subsets`` are named path sets (resolved, as
    :func:`pipeline.audit.load_clean_list` gives), e.g. the Testing slices of one source."""
    out = {"bootstrap": {"n_boot": n_boot, "seed": seed, "alpha": alpha},
           "n_skipped": len(pred.get("skipped", ())),
           "all": metrics_with_ci(pred["y_true"], pred["y_pred"], n_boot, seed, alpha)}
    if clean is not None:
        mask, how = clean_mask(pred["paths"], clean)
        out["clean"] = metrics_with_ci(pred["y_true"][mask], pred["y_pred"][mask], n_boot, seed, alpha)
        out["clean"].update({"clean_list_size": len(clean), "matched_by": how})
    for name, paths in (subsets or {}).items():
        mask, how = clean_mask(pred["paths"], paths)
        out.setdefault("subsets", {})[name] = {
            **metrics_with_ci(pred["y_true"][mask], pred["y_pred"][mask], n_boot, seed, alpha),
            "list_size": len(paths), "matched_by": how}
    return out


def parse_subsets(specs: Sequence[str] | None) -> dict[str, set[str]]:
    """``["name=list.txt", ...]`` -> ``{name: resolved paths}``; a bad spec or missing file raises."""
    from pipeline.audit import load_clean_list

    out = {}
    for spec in specs or ():
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--subset {spec!r}: expected NAME=PATH_LIST.txt")
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: path list for --subset {name} not found (run `sources` first?)")
        out[name] = load_clean_list(path, base=Path.cwd())
    return out


# --- running a classifier on a cache -----------------------------------------------------------

def cache_view(cache: Mapping) -> tuple:
    """The ``(mode, size, margin)`` view a cache from `crop` holds (caches without a margin used 0.25)."""
    return view_of(str(cache.get("mode", "?")), int(cache.get("size", -1)), cache.get("margin"))


def _describe(mode, size, margin) -> str:
    return f"mode={mode} size={size}" + ("" if margin is None else f" margin={margin:g}")


def predict_cache(classifier, cache: dict | Sequence[dict], batch_size: int = 64, tta: str = "none") -> np.ndarray:
    """(N, 4) probabilities of the classifier on ``cache["images"]``, after checking mode and size.

    An ensemble whose members read different inputs takes one cache per (mode, size), listing the
    same slices in the same order. ``tta``: see :func:`pipeline.classify.predict.predict_views_tta`.
    """
    from pipeline.classify.predict import predict_views_tta

    caches = [cache] if isinstance(cache, Mapping) else list(cache)
    have = {}
    for i, c in enumerate(caches):
        if cache_view(c) in have:  # which of the two would be scored, and against whose labels, is a guess
            first = next(j for j, x in enumerate(caches) if x is have[cache_view(c)])
            raise ValueError(f"caches {first + 1} and {i + 1} are both "
                             f"{_describe(*cache_view(c))}; give one cache per input view")
        have[cache_view(c)] = c
    views = tuple(getattr(classifier, "views", (view_of(classifier.mode, classifier.size),)))
    for mode, size, margin in views:
        if (mode, size, margin) not in have:
            got = ", ".join(_describe(*v) for v in have) or "none"
            raise ValueError(f"cache is {got} but the classifier ({classifier.meta.get('model')}) "
                             f"was trained on {_describe(mode, size, margin)}; build a matching cache with "
                             f"`crop --mode {mode} --size {size}{'' if margin is None else f' --margin {margin:g}'}`")
    used = [have[v] for v in views]
    trained_on = getattr(classifier, "segmenter_sha256", None)
    for c in used:
        made_by = c.get("segmenter_sha256")
        if trained_on and made_by is not None and str(made_by) != trained_on:
            print(f"warning: the {_describe(*cache_view(c))} cache was made from the masks of segmenter "
                  f"{str(made_by)[:16]}..., the classifier was trained on those of {trained_on[:16]}...: its crops "
                  f"differ from the ones it learnt from", file=sys.stderr)
    for c in used[1:]:
        if "paths" in c and "paths" in used[0] and not np.array_equal(c["paths"], used[0]["paths"]):
            raise ValueError("the caches list different slices (or in another order); build them from one split")
    n = len(used[0]["images"])
    out = [predict_views_tta(classifier, {v: have[v]["images"][s:s + batch_size] for v in views}, tta)
           for s in range(0, n, batch_size)]
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


def add_arguments(p) -> None:
    from pipeline.cli import _fraction, _positive_int

    p.add_argument("--cls", help="classifier: a manifest name from weights/manifest.json or a .pt path")
    p.add_argument("--data", nargs="+", help="test cache .npz from `crop` (same mode and size as the classifier); "
                                             "an ensemble of full and crop models takes both caches")
    p.add_argument("--predictions", help="instead of --cls/--data: a predictions CSV from another model "
                                         f"(columns {','.join(PRED_COLUMNS)}; path,true,pred required), or "
                                         f"`predict`'s predictions.csv, its true class read from the folder name")
    p.add_argument("--clean", help="clean_test.txt from `audit`: also report metrics on that subset")
    p.add_argument("--subset", action="append", metavar="NAME=LIST",
                   help="also report metrics on the paths listed in LIST (one per line), e.g. the Testing "
                        "slices of one source from `sources`; repeatable")
    p.add_argument("--out", required=True, help="output folder: predictions.csv, metrics.json")
    p.add_argument("--batch-size", type=int, default=64)
    from pipeline.classify.predict import TTA_MODES

    p.add_argument("--tta", choices=TTA_MODES, default="none",
                   help="test-time augmentation: hflip averages each slice with its left-right mirror "
                        "(twice the compute)")
    p.add_argument("--n-boot", type=_positive_int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--alpha", type=_fraction, default=0.05, help="1 - confidence level of the intervals")


def run(args) -> int:
    from pipeline.classify.data import load_cache

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed = getattr(args, "seed", None) or 0
    n_boot, alpha = getattr(args, "n_boot", 1000), getattr(args, "alpha", 0.05)
    clean = load_clean(getattr(args, "clean", None))
    subsets = parse_subsets(getattr(args, "subset", None))
    if getattr(args, "predictions", None):
        if args.cls or args.data:
            raise ValueError("give either --predictions or --cls with --data, not both")
        pred = read_predictions(args.predictions)
        dest = out / "predictions.csv"
        probs = pred["probs"]
        if probs is None:  # keep what we know; confidence and probabilities left empty
            probs = np.full((len(pred["paths"]), len(CLASSES)), np.nan)
        if Path(pred["source"]).resolve() != dest.resolve():
            _write_rows(dest, pred, probs)
        source = {"predictions": str(args.predictions)}
    else:
        if not (args.cls and args.data):
            raise ValueError("evaluate-cls needs --cls WEIGHTS and --data CACHE.npz, or --predictions CSV")
        from pipeline.classify.predict import load_classifier

        classifier = load_classifier(args.cls, device=getattr(args, "device", "cpu") or "cpu")
        data = [str(d) for d in ([args.data] if isinstance(args.data, (str, os.PathLike)) else args.data)]
        caches = [load_cache(d) for d in data]
        views = [cache_view(c) for c in caches]
        for i, v in enumerate(views):
            if v in views[:i]:
                raise ValueError(f"{data[views.index(v)]} and {data[i]} are both {_describe(*v)}: one cache per "
                                 f"input view (evaluate one split at a time)")
        tta = getattr(args, "tta", "none") or "none"
        probs = predict_cache(classifier, caches, getattr(args, "batch_size", 64) or 64, tta=tta)
        used = [c for c in caches if cache_view(c) in classifier.views]
        cache = next((c for c in used if str(c.get("mode")) != "full"), used[0])  # its `found` is stage 1's
        paths = [str(p) for p in cache["paths"]]
        write_predictions(out / "predictions.csv", paths, cache["labels"], probs, cache.get("found"))
        pred = read_predictions(out / "predictions.csv")
        source = {"cls": str(args.cls), "data": data[0] if len(data) == 1 else data,
                  **{k: classifier.meta.get(k) for k in ("model", "mode", "size")},
                  **({"tta": tta} if tta != "none" else {})}
    result = {"source": source, **evaluate_predictions(pred, clean, n_boot, seed, alpha, subsets)}
    (out / "metrics.json").write_text(json.dumps(_jsonable(result), indent=2))
    def brief(parts: dict) -> dict:
        return {k: {"n": v["n"], "accuracy": round(v["accuracy"], 4), "macro_f1": round(v["macro_f1"], 4)}
                for k, v in parts.items() if v["n"]}

    summary = brief({k: result[k] for k in ("all", "clean") if result.get(k)})
    if result.get("subsets"):  # under their own key: a subset may be called `all`
        summary["subsets"] = brief(result["subsets"])
    if result["n_skipped"]:
        print(f"warning: {result['n_skipped']} rows of {pred['source']} were not scored (read errors) and are "
              f"left out of every metric", file=sys.stderr)
    skipped = {"n_skipped": result["n_skipped"]} if result["n_skipped"] else {}
    print(json.dumps({"out": str(out), **summary, **skipped}))
    return 0


def _write_rows(dest: Path, pred: dict, probs: np.ndarray) -> None:
    """Re-write a foreign predictions CSV in our column layout (pred kept as given, not re-derived).

    Rows that were not scored are kept, with a ``status`` column saying ``error``, so that
    ``compare`` on this folder still counts them.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    skipped = pred.get("skipped", [])
    with open(dest, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(PRED_COLUMNS + (["status"] if skipped else []))
        ok = ["ok"] if skipped else []
        for i, p in enumerate(pred["paths"]):
            k = int(pred["y_pred"][i])
            pr = probs[i]
            fmt = (lambda v: "" if np.isnan(v) else f"{v:.6f}")
            w.writerow([p, CLASSES[int(pred["y_true"][i])], CLASSES[k], fmt(pr[k]), *[fmt(v) for v in pr],
                        pred["found"][i] if i < len(pred["found"]) else "", *ok])
        for p in skipped:
            w.writerow([p, *[""] * (len(PRED_COLUMNS) - 1), "error"])


__all__ = ("PRED_COLUMNS", "PATH_KEYS", "read_predictions", "write_predictions", "clean_mask",
           "evaluate_predictions", "metrics_with_ci", "predict_cache", "add_arguments", "run")
