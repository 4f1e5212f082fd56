"""``compare``: side-by-side report of several classifier runs on ALL of Testing and on its CLEAN subset.

Each run is a ``predictions.csv`` (from ``evaluate-cls`` or any model writing the same columns).
The report gives accuracy, macro-F1, per-class recall then precision (a missed tumor costs most)
with percentile-bootstrap intervals (95% unless ``--alpha`` says otherwise), McNemar tests of
paired runs (same model, different input mode, e.g. ``lite0-masked`` vs ``lite0-full``),
confusion matrices, a forest plot of accuracy and macro-F1, and optionally a Grad-CAM panel.
Output: ``report.md`` (figures linked), ``report.html`` (figures embedded, one self-contained file),
``compare.json`` and the PNGs.
"""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline import CLASSES
from pipeline.evaluate import mcnemar
from pipeline.evaluate_cls import (PATH_KEYS, _jsonable, clean_mask, load_clean, metrics_with_ci, parse_subsets,
                                   read_predictions)

MODES = ("full", "crop", "masked")
#: A class whose clean count is below this, or below SMALL_FRACTION of its full count, is flagged.
SMALL_N, SMALL_FRACTION = 30, 0.25
#: The Grad-CAM panel draws its right and wrong examples from this many randomly chosen images.
GRADCAM_POOL = 512
TUMOR_NOTE = ("Tumor found: share of tumor slices called any tumor class (wrong type included); no tumor correct: "
              "share of no-tumor slices called no tumor. Subset columns (`--subset`) cover only the listed slices, "
              "e.g. the Testing slices of a source that a leave-one-source-out run never saw.")


# --- pairing ------------------------------------------------------------------------------------

def _is_mode(token: str) -> bool:
    """``full``, ``crop``, ``masked``, or an ensemble of them such as ``full+crop``."""
    parts = token.lower().split("+")
    return all(p in MODES for p in parts) and len(set(parts)) == len(parts)


def _split_mode(name: str) -> tuple[str, str | None]:
    """``"lite0-masked"`` -> ``("lite0", "masked")``, ``"lite0-full+crop"`` -> ``("lite0", "full+crop")``;
    a name without a mode token -> ``(name, None)``."""
    tokens = re.split(r"[-_.\s]+", name)
    modes = [t for t in tokens if _is_mode(t)]
    if len(modes) != 1:
        return name, None
    rest = [t for t in tokens if not _is_mode(t)]
    return "-".join(rest), modes[0].lower()


def auto_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Runs of one model in different modes: every crop/masked run against the full one, and
    masked against crop; an ensemble run (``full+crop``) against each of its members. The model
    is the run name without its mode token."""
    groups: dict[str, dict[str, str]] = {}
    for n in names:
        model, mode = _split_mode(n)
        if mode:
            groups.setdefault(model, {}).setdefault(mode, n)
    pairs = []
    for modes in groups.values():
        for a, b in (("masked", "full"), ("crop", "full"), ("masked", "crop")):
            if a in modes and b in modes:
                pairs.append((modes[a], modes[b]))
        for ens in (m for m in modes if "+" in m):
            pairs += [(modes[ens], modes[part]) for part in ens.split("+") if part in modes]
    return pairs


def parse_pairs(specs: Sequence[str] | None, names: Sequence[str]) -> list[tuple[str, str]]:
    if not specs:
        return auto_pairs(names)
    pairs = []
    for spec in specs:
        if ":" not in spec:
            raise ValueError(f"--pairs {spec!r}: expected A:B with two run names")
        a, b = spec.split(":", 1)
        unknown = [x for x in (a, b) if x not in names]
        if unknown:
            raise ValueError(f"--pairs {spec!r}: unknown run(s) {', '.join(unknown)}; runs are {', '.join(names)}")
        pairs.append((a, b))
    return pairs


def parse_runs(specs: Sequence[str]) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(f"--runs {spec!r}: expected NAME=DIR (DIR holds predictions.csv) or NAME=FILE.csv")
        name, path = spec.split("=", 1)
        if not name or name in runs:
            raise ValueError(f"--runs {spec!r}: run names must be non-empty and unique")
        runs[name] = Path(path)
    return runs


# --- paired comparison ---------------------------------------------------------------------------

def _align(pa: dict, pb: dict) -> tuple[np.ndarray, np.ndarray]:
    """Indices into a and b of the images both runs scored (matched by resolved path, else by the last
    three, else the last two path components, as :func:`pipeline.evaluate_cls.clean_mask` matches)."""
    best = (np.zeros(0, int), np.zeros(0, int))
    for _, key in PATH_KEYS:
        ka = {key(p): i for i, p in enumerate(pa["paths"])}
        ib, ia = [], []
        for j, p in enumerate(pb["paths"]):
            i = ka.get(key(p))
            if i is not None:
                ia.append(i)
                ib.append(j)
        if len(ia) > len(best[0]):
            best = (np.array(ia, int), np.array(ib, int))
        if len(best[0]) == min(len(pa["paths"]), len(pb["paths"])):
            break
    return best


def paired_test(pa: dict, pb: dict, mask_a: np.ndarray | None = None) -> dict:
    """McNemar of two runs on the images both scored (restricted to ``mask_a`` of run a if given)."""
    ia, ib = _align(pa, pb)
    if mask_a is not None:
        keep = mask_a[ia]
        ia, ib = ia[keep], ib[keep]
    disagree_truth = int(np.sum(pa["y_true"][ia] != pb["y_true"][ib]))
    if disagree_truth:
        raise ValueError(f"{pa['source']} and {pb['source']}: {disagree_truth} paired images have different true "
                         f"labels; are they the same test set?")
    y = pa["y_true"][ia]
    res = mcnemar(y, pa["y_pred"][ia], pb["y_pred"][ib])
    if not len(y):  # nothing to test: no statistic, and p = 1 would read as a result
        res["statistic"] = res["p_value"] = float("nan")
    res["acc_a"] = float(np.mean(pa["y_pred"][ia] == y)) if len(y) else float("nan")
    res["acc_b"] = float(np.mean(pb["y_pred"][ib] == y)) if len(y) else float("nan")
    return res


def describe_pair(a: str, b: str, res: dict, subset: str, alpha: float = 0.05) -> str:
    """One plain sentence: the accuracy difference, the discordant counts and the p-value, no more."""
    n = res["n"]
    if n == 0:
        images = "images" if subset == "ALL" else f"{subset} images"  # CLEAN: they may share others
        return (f"{subset}: {a} and {b} share no {images} (compared by resolved path and by the last three or "
                f"two path components), so there is nothing to test.")
    diff = 100 * (res["acc_a"] - res["acc_b"])
    lead = (f"{subset} (n={n}): {a} {100 * res['acc_a']:.1f}% vs {b} {100 * res['acc_b']:.1f}% accuracy "
            f"({diff:+.1f} points); {res['b'] + res['c']} images right for only one of them "
            f"({res['b']} only {a}, {res['c']} only {b}); McNemar ({res['method']}) {_fmt_p(res['p_value'], alpha)}.")
    if res["b"] + res["c"] == 0:
        return lead + " The two runs are right on exactly the same images."
    if res["p_value"] < alpha:
        better = a if res["b"] > res["c"] else b
        return (lead + f" At α = {alpha:g} the difference is unlikely to be chance on this test set: {better} "
                f"made fewer errors here (one training run each; other data or seeds may differ).")
    return (lead + f" Not significant at α = {alpha:g}: this test set does not show a difference between them "
            f"(which is not evidence that they are equal).")


def _fmt_p(p: float, alpha: float = 0.05) -> str:
    """``p = 0.039`` or ``p < 0.001``; more decimals where three would round p across ``alpha``
    (0.04995 is ``p = 0.04995``, not ``p = 0.050`` next to "significant at 0.05")."""
    if p < 0.001 <= alpha:
        return "p < 0.001"
    for decimals in range(3, 16):
        text = f"{p:.{decimals}f}"
        if (float(text) < alpha) == (p < alpha) and (float(text) > 0 or p == 0):
            return f"p = {text}"
    return f"p = {p!r}"


def _level(alpha: float) -> str:
    """The confidence level of ``alpha`` as printed: ``95%``, ``90%``, ``99.5%``."""
    return f"{100 * (1 - alpha):g}%"


# --- figures ------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _unique_stems(names: Sequence[str]) -> dict[str, str]:
    """``{name: file-safe stem}``, distinct per name: ``a full`` and ``a_full`` would both be ``a_full``,
    so the later one gets ``a_full-2``. Names that collide with nothing keep their plain stem."""
    stems, taken = {}, set()
    for name in names:
        stem, k = _safe(name), 2
        # compared case-blind: on macOS or Windows `A.png` and `a.png` are one file
        while stem.lower() in taken:
            stem, k = f"{_safe(name)}-{k}", k + 1
        stems[name] = stem
        taken.add(stem.lower())
    return stems


def plot_confusions(name: str, metrics: dict[str, dict], out_png: Path) -> Path:
    """One panel per subset: counts, shaded by row (recall) share."""
    plt = _plt()
    subsets = [k for k in ("all", "clean") if k in metrics]
    fig, axes = plt.subplots(1, len(subsets), figsize=(4.4 * len(subsets), 4.0), squeeze=False)
    for ax, key in zip(axes[0], subsets):
        cm = np.asarray(metrics[key]["confusion"], float)
        share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.6 else "black")
        ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=30, fontsize=8)
        ax.set_yticks(range(len(CLASSES)), CLASSES, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{name}: {key.upper()} (n={metrics[key]['n']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_forest(results: dict[str, dict], out_png: Path, alpha: float = 0.05) -> Path:
    """Accuracy and macro-F1 with their intervals, ALL vs CLEAN, one row per run."""
    plt = _plt()
    names = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 1.2 + 0.55 * len(names)), squeeze=False, sharey=True)
    styles = {"all": ("tab:blue", "o", -0.12), "clean": ("tab:orange", "s", 0.12)}
    for ax, metric in zip(axes[0], ("accuracy", "macro_f1")):
        for key, (color, marker, dy) in styles.items():
            ys, xs, lo, hi = [], [], [], []
            for r, name in enumerate(names):
                m = results[name].get(key)
                if not m or not m["n"]:
                    continue
                ys.append(r + dy)
                xs.append(m[metric])
                lo.append(m[metric] - m["ci"][metric][0])
                hi.append(m["ci"][metric][1] - m[metric])
            if xs:
                ax.errorbar(xs, ys, xerr=[lo, hi], fmt=marker, color=color, capsize=3,
                            label=f"{key.upper()}" if metric == "accuracy" else None)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel(f"{'accuracy' if metric == 'accuracy' else 'macro-F1'} ({_level(alpha)} bootstrap CI)")
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# --- tables -------------------------------------------------------------------------------------

def _cell(m: dict | None, value, ci) -> str:
    if m is None or not m["n"] or value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    lo, hi = ci
    if lo is None or np.isnan(lo):
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def _predicted(m: dict, c: str) -> int:
    """How many images ``m`` predicted as class ``c`` (a column of its confusion matrix)."""
    return int(np.asarray(m["confusion"])[:, CLASSES.index(c)].sum())


def run_table(m_all: dict, m_clean: dict | None) -> list[list[str]]:
    """Rows [metric, ALL, CLEAN]: accuracy, macro-F1, recall per class, then precision per class.
    A recall row's n counts the images of the class, a precision row's the images predicted as it."""
    header = ["metric", f"ALL (n={m_all['n']})", f"CLEAN (n={m_clean['n']})" if m_clean else "CLEAN"]
    rows = [header]
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
        rows.append([label, _cell(m_all, m_all[key], m_all["ci"][key]),
                     _cell(m_clean, m_clean[key], m_clean["ci"][key]) if m_clean else "–"])
    for kind, count, says in (("recall", lambda m, c: m["per_class"][c]["support"], "n"),
                              ("precision", _predicted, "predicted n")):
        for c in CLASSES:
            n_all = count(m_all, c)
            n_clean = count(m_clean, c) if m_clean else None
            label = f"{kind} {c} ({says}={n_all}" + (f"/{n_clean})" if m_clean else ")")
            rows.append([label, _cell(m_all, m_all["per_class"][c][kind], m_all["ci"][kind][c]),
                         _cell(m_clean, m_clean["per_class"][c][kind], m_clean["ci"][kind][c]) if m_clean else "–"])
    return rows


def summary_table(results: dict[str, dict]) -> list[list[str]]:
    rows = [["run", "n ALL", "accuracy ALL", "macro-F1 ALL", "n CLEAN", "accuracy CLEAN", "macro-F1 CLEAN"]]
    for name, r in results.items():
        a, c = r["all"], r.get("clean")
        rows.append([name, str(a["n"]), _cell(a, a["accuracy"], a["ci"]["accuracy"]),
                     _cell(a, a["macro_f1"], a["ci"]["macro_f1"]),
                     str(c["n"]) if c else "–", _cell(c, c["accuracy"], c["ci"]["accuracy"]) if c else "–",
                     _cell(c, c["macro_f1"], c["ci"]["macro_f1"]) if c else "–"])
    return rows


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}%"


def tumor_table(results: dict[str, dict]) -> list[list[str]]:
    """Rows [run, tumor found / no-tumor correct on ALL, CLEAN and each subset]: is there a tumor,
    whatever its type. A subset is a path list such as the Testing slices of one source."""
    first = next(iter(results.values()))
    keys = [("ALL", "all"), ("CLEAN", "clean")] if first.get("clean") else [("ALL", "all")]
    names = list(first.get("subsets", {}))
    header = ["run"]
    for label, _ in keys:
        header += [f"tumor found {label}", f"no tumor correct {label}"]
    for sname in names:
        header += [f"n {sname}", f"accuracy {sname}", f"tumor found {sname}", f"no tumor correct {sname}"]
    rows = [header]
    for name, r in results.items():
        row = [name]
        for _, key in keys:
            t = r[key]["tumor_vs_none"]
            row += [_pct(t["tumor_found"]), _pct(t["notumor_correct"])]
        for sname in names:
            m = r["subsets"][sname]
            t = m["tumor_vs_none"]
            row += [str(m["n"]), _pct(m["accuracy"] if m["n"] else None), _pct(t["tumor_found"]),
                    _pct(t["notumor_correct"])]
        rows.append(row)
    return rows


def _md_escape(text: str) -> str:
    """Markdown-safe text: a ``|`` would end a table cell, ``<``/``>`` could open an HTML tag."""
    return (str(text).replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
            .replace("\n", " "))


def _md_table(rows: list[list[str]]) -> str:
    cells = [[_md_escape(c) for c in r] for r in rows]
    out = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(cells[0])]
    out += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(out)


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --- the report ---------------------------------------------------------------------------------

def _class_counts(m: dict) -> str:
    return f"n = {m['n']} (" + ", ".join(f"{c} {m['per_class'][c]['support']}" for c in CLASSES) + ")"


def _per_run(results: dict[str, dict], describe) -> str:
    """``describe(run result)`` once when it is the same for every run, else ``name text`` per run."""
    texts = {name: describe(r) for name, r in results.items()}
    if len(set(texts.values())) == 1:
        return next(iter(texts.values()))
    return "; ".join(f"{name}: {t}" for name, t in texts.items())


def header_notes(results: dict[str, dict], clean_size: int | None, alpha: float = 0.05) -> list[str]:
    """Dataset lines: n and per-class n on ALL and CLEAN (per run where runs differ), rows a run could
    not score, and classes the clean subset has few of."""
    lines = [f"ALL = every scored image of the runs (Kaggle Testing in this project's reports): "
             f"{_per_run(results, lambda r: _class_counts(r['all']))}."]
    skipped = [(name, r.get("n_skipped", 0)) for name, r in results.items() if r.get("n_skipped", 0)]
    if skipped:
        lines.append("; ".join(f"{name}: {k} row{'s' if k > 1 else ''} not scored (read errors), excluded"
                               for name, k in skipped) + ".")
    lines.append("Macro-F1 averages the classes present in a set's truth: a class absent from it (no tumor in a "
                 "tumor-only source, say) is left out even where it was predicted; those predictions still lower "
                 "the recall of the classes they were taken from.")
    intervals = (f"Intervals: {_level(alpha)} percentile bootstrap over images (a percentile interval cannot reach "
                 f"past an observed 0% or 100%, so for a small class it is too narrow, e.g. [1.000, 1.000]). Recall "
                 f"is listed before precision: a missed tumor costs most.")
    if any(r.get("clean") is None for r in results.values()):
        lines.append("No clean list was given (`--clean`): only ALL is reported. Where the scored images have "
                     "near-copies among the training images (as most of Kaggle Testing does, by the audit), "
                     "ALL is optimistic; `audit` on your own training and test folders gives the clean list.")
        return lines + [intervals]
    lines.append(f"CLEAN = Testing images with no near-copy in Training (audit; {clean_size} listed, "
                 + _per_run(results, lambda r: f"{r['clean']['n']} matched here, by "
                                               f"{r['clean'].get('matched_by', 'resolved path')}): "
                                               f"{_class_counts(r['clean'])}")
                 + ".")
    # flag a class by the run that has the fewest clean images of it
    per_all = {k: max(r["all"]["per_class"][k]["support"] for r in results.values()) for k in CLASSES}
    per_clean = {k: min(r["clean"]["per_class"][k]["support"] for r in results.values()) for k in CLASSES}
    small = [k for k in CLASSES if per_clean[k] < SMALL_N or per_clean[k] < SMALL_FRACTION * max(per_all[k], 1)]
    if small:
        small.sort(key=lambda k: per_clean[k] / max(per_all[k], 1))
        lines.append("Note: the clean subset has " + ", ".join(f"few {k} images (n = {per_clean[k]} of {per_all[k]})"
                                                              for k in small)
                     + ": their recall/precision intervals on CLEAN are wide, and CLEAN accuracy/macro-F1 weigh "
                       "the classes differently from ALL, so ALL vs CLEAN is not a like-for-like comparison.")
    return lines + [intervals]


def build_report(runs: dict[str, Path], out: str | Path, clean_path: str | None = None,
                 pairs: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05,
                 gradcam_cls: str | None = None, gradcam_data: str | None = None, gradcam_n: int = 8,
                 device: str = "cpu", title: str = "Full slice vs tumor region: classifier comparison",
                 subsets: dict[str, set[str]] | None = None) -> dict:
    """Compute everything and write the report; returns the ``compare.json`` content.

    ``subsets``: named sets of resolved paths (:func:`pipeline.evaluate_cls.parse_subsets`), each
    reported for every run, e.g. the Testing slices of a source a leave-one-source-out run never saw.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not runs:
        raise ValueError("compare needs at least one --runs NAME=DIR")
    gradcam_net = None
    if gradcam_cls or gradcam_data:  # checked before the metrics: a wrong name should not cost a whole run
        if not (gradcam_cls and gradcam_data):
            raise ValueError("--gradcam-cls and --gradcam-data go together")
        gradcam_net = _gradcam_classifier(gradcam_cls, device)
    clean = load_clean(clean_path)
    preds = {name: read_predictions(path) for name, path in runs.items()}
    results, masks = {}, {}
    for name, p in preds.items():
        r = {"source": p["source"], "n_skipped": len(p.get("skipped", ())),
             "all": metrics_with_ci(p["y_true"], p["y_pred"], n_boot, seed, alpha)}
        if clean is not None:
            mask, how = clean_mask(p["paths"], clean)
            masks[name] = mask
            r["clean"] = metrics_with_ci(p["y_true"][mask], p["y_pred"][mask], n_boot, seed, alpha)
            r["clean"]["matched_by"] = how
        for sname, paths in (subsets or {}).items():
            mask, how = clean_mask(p["paths"], paths)
            r.setdefault("subsets", {})[sname] = {
                **metrics_with_ci(p["y_true"][mask], p["y_pred"][mask], n_boot, seed, alpha), "matched_by": how}
        results[name] = r
    pair_list = parse_pairs(pairs, list(preds))
    tests = []
    for a, b in pair_list:
        t = {"a": a, "b": b, "all": paired_test(preds[a], preds[b])}
        t["all"]["text"] = describe_pair(a, b, t["all"], "ALL", alpha)
        if clean is not None:
            t["clean"] = paired_test(preds[a], preds[b], masks[a])
            t["clean"]["text"] = describe_pair(a, b, t["clean"], "CLEAN", alpha)
        tests.append(t)

    figures: list[tuple[str, str]] = []
    forest = plot_forest(results, out / "accuracy_ci.png", alpha)
    figures.append((f"Accuracy and macro-F1 with {_level(alpha)} CI, ALL vs CLEAN", forest.name))
    stems = _unique_stems(list(results))
    for name in results:
        png = plot_confusions(name, results[name], out / f"confusion_{stems[name]}.png")
        figures.append((f"Confusion matrix: {name}", png.name))
    gradcam_png = None
    if gradcam_net is not None:
        gradcam_png = _gradcam(gradcam_net, gradcam_data, out / "gradcam.png", gradcam_n, seed)
        figures.append((f"Grad-CAM: {gradcam_cls} on a sample of right and wrong predictions", gradcam_png.name))

    notes = header_notes(results, len(clean) if clean is not None else None, alpha)
    md = _markdown(title, notes, results, tests, figures, alpha, len(pair_list))
    # a run named by a path that is not UTF-8 is shown with U+FFFD where its odd bytes were
    (out / "report.md").write_text(_readable(md), encoding="utf-8")
    (out / "report.html").write_text(_readable(_html(title, notes, results, tests, figures, alpha, len(pair_list), out)),
                                     encoding="utf-8")
    summary = {"runs": {k: str(v) for k, v in runs.items()}, "clean": clean_path,
               "bootstrap": {"n_boot": n_boot, "seed": seed, "alpha": alpha},
               "results": results, "pairs": tests}
    (out / "compare.json").write_text(json.dumps(_jsonable(summary), indent=2))
    return summary


def _readable(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _gradcam_classifier(weights: str, device: str):
    """One network for Grad-CAM; an ensemble is refused by name (its mean has no single feature map)."""
    from pipeline.classify.predict import ClassifierEnsemble, load_classifier

    classifier = load_classifier(weights, device=device)
    if isinstance(classifier, ClassifierEnsemble):
        views = ", ".join(f"{m.mode} at {m.size} px" for m in classifier.members)
        raise ValueError(f"--gradcam-cls {weights}: an ensemble ({views}); Grad-CAM explains one network, so pass "
                         f"one member (a manifest name or .pt) with a cache of that member's view")
    return classifier


def _gradcam(classifier, data: str, out_png: Path, n: int, seed: int) -> Path:
    from pipeline.classify.data import load_cache
    from pipeline.classify.gradcam import gradcam_panel
    from pipeline.evaluate_cls import predict_cache

    cache = load_cache(data)
    # a seeded sample is enough to find right and wrong examples; spares a pass over the whole split
    keep = np.sort(np.random.default_rng(seed).permutation(len(cache["labels"]))[:GRADCAM_POOL])
    cache = {**cache, "images": cache["images"][keep], "labels": cache["labels"][keep]}
    probs = predict_cache(classifier, cache)
    preds = probs.argmax(1)
    gradcam_panel(classifier, cache["images"], cache["labels"], preds, out_png, n=n, seed=seed, probs=probs)
    return out_png


def _pair_section(tests: list[dict], alpha: float, n_pairs: int) -> list[str]:
    lines = []
    for t in tests:
        lines.append(f"**{t['a']} vs {t['b']}**")
        for key in ("all", "clean"):
            if key in t and not t[key]["n"]:
                lines.append(f"- McNemar {key.upper()}: not run. {t[key]['text']}")
            elif key in t:
                r = t[key]
                lines.append(f"- McNemar {key.upper()}: b = {r['b']}, c = {r['c']}, statistic = {r['statistic']:.3f}, "
                             f"{_fmt_p(r['p_value'], alpha)} ({r['method']}, n = {r['n']}). "
                             f"What this shows: {r['text']}")
    if n_pairs > 1:
        lines.append(f"\n{n_pairs} pairs are tested on each subset and the p-values are not adjusted; with a "
                     f"Bonferroni correction the threshold would be {alpha / n_pairs:.4f}.")
    return lines


def _markdown(title, notes, results, tests, figures, alpha, n_pairs) -> str:
    parts = [f"# {title}", "", *[f"- {n}" for n in notes], "", "## Summary", "", _md_table(summary_table(results)), "",
             "## Is there a tumor?", "", TUMOR_NOTE, "", _md_table(tumor_table(results)), ""]
    for name, r in results.items():
        parts += [f"## {_md_escape(name)}", "", f"Predictions: `{r['source']}`", "",
                  _md_table(run_table(r["all"], r.get("clean"))), ""]
    parts += ["## Paired runs (McNemar)", ""]
    parts += _pair_section(tests, alpha, n_pairs) if tests else [
        "No paired runs (name runs `<model>-<mode>`, e.g. `lite0-masked` and `lite0-full`, or pass `--pairs A:B`)."]
    parts += ["", "## Figures", ""]
    parts += [f"![{cap}]({png})\n\n*{cap}*\n" for cap, png in figures]
    return "\n".join(parts) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%}figure{margin:1.5em 0}figcaption{font-style:italic;font-size:13px}"
        ".note{background:#fff8e1;padding:.5em 1em;border-left:4px solid #f0b400}")


def _html(title, notes, results, tests, figures, alpha, n_pairs, out: Path) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1><div class='note'><ul>"]
    parts += [f"<li>{esc(n)}</li>" for n in notes]
    parts += ["</ul></div><h2>Summary</h2>", _html_table(summary_table(results)),
              f"<h2>Is there a tumor?</h2><p>{esc(TUMOR_NOTE)}</p>", _html_table(tumor_table(results))]
    for name, r in results.items():
        parts += [f"<h2>{esc(name)}</h2><p>Predictions: <code>{esc(r['source'])}</code></p>",
                  _html_table(run_table(r["all"], r.get("clean")))]
    parts.append("<h2>Paired runs (McNemar)</h2>")
    if tests:
        for line in _pair_section(tests, alpha, n_pairs):
            line = line.strip()
            if line.startswith("**"):
                parts.append(f"<h3>{esc(line.strip('*'))}</h3>")
            elif line.startswith("- "):
                parts.append(f"<p>{esc(line[2:])}</p>")
            elif line:
                parts.append(f"<p><em>{esc(line)}</em></p>")
    else:
        parts.append("<p>No paired runs (name runs <code>&lt;model&gt;-&lt;mode&gt;</code> or pass "
                     "<code>--pairs A:B</code>).</p>")
    parts.append("<h2>Figures</h2>")
    for cap, png in figures:
        data = base64.b64encode((out / png).read_bytes()).decode()
        parts.append(f"<figure><img alt='{esc(cap)}' src='data:image/png;base64,{data}'>"
                     f"<figcaption>{esc(cap)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


# --- command ------------------------------------------------------------------------------------

def add_arguments(p) -> None:
    from pipeline.cli import _fraction, _positive_int

    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR",
                   help="runs to compare: NAME=DIR with DIR/predictions.csv (from evaluate-cls) or NAME=FILE.csv; "
                        "name them <model>-<mode> (e.g. lite0-masked, lite0-full) to pair them automatically")
    p.add_argument("--clean", help="clean_test.txt from `audit`: also report the CLEAN subset")
    p.add_argument("--out", required=True, help="output folder: report.md, report.html, compare.json, PNGs")
    p.add_argument("--pairs", nargs="+", metavar="A:B", help="run pairs for McNemar (default: same model, "
                                                             "masked/crop vs full, masked vs crop)")
    p.add_argument("--n-boot", type=_positive_int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--alpha", type=_fraction, default=0.05, help="1 - confidence level; significance level")
    p.add_argument("--gradcam-cls", help="classifier whose Grad-CAM panel to add (manifest name or .pt)")
    p.add_argument("--gradcam-data", help="cache .npz matching --gradcam-cls (mode and size)")
    p.add_argument("--gradcam-n", type=int, default=8, help="images in the Grad-CAM panel (half right, half wrong)")
    p.add_argument("--subset", action="append", metavar="NAME=LIST",
                   help="also report every run on the paths listed in LIST (e.g. testing_sartaj.txt from "
                        "`sources`); repeatable")
    p.add_argument("--title", default="Full slice vs tumor region: classifier comparison")


def run(args) -> int:
    summary = build_report(parse_runs(args.runs), args.out, clean_path=getattr(args, "clean", None),
                           pairs=getattr(args, "pairs", None), n_boot=getattr(args, "n_boot", 1000),
                           seed=getattr(args, "seed", None) or 0, alpha=getattr(args, "alpha", 0.05),
                           gradcam_cls=getattr(args, "gradcam_cls", None),
                           gradcam_data=getattr(args, "gradcam_data", None),
                           gradcam_n=getattr(args, "gradcam_n", 8), device=getattr(args, "device", "cpu") or "cpu",
                           title=getattr(args, "title", None) or "Full slice vs tumor region: classifier comparison",
                           subsets=parse_subsets(getattr(args, "subset", None)))
    print(f"wrote {Path(args.out) / 'report.md'} and report.html")
    for t in summary["pairs"]:
        for key in ("all", "clean"):
            if key in t:
                print(t[key]["text"])
    return 0
