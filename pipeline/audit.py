"""Leakage audit: find Testing images that are (near-)copies of Training images.

The Kaggle brain-tumor-MRI layout (``Training/<class>/*.jpg``, ``Testing/<class>/*.jpg``)
ships hundreds of Testing images that also appear in Training, sometimes re-encoded or
with different margins, and Training holds duplicates of its own. Scores on the raw
Testing split are therefore optimistic; this module finds the copies so evaluation can
also be reported on the clean remainder.

Method, per image:

1. decode as 8-bit grayscale (OpenCV, falling back to PIL);
2. frame the head: the largest outer contour of the content mask (pixels above
   ``BG_THRESHOLD`` or ``OTSU_FRACTION`` x the Otsu level, whichever is higher), filled;
   centre and extent from its moments (= its bounding box for an elliptic head, but
   stable to a pixel of JPEG ringing, to mild contrast edits and to detached text), so the same
   slice saved with other margins, padding, resolution or contrast still lines up. Not robust:
   a lifted background (a brightness, gamma or equalisation edit) can move the outline, and a
   mirrored copy is not looked for, so such copies can be missed;
3. warp that frame to a ``THUMB_SIZE`` x ``THUMB_SIZE`` uint8 thumbnail (anti-aliased),
   kept for pixel confirmation;
4. resize to 32x32, 2-D DCT, top-left 8x8 block (DC included) compared with its
   median -> 64-bit perceptual hash;
5. sha1 of the decoded pixels -> exact-duplicate key.

Pairs whose hashes are within ``max_distance`` bits are candidates; a candidate is a
near-duplicate only if max(Pearson, Spearman) of the two thumbnails is >= ``min_corr``
(Spearman, i.e. correlation of pixel ranks, is blind to monotone contrast/gamma edits,
Pearson to the background noise that scrambles ranks in flat regions).
Pixel-identical pairs are always duplicates, kind ``"exact"``, distance 0.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

#: Default Hamming-distance bound (of 64 bits) for a pair to become a candidate. On the
#: Kaggle data every Testing image with a copy has one within 8 bits (median-threshold
#: hashes always differ by an even count); 10 leaves margin at ~12k candidate pairs.
DEFAULT_MAX_DISTANCE = 10
#: Default minimum max(Pearson, Spearman) correlation of the 64x64 content thumbnails.
#: On the Kaggle data re-framed/re-encoded copies score >= 0.995, contrast-edited or
#: sharpened copies 0.978-0.99; neighbouring slices of one scan 0.93-0.978 (the best-match
#: histogram has a trough at 0.97-0.98), unrelated images lower.
DEFAULT_MIN_CORR = 0.975
#: Clean Testing images whose best candidate scores within this margin below ``min_corr``
#: are counted as borderline in ``audit.json`` (how sensitive the clean split is).
BORDERLINE_MARGIN = 0.025
#: Default number of hashing threads (OpenCV releases the GIL while decoding).
DEFAULT_WORKERS = 2
#: Gray level above which a pixel counts as content when framing the image.
BG_THRESHOLD = 10
#: The framing threshold rises to this fraction of the image's Otsu level, so a dim
#: letterbox/padding or a contrast change does not move the head outline.
OTSU_FRACTION = 0.3
#: Half-extent of the content frame, in standard deviations of the content mask.
FRAME_SIGMAS = 2.0
#: Side of the normalised confirmation thumbnail.
THUMB_SIZE = 64
#: Side of the image fed to the DCT, and of the low-frequency block kept from it.
DCT_SIZE = 32
HASH_SIZE = 8

AUDIT_JSON = "audit.json"
DUPLICATES_CSV = "duplicates.csv"
TRAIN_DUPLICATES_CSV = "train_duplicates.csv"
TEST_DUPLICATES_CSV = "test_duplicates.csv"
CLEAN_TEST_TXT = "clean_test.txt"

Item = tuple  # (path, label)

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
_BIT_WEIGHTS = (np.uint64(1) << np.arange(64, dtype=np.uint64)).astype(np.uint64)


# --------------------------------------------------------------------------- hashing


def _read_gray(path: str) -> np.ndarray:
    """Decode ``path`` as a 2-D uint8 array; raise on failure."""
    img = None
    try:
        import cv2

        from pipeline.folders import read_image_file

        img = read_image_file(path, cv2.IMREAD_GRAYSCALE)
    except ImportError:  # pragma: no cover - cv2 is a hard dependency of the project
        pass
    except Exception:  # cv2 can raise on odd inputs; let PIL have a go
        img = None
    if img is None:
        from PIL import Image

        with Image.open(path) as im:
            img = np.asarray(im.convert("L"))
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"decoded to unexpected shape {img.shape}")
    return np.ascontiguousarray(img, dtype=np.uint8)


#: the head outline is found on a copy whose longer side is this (the Kaggle slices' own size, so
#: their frames are unchanged)
FRAME_WORK_SIZE = 224


def _content_frame(gray: np.ndarray, threshold: int = BG_THRESHOLD) -> tuple[float, float, float, float]:
    """(cy, cx, ay, ax): centre and half-extent of the head silhouette.

    The silhouette is the largest outer contour of the content mask (5x5 median-filtered
    image above ``threshold``, raised to ``OTSU_FRACTION`` x its Otsu level), filled: dark
    structures inside the head, contrast edits, dim padding and detached annotations
    (text, rulers) do not change it. Centre and extent come from its
    first and second moments rather than its extreme rows/columns, which move by a pixel
    or two with JPEG ringing; ``FRAME_SIGMAS`` standard deviations each side is exactly
    the bounding box of an elliptic head.
    """
    import cv2

    h, w = gray.shape
    scale = FRAME_WORK_SIZE / max(h, w)
    if abs(scale - 1) > 1e-6:
        # the outline is found at one working size: a 5 px blur and a contour at 512 px and at 224 px
        # differ by a pixel or two at the smaller scale, enough to lose a copy saved at another resolution
        small = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        cy, cx, ay, ax = _content_frame(small, threshold)
        return cy / scale, cx / scale, ay / scale, ax / scale
    smooth = cv2.medianBlur(gray, 5)
    if OTSU_FRACTION > 0:
        otsu, _ = cv2.threshold(smooth, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        threshold = max(threshold, OTSU_FRACTION * otsu)
    mask = (smooth > threshold).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    best = None
    if contours:
        moments = [cv2.moments(c) for c in contours]
        best = max(moments, key=lambda m: m["m00"])
    if best is None or best["m00"] < 0.01 * h * w:  # blank or tiny content: whole image
        return h / 2.0, w / 2.0, h / 2.0, w / 2.0
    n = best["m00"]
    # contour coordinates are pixel indices; +0.5 -> pixel-centre convention
    cy, cx = best["m01"] / n + 0.5, best["m10"] / n + 0.5
    ay = FRAME_SIGMAS * float(np.sqrt(best["mu02"] / n))
    ax = FRAME_SIGMAS * float(np.sqrt(best["mu20"] / n))
    return cy, cx, max(ay, 1.0), max(ax, 1.0)


def content_thumbnail(gray: np.ndarray, size: int = THUMB_SIZE) -> np.ndarray:
    """``size`` x ``size`` uint8 view of the content frame (sub-pixel, anti-aliased), so the
    same slice with other margins, padding or resolution gives the same thumbnail."""
    import cv2

    cy, cx, ay, ax = _content_frame(gray)
    sy, sx = size / (2 * ay), size / (2 * ax)
    src = gray
    if sx < 1 or sy < 1:  # anti-alias before the (linear) warp; ~ INTER_AREA
        src = cv2.GaussianBlur(gray, (0, 0), sigmaX=max(0.5 / sx, 0.01), sigmaY=max(0.5 / sy, 0.01))
    # pixel centres: u + 0.5 = sx * (x + 0.5 - (cx - ax))
    m = np.array([[sx, 0.0, sx * (0.5 - cx + ax) - 0.5],
                  [0.0, sy, sy * (0.5 - cy + ay) - 0.5]])
    return cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def image_features(path: str) -> tuple[np.uint64, np.ndarray, str]:
    """Perceptual hash, ``THUMB_SIZE``² uint8 thumbnail of the content frame, pixel sha1."""
    import cv2

    gray = _read_gray(path)
    digest = hashlib.sha1(np.asarray(gray.shape, dtype=np.int64).tobytes() + gray.tobytes()).hexdigest()
    thumb = content_thumbnail(gray)
    small = cv2.resize(thumb.astype(np.float32), (DCT_SIZE, DCT_SIZE), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:HASH_SIZE, :HASH_SIZE].ravel()
    bits = (low > np.median(low)).astype(np.uint64)
    phash = np.uint64((bits * _BIT_WEIGHTS).sum(dtype=np.uint64))
    return phash, thumb.ravel(), digest


_N_PIX = THUMB_SIZE * THUMB_SIZE
_RANK_MEAN = (_N_PIX - 1) / 2.0
_RANK_STD = float(np.sqrt((_N_PIX ** 2 - 1) / 12.0))


class Features:
    """Hashes/thumbnails for one list of items; ``ok`` marks the decodable ones.

    Per image: ``hashes`` (uint64 pHash), ``thumbs`` (uint8 content thumbnail, flattened)
    with its ``mean``/``std`` (Pearson), ``ranks`` (uint16 pixel ranks, Spearman) and
    ``digests`` (sha1 of the decoded pixels).
    """

    def __init__(self, items: Sequence[Item], split: str, workers: int = DEFAULT_WORKERS):
        self.paths = [str(p) for p, _ in items]
        self.labels = [str(lab) for _, lab in items]
        n = len(self.paths)
        self.hashes = np.zeros(n, dtype=np.uint64)
        self.thumbs = np.zeros((n, _N_PIX), dtype=np.uint8)
        self.digests: list[str | None] = [None] * n
        self.ok = np.zeros(n, dtype=bool)
        self.errors: list[dict] = []

        def work(i: int):
            try:
                return i, image_features(self.paths[i]), None
            except Exception as exc:  # unreadable / corrupt file: record, don't crash
                return i, None, f"{type(exc).__name__}: {exc}"

        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = pool.map(work, range(n))
            if tqdm is not None:
                results = tqdm(results, total=n, desc=f"hash {split}", unit="img",
                               disable=None if sys.stderr.isatty() else True)
            for i, feats, err in results:
                if err is not None:
                    self.errors.append({"split": split, "path": self.paths[i], "error": err})
                    continue
                self.hashes[i], self.thumbs[i], self.digests[i] = feats
                self.ok[i] = True

        t = self.thumbs.astype(np.float32)
        self.mean = t.mean(axis=1)
        self.std = t.std(axis=1)
        self.ranks = np.empty((n, _N_PIX), dtype=np.uint16)
        order = np.argsort(self.thumbs, axis=1, kind="stable")
        np.put_along_axis(self.ranks, order, np.arange(_N_PIX, dtype=np.uint16)[None, :], axis=1)
        # Flat thumbnails carry no structure: only a pixel-exact match may pair them.
        self.textured = self.ok & (self.std > 0.5)


def pair_correlations(fa: Features, ia: np.ndarray, fb: Features, ib: np.ndarray,
                      batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Pearson and Spearman correlations of the thumbnails of pairs (fa[ia[k]], fb[ib[k]])."""
    pear = np.zeros(len(ia), dtype=np.float32)
    spear = np.zeros(len(ia), dtype=np.float32)
    for s in range(0, len(ia), batch):
        a, b = ia[s:s + batch], ib[s:s + batch]
        xa = fa.thumbs[a].astype(np.float32) - fa.mean[a, None]
        xb = fb.thumbs[b].astype(np.float32) - fb.mean[b, None]
        den = np.maximum(fa.std[a] * fb.std[b], 1e-6) * _N_PIX
        pear[s:s + batch] = np.einsum("ij,ij->i", xa, xb) / den
        ra = fa.ranks[a].astype(np.float32) - _RANK_MEAN
        rb = fb.ranks[b].astype(np.float32) - _RANK_MEAN
        spear[s:s + batch] = np.einsum("ij,ij->i", ra, rb) / (_RANK_STD ** 2 * _N_PIX)
        flat = ~(fa.textured[a] & fb.textured[b])
        pear[s:s + batch][flat] = 0.0
        spear[s:s + batch][flat] = 0.0
    return pear, spear


# --------------------------------------------------------------------------- matching


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances (uint8, shape ``len(a) x len(b)``) of uint64 hashes."""
    x = np.bitwise_xor(a.astype(np.uint64)[:, None], b.astype(np.uint64)[None, :])
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.uint8)
    return _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, 8).sum(axis=-1, dtype=np.uint8)


def _candidate_pairs(a: np.ndarray, b: np.ndarray, max_distance: int, *, upper: bool,
                     chunk: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs (i, j) with Hamming(a[i], b[j]) <= max_distance. With ``upper`` (a is b)
    only j > i is kept."""
    ii, jj, dd = [], [], []
    for s in range(0, len(a), chunk):
        d = hamming_matrix(a[s:s + chunk], b)
        m = d <= max_distance
        if upper:
            m &= np.arange(len(b))[None, :] > np.arange(s, s + len(d))[:, None]
        r, c = np.nonzero(m)
        ii.append(r + s)
        jj.append(c)
        dd.append(d[r, c])
    if not ii:
        e = np.zeros(0, dtype=np.int64)
        return e, e, e
    return np.concatenate(ii), np.concatenate(jj), np.concatenate(dd).astype(np.int64)


def _confirm(fa: Features, fb: Features, ii, jj, dd, min_corr: float,
             best: np.ndarray | None = None) -> list[dict]:
    """Keep candidate pairs that are pixel-identical or whose thumbnails correlate with
    max(Pearson, Spearman) >= min_corr (Spearman absorbs contrast/gamma changes)."""
    ok = fa.ok[ii] & fb.ok[jj]
    ii, jj, dd = ii[ok], jj[ok], dd[ok]
    pear, spear = pair_correlations(fa, ii, fb, jj)
    corr = np.maximum(pear, spear)
    if best is not None:  # best candidate correlation per fa image (borderline report)
        np.maximum.at(best, ii, corr)
    out = []
    for i, j, d, r, p, s in zip(ii.tolist(), jj.tolist(), dd.tolist(), corr.tolist(),
                                pear.tolist(), spear.tolist()):
        exact = fa.digests[i] == fb.digests[j]
        if exact or r >= min_corr:
            out.append({"i": i, "j": j, "distance": 0 if exact else int(d),
                        "corr": round(r, 4), "pearson": round(p, 4), "spearman": round(s, 4),
                        "kind": "exact" if exact else "near"})
    return out


def _exact_pairs(fa: Features, fb: Features, *, same: bool) -> set[tuple[int, int]]:
    """Pixel-identical pairs via the sha1 index (independent of the hash threshold)."""
    index: dict[str, list[int]] = {}
    for j, dg in enumerate(fb.digests):
        if dg is not None:
            index.setdefault(dg, []).append(j)
    pairs = set()
    for i, dg in enumerate(fa.digests):
        for j in index.get(dg, ()) if dg is not None else ():
            if not same or j > i:
                pairs.add((i, j))
    return pairs


def find_duplicates(train_items: Sequence[Item], test_items: Sequence[Item], *,
                    max_distance: int = DEFAULT_MAX_DISTANCE, min_corr: float = DEFAULT_MIN_CORR,
                    workers: int = DEFAULT_WORKERS) -> dict:
    """Core audit on explicit ``(path, label)`` lists.

    Returns ``{"cross": [...], "train": [...], "train_features", "test_features", "errors"}``
    where each pair is a dict with ``test_path/train_path`` (cross) or ``path_a/path_b``
    (train), their labels, ``distance``, ``corr``, ``kind`` and ``same_label``.
    """
    ftr = Features(train_items, "train", workers)
    fte = Features(test_items, "test", workers)
    return _match(ftr, fte, max_distance=max_distance, min_corr=min_corr)


def _with_exact(pairs: list[dict], exact: set[tuple[int, int]]) -> list[dict]:
    seen = {(p["i"], p["j"]) for p in pairs}
    for i, j in sorted(exact - seen):  # only if hash distance ever exceeded the bound
        pairs.append({"i": i, "j": j, "distance": 0, "corr": 1.0, "pearson": 1.0,
                      "spearman": 1.0, "kind": "exact"})
    return pairs


def _match(ftr: Features, fte: Features, *, max_distance: int, min_corr: float) -> dict:
    ci, cj, cd = _candidate_pairs(fte.hashes, ftr.hashes, max_distance, upper=False)
    best = np.full(len(fte.paths), -1.0, dtype=np.float32)
    cross = _with_exact(_confirm(fte, ftr, ci, cj, cd, min_corr, best),
                        _exact_pairs(fte, ftr, same=False))
    ti, tj, td = _candidate_pairs(ftr.hashes, ftr.hashes, max_distance, upper=True)
    within = _with_exact(_confirm(ftr, ftr, ti, tj, td, min_corr), _exact_pairs(ftr, ftr, same=True))
    # copies among the Testing slices: one may be a copy of a Training slice that the other is not
    # close enough to, and copies inside Testing make its slices fewer than they look
    si, sj, sd = _candidate_pairs(fte.hashes, fte.hashes, max_distance, upper=True)
    within_test = _with_exact(_confirm(fte, fte, si, sj, sd, min_corr), _exact_pairs(fte, fte, same=True))

    cross_rows = []
    for p in cross:
        a, b = fte.labels[p["i"]], ftr.labels[p["j"]]
        cross_rows.append({"test_path": fte.paths[p["i"]], "train_path": ftr.paths[p["j"]],
                           "test_label": a, "train_label": b, "distance": p["distance"],
                           "corr": p["corr"], "pearson": p["pearson"], "spearman": p["spearman"],
                           "kind": p["kind"], "same_label": a == b})
    def internal_rows(pairs, f):
        rows = []
        for p in pairs:
            (pa, a), (pb, b) = sorted([(f.paths[p["i"]], f.labels[p["i"]]), (f.paths[p["j"]], f.labels[p["j"]])])
            rows.append({"path_a": pa, "path_b": pb, "label_a": a, "label_b": b, "distance": p["distance"],
                         "corr": p["corr"], "pearson": p["pearson"], "spearman": p["spearman"],
                         "kind": p["kind"], "same_label": a == b})
        return sorted(rows, key=lambda r: (r["path_a"], r["path_b"]))

    cross_rows.sort(key=lambda r: (r["test_path"], r["train_path"]))
    return {"cross": cross_rows, "train": internal_rows(within, ftr), "test": internal_rows(within_test, fte),
            "train_features": ftr,
            "test_features": fte, "errors": ftr.errors + fte.errors,
            "n_cross_candidates": int(len(ci)), "n_train_candidates": int(len(ti)),
            "n_test_candidates": int(len(si)),
            "test_best_corr": best}


# --------------------------------------------------------------------------- reporting


def _n_in_groups(pairs: Iterable[tuple[str, str]]) -> int:
    """Number of distinct images in duplicate groups (connected components of size >= 2)."""
    return len({p for pair in pairs for p in pair})


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:  # names as on disk
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def run_audit(train_dir, test_dir, out_dir, *, max_distance: int = DEFAULT_MAX_DISTANCE,
              min_corr: float = DEFAULT_MIN_CORR, workers: int = DEFAULT_WORKERS,
              train_items: Sequence[Item] | None = None,
              test_items: Sequence[Item] | None = None) -> dict:
    """Audit ``test_dir`` against ``train_dir`` and write the report files to ``out_dir``.

    Writes ``audit.json``, ``duplicates.csv``, ``train_duplicates.csv``, ``test_duplicates.csv`` and
    ``clean_test.txt`` (the Testing slices with no copy in Training, directly or through a copy in
    Testing); returns the ``audit.json`` dict. ``train_items``/``test_items``
    override the folder listing (``pipeline.datasets.list_class_folder``).
    """
    t0 = time.perf_counter()
    if train_items is None or test_items is None:
        from pipeline.datasets import list_class_folder

        if train_items is None:
            train_items = list_class_folder(train_dir)
        if test_items is None:
            test_items = list_class_folder(test_dir)
    train_items = [(str(p), str(lab)) for p, lab in train_items]
    test_items = [(str(p), str(lab)) for p, lab in test_items]

    res = find_duplicates(train_items, test_items, max_distance=max_distance,
                          min_corr=min_corr, workers=workers)
    cross, within, within_test, fte = res["cross"], res["train"], res["test"], res["test_features"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / DUPLICATES_CSV, ("test_path", "train_path", "distance", "same_label"),
               ((r["test_path"], r["train_path"], r["distance"], r["same_label"]) for r in cross))
    _write_csv(out / TRAIN_DUPLICATES_CSV, ("path_a", "path_b", "distance", "same_label"),
               ((r["path_a"], r["path_b"], r["distance"], r["same_label"]) for r in within))
    _write_csv(out / TEST_DUPLICATES_CSV, ("path_a", "path_b", "distance", "same_label"),
               ((r["path_a"], r["path_b"], r["distance"], r["same_label"]) for r in within_test))

    from pipeline.datasets import duplicate_groups

    # a Testing slice is not clean if anything in its group of copies (Testing copies included) is a
    # copy of a Training slice: T2 ~ T1 ~ A puts T2 in Training as surely as T1
    copied = {r["test_path"] for r in cross}
    groups = duplicate_groups((r["path_a"], r["path_b"]) for r in within_test)
    leaked_groups = {groups[p] for p in copied if p in groups}
    via_testing = {p for p, g in groups.items() if g in leaked_groups and p not in copied}
    clean = sorted(p for p, ok in zip(fte.paths, fte.ok) if ok and p not in copied and p not in via_testing)
    # one path a line: a name holding a line break would come back as two paths, neither of them it
    unlistable = [p for p in clean if len(p.splitlines()) != 1 or p != p.strip("\r\n")]
    if unlistable:
        print(f"warning: {len(unlistable)} Testing file name(s) hold a line break and cannot be listed in "
              f"{CLEAN_TEST_TXT}; they are left out of the clean subset (e.g. {unlistable[0]!r})", file=sys.stderr)
        clean = [p for p in clean if p not in set(unlistable)]
    (out / CLEAN_TEST_TXT).write_text("".join(p + "\n" for p in clean), encoding="utf-8", errors="surrogateescape")
    clean_set = set(clean)

    best = res["test_best_corr"]
    borderline = sorted(p for p, b in zip(fte.paths, best.tolist())
                        if p in clean_set and b >= min_corr - BORDERLINE_MARGIN)
    classes = sorted({lab for _, lab in test_items} | {lab for _, lab in train_items})
    borderline_set = set(borderline)
    per_class = {}
    for c in classes:
        paths = [p for p, lab in test_items if lab == c]
        per_class[c] = {
            "n_test": len(paths),
            "n_train": sum(1 for _, lab in train_items if lab == c),
            "test_with_train_copy": sum(1 for p in paths if p in copied),
            "test_copy_via_testing": sum(1 for p in paths if p in via_testing),
            "test_clean": sum(1 for p in paths if p in clean_set),
            "test_clean_borderline": sum(1 for p in paths if p in borderline_set),
        }

    def conflict(r, a, b, la, lb):
        return {a: r[a], la: r[la], b: r[b], lb: r[lb], "distance": r["distance"],
                "corr": r["corr"], "pearson": r["pearson"], "spearman": r["spearman"],
                "kind": r["kind"]}

    audit = {
        "train_dir": str(train_dir),
        "test_dir": str(test_dir),
        "cwd": os.getcwd(),
        "totals": {
            "n_train": len(train_items),
            "n_test": len(test_items),
            "n_test_with_train_copy": len(copied),
            "n_test_clean": len(clean),
            # a clean slice's Testing copies count once here: the clean subset's distinct slices
            "n_test_clean_groups": len({groups.get(p, p) for p in clean}),
            "n_test_copy_via_testing": len(via_testing),
            "n_test_internal_duplicate_pairs": len(within_test),
            "n_test_internal_label_conflicts": sum(not r["same_label"] for r in within_test),
            "n_test_clean_borderline": len(borderline),
            "n_test_unreadable": int((~fte.ok).sum()),
            "n_cross_pairs": len(cross),
            "n_cross_pairs_exact": sum(r["kind"] == "exact" for r in cross),
            "n_test_with_exact_copy": len({r["test_path"] for r in cross if r["kind"] == "exact"}),
            "n_train_internal_duplicate_pairs": len(within),
            "n_train_internal_exact_pairs": sum(r["kind"] == "exact" for r in within),
            "n_train_in_dup_groups": _n_in_groups((r["path_a"], r["path_b"]) for r in within),
            "n_cross_label_conflicts": sum(not r["same_label"] for r in cross),
            "n_train_label_conflicts": sum(not r["same_label"] for r in within),
            "n_errors": len(res["errors"]),
            "n_cross_candidates": res["n_cross_candidates"],
            "n_train_candidates": res["n_train_candidates"],
            "n_test_candidates": res["n_test_candidates"],
        },
        "per_class": per_class,
        "label_conflicts": {
            "cross": [conflict(r, "test_path", "train_path", "test_label", "train_label")
                      for r in cross if not r["same_label"]],
            "train": [conflict(r, "path_a", "path_b", "label_a", "label_b")
                      for r in within if not r["same_label"]],
            "test": [conflict(r, "path_a", "path_b", "label_a", "label_b")
                     for r in within_test if not r["same_label"]],
        },
        "parameters": {
            "max_distance": max_distance, "min_corr": min_corr, "workers": workers,
            "borderline_margin": BORDERLINE_MARGIN, "corr": "max(pearson, spearman)",
            "bg_threshold": BG_THRESHOLD, "thumb_size": THUMB_SIZE, "dct_size": DCT_SIZE,
            "hash_bits": HASH_SIZE * HASH_SIZE,
        },
        "borderline_test": borderline,
        "errors": res["errors"],
        "elapsed_s": round(time.perf_counter() - t0, 2),
    }
    (out / AUDIT_JSON).write_text(json.dumps(audit, indent=2))
    return audit


class PathList(set):
    """A set of resolved path strings that also keeps each path as written (absolute, links not
    followed) in ``written``: where the images are links, only the written form ends in
    ``Testing/<class>/<file>``, which matching by the last components needs."""

    written: list


def load_clean_list(path, base=None) -> PathList:
    """Read ``clean_test.txt`` back as a set of resolved path strings (with ``.written``, see :class:`PathList`).

    Relative lines are resolved against ``base``; by default against the ``cwd`` recorded
    in the sibling ``audit.json`` (the directory the audit ran from), else the current one.
    Compare with ``str(Path(p).resolve())`` of the paths being evaluated.
    """
    path = Path(path)
    if base is None:
        meta = path.with_name(AUDIT_JSON)
        try:
            base = json.loads(meta.read_text()).get("cwd")
        except (OSError, ValueError):
            base = None
    base = Path(base) if base is not None else Path.cwd()
    out = PathList()
    out.written = []
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        line = line.strip()
        if line:
            p = Path(line)
            absolute = p if p.is_absolute() else base / p
            out.add(str(absolute.resolve()))
            out.written.append(str(absolute))
    return out
