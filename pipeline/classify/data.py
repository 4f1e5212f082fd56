"""Decoded-once input caches for training and evaluation.

Decoding 7000 JPEGs every epoch would cost more than the network on a 2-core CPU, so each
split is read once, turned into the classifier input of its mode (:func:`pipeline.roi.make_input`)
and stored as one ``.npz``: ``images`` (N, S, S) uint8, ``labels`` (N,) int64, ``paths`` (N,) str,
``found`` (N,) bool.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from pipeline import CLASSES
from pipeline.datasets import Sample
from pipeline.folders import read_image_file, savez_atomic
from pipeline.roi import make_input
from pipeline.scans import read_scan


def mask_paths(samples: Sequence[Sample], image_root: Path, masks_dir: Path) -> list[Path]:
    """Where ``segment`` wrote each sample's mask: as its ``mask_names.csv`` beside ``masks_dir``
    records, else (runs before that record) by its rule over the folder's files (:func:`mask_names`)."""
    from pipeline.folders import csv_key, iter_input_files
    from pipeline.segment.run import mask_names, mask_relpath, plain_mask_name, read_mask_names

    rels = [_path_under(s.path, image_root) for s in samples]
    recorded = read_mask_names(Path(masks_dir).parent)
    if recorded is not None:
        # the record lists only names that differ from the plain rule: a scan added since segment ran
        # would otherwise read the plain name, which may be another scan's mask
        segmented = _segmented(Path(masks_dir).parent)
        missing = next((s.path for s, rel in zip(samples, rels) if csv_key(rel) not in segmented), None)
        if missing is not None:
            raise FileNotFoundError(f"{missing}: no row in {Path(masks_dir).parent / 'segments.csv'}, so no mask "
                                    f"(run `segment` on {image_root} again: it adds what is new)")
        names = {rel: recorded.get(rel) or plain_mask_name(rel) for rel in rels}
    else:
        root = Path(image_root).resolve()
        names = mask_names([p.relative_to(root).as_posix() for p in iter_input_files(root)])
    return [Path(masks_dir) / mask_relpath(rel, names) for rel in rels]


def _segmented(out: Path) -> set[str]:
    """The ``path`` column of ``out/segments.csv``."""
    import csv

    try:
        with open(out / "segments.csv", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            return {row["path"] for row in csv.DictReader(fh)}
    except FileNotFoundError:
        return set()


def _path_under(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` as ``segment`` named it: through a linked file's own name (a
    linked file's target may lie anywhere, even beside the masks), and through resolved folders only
    when the two were spelt through different links."""
    path = os.path.abspath(path)
    routes = ((path, os.path.abspath(root)),
              (os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path)), os.path.realpath(root)),
              (os.path.realpath(path), os.path.realpath(root)))
    for p, r in routes:
        rel = os.path.relpath(p, r)
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return Path(rel).as_posix()
    raise ValueError(f"{path}: not under {root}, the folder whose masks were given")


def build_cache(samples: Sequence[Sample], out: str | os.PathLike, mode: str = "full", size: int = 128,
                image_root: str | os.PathLike | None = None, masks_dir: str | os.PathLike | None = None,
                workers: int = 2, margin: float = 0.25) -> Path:
    """Read every sample once, make its input for ``mode`` and save the cache to ``out`` (.npz)."""
    if mode != "full" and (masks_dir is None or image_root is None):
        raise ValueError(f"mode {mode!r} needs masks_dir and image_root (the output of `segment`)")

    masks = mask_paths(samples, Path(image_root), Path(masks_dir)) if mode != "full" else [None] * len(samples)

    def one(job):
        sample, mpath = job
        image = read_scan(sample.path).image
        mask = None
        if mpath is not None:
            mask = read_image_file(mpath, cv2.IMREAD_GRAYSCALE)
            if mask is None:
                raise FileNotFoundError(f"{mpath}: mask missing (run `segment` on {image_root} first)")
        x, roi = make_input(image, mode, size, mask, margin=margin)
        return x, roi.found

    with ThreadPoolExecutor(workers) as pool:
        results = list(tqdm(pool.map(one, zip(samples, masks)), total=len(samples), desc=f"cache {mode} {size}px",
                            disable=None))
    made_by = _segmenter_sha256(masks_dir) if mode != "full" else None
    return savez_atomic(out,
                        images=np.stack([r[0] for r in results]),
                        labels=np.array([CLASSES.index(s.label) for s in samples], np.int64),
                        paths=np.array([str(s.path) for s in samples]),
                        found=np.array([r[1] for r in results], bool),
                        mode=np.array(mode), size=np.array(size), margin=np.array(margin),
                        **({"segmenter_sha256": np.array(made_by)} if made_by else {}))


def _segmenter_sha256(masks_dir: str | os.PathLike) -> str | None:
    """The sha256 of the segmenter that wrote ``masks_dir`` (``segment``'s record beside it), if known:
    a crop or masked classifier must later read masks from that same segmenter."""
    import json

    record = Path(masks_dir).parent / "segments.csv.settings.json"
    try:
        seg = json.loads(record.read_text()).get("segmenter") or {}
    except (OSError, ValueError):
        return None
    return seg.get("weights_sha256") if isinstance(seg, dict) else None


def load_cache(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: cache not found (build it with `python -m pipeline crop`)")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class Augment(torch.nn.Module):
    """Batch augmentation on (B, 1, H, W) float tensors in 0..255: flips, affine, intensity jitter.

    Runs on whatever device the batch is on, so it costs no data-loader workers.
    """

    def __init__(self, rotate_deg: float = 12, scale: tuple[float, float] = (0.9, 1.1), translate: float = 0.06,
                 shear_deg: float = 6, brightness: float = 0.12, contrast: float = 0.15, gamma: float = 0.15,
                 hflip: float = 0.5, vflip: float = 0.0, flip_shear: bool = False, stretch: float = 0.0):
        super().__init__()
        self.rotate, self.scale, self.translate, self.shear = rotate_deg, scale, translate, shear_deg
        self.brightness, self.contrast, self.gamma, self.hflip, self.vflip = brightness, contrast, gamma, hflip, vflip
        #: a flipped slice is also sheared by its rotation t: the sampling grid's axes meet at 90 deg +- 2t, so the
        #: slice is stretched by up to 1 / sqrt(1 - sin 24 deg) = 1.30x along one diagonal and squeezed to 0.84x
        #: along the other (its area grows by up to 1 / cos 24 deg = 1.095).
        #: It began as a slip (the flip on one entry of the map instead of a whole column) and does not help:
        #: over two seeds of the unseen-source proxy the exact mirror did no worse and did better on ordinary
        #: validation (weights/cls_lite0_full_crop.md, session 23), so the mirror is the default; True
        #: reproduces the classifiers trained before session 24 (their cards' commands say --flip-shear).
        self.flip_shear = flip_shear
        #: every slice stretched along x by a and along y by 1/a (area kept), log a ~ U(+-log(1 + stretch)),
        #: before the rotation: as a source's images of other shapes resized to a square would be. 0: off
        if not 0.0 <= stretch < 1.0:
            raise ValueError(f"stretch must be in [0, 1), got {stretch}")
        self.stretch = stretch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, dev = x.shape[0], x.device

        def u(lo, hi):
            return torch.empty(b, device=dev).uniform_(lo, hi)

        ang = torch.deg2rad(u(-self.rotate, self.rotate))
        sh = torch.deg2rad(u(-self.shear, self.shear))
        s = u(*self.scale)
        fx = torch.where(torch.rand(b, device=dev) < self.hflip, -1.0, 1.0)
        fy = torch.where(torch.rand(b, device=dev) < self.vflip, -1.0, 1.0)
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = cos / s * fx
        theta[:, 1, 1] = cos / s * fy
        if self.flip_shear:  # the flip on the diagonal only: a flipped slice is sheared too (see __init__)
            theta[:, 1, 0] = sin / s
            theta[:, 0, 1] = (-sin + torch.tan(sh)) / s
        else:  # an exact mirror multiplies a whole column
            theta[:, 1, 0] = sin / s * fx
            theta[:, 0, 1] = (-sin + torch.tan(sh)) / s * fy
        theta[:, :, 2] = torch.empty(b, 2, device=dev).uniform_(-self.translate, self.translate) * 2
        if self.stretch:  # drawn only when on, so runs without it draw exactly as before
            a = torch.exp(u(-math.log1p(self.stretch), math.log1p(self.stretch)))
            theta[:, 0, :2] /= a[:, None]  # the grid samples the input: a narrower x range widens the slice
            theta[:, 1, :2] *= a[:, None]
        grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = x / 255.0
        g = torch.exp(u(-self.gamma, self.gamma)).view(b, 1, 1, 1)
        x = x.clamp(0, 1) ** g
        c = (1 + u(-self.contrast, self.contrast)).view(b, 1, 1, 1)
        br = u(-self.brightness, self.brightness).view(b, 1, 1, 1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = ((x - mean) * c + mean + br).clamp(0, 1)
        return x * 255.0
