"""Load a trained classifier checkpoint (weights-only, sha256-checked) and classify batches.

:func:`load_classifier` is the entry point: a checkpoint gives a :class:`Classifier`, a
``classifier-ensemble`` manifest entry or a comma-separated list of checkpoints gives a
:class:`ClassifierEnsemble` whose members may each see a different input (whole slice, tumor crop).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline import CLASSES
from pipeline.classify.models import INPUT_MEAN, INPUT_STD, create_model
from pipeline.roi import View, view_of
from pipeline.weights import WeightsError, load_checkpoint


def check_classifier_meta(meta, source) -> dict:
    """``meta`` if it says what the network reads and answers: ``classes`` in this project's order, a
    ``mode`` of :data:`pipeline.roi.MODES`, an input ``size``; else WeightsError naming ``source``. A
    checkpoint that leaves one out would be run on inputs it may never have seen."""
    from pipeline.roi import MODES

    if not isinstance(meta, dict):
        raise WeightsError(f"{source}: its meta is not a dict")
    if "classes" not in meta or tuple(meta["classes"]) != CLASSES:
        raise WeightsError(f"{source}: classes {meta.get('classes')} differ from {CLASSES}"
                           + (" (the checkpoint records none)" if "classes" not in meta else ""))
    if meta.get("mode") not in MODES:
        raise WeightsError(f"{source}: input mode {meta.get('mode')!r} is not one of {', '.join(MODES)}")
    try:
        if int(meta["size"]) < 1:
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{source}: no input size (meta['size'] = {meta.get('size')!r})") from None
    return meta


class Classifier:
    """A trained stage-2 model plus the input settings it was trained with.

    ``meta`` carries ``model``, ``mode`` (full | crop | masked), ``size`` and ``classes``.
    """

    def __init__(self, weights: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 backend: str = "torch", compile: bool = False):
        ckpt = load_checkpoint(weights, map_location="cpu")
        if "state_dict" not in ckpt or "meta" not in ckpt:
            raise WeightsError(f"{weights}: not a classifier checkpoint (expected keys state_dict and meta)")
        self.meta = check_classifier_meta(ckpt["meta"], weights)
        self.mode, self.size = self.meta["mode"], int(self.meta["size"])
        #: a crop/masked model: the segmenter whose masks it was trained on (manifest name), and its sha256
        #: as training recorded it (``--seg auto`` needs one of the two to pick the right masks)
        from pipeline.weights import resolve, sha256_file

        self.fingerprint = {"weights_sha256": sha256_file(resolve(weights, verify=False))}
        self.segmenter, self.segmenter_sha256 = _trained_on_segmenter(weights, self.fingerprint["weights_sha256"],
                                                                      self.meta)
        self.device = device
        if threads and backend == "torch":  # an ONNX session takes its own count; torch's is process-wide
            torch.set_num_threads(threads)
        model = create_model(self.meta["model"], pretrained=False, in_chans=1, num_classes=len(CLASSES))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()})
        self.model = model.eval().to(device).to(memory_format=torch.channels_last)
        self.torch_model = self.model  # Grad-CAM needs gradients, whatever runs the forward pass
        self.backend = backend
        if backend != "torch":
            from pipeline.backends import as_backend

            if str(device) != "cpu":
                raise WeightsError(f"--backend {backend} runs on the CPU; use --device cpu or --backend torch")
            key = f"cls-{self.fingerprint['weights_sha256'][:16]}"
            self.model = as_backend(model, torch.zeros(1, 1, self.size, self.size), backend, key=key, threads=threads)
        elif compile:
            # worth it on CUDA with large batches; dynamic=True so the last, smaller batch of a
            # folder does not trigger a recompile
            self.model = torch.compile(self.model, dynamic=True)

    @property
    def views(self) -> tuple[View, ...]:
        """The input it reads, as a ``(mode, size, margin)`` key (:func:`pipeline.roi.view_of`)."""
        return (view_of(self.mode, self.size, self.meta.get("margin", 0.25)),)

    @property
    def members(self) -> list["Classifier"]:
        return [self]

    def predict_views(self, views: dict[View, np.ndarray]) -> np.ndarray:
        """``{(mode, size, margin): (B, size, size) uint8}`` holding at least :attr:`views` -> (B, 4) probabilities."""
        return self.predict_proba(views[self.views[0]])

    @torch.inference_mode()
    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(B, S, S) uint8 inputs made by :func:`pipeline.roi.make_input` -> (B, 4) probabilities."""
        if images.ndim != 3 or images.shape[1:] != (self.size, self.size):
            raise ValueError(f"expected (B, {self.size}, {self.size}) inputs, got {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).unsqueeze(1).float()
        x = ((x - INPUT_MEAN) / INPUT_STD).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", enabled=str(self.device).startswith("cuda")):
            logits = self.model(x)
        return logits.float().softmax(1).cpu().numpy()


class ClassifierEnsemble:
    """The mean of its members' probabilities, each member reading its own input.

    Why: a whole-slice model and a tumor-crop model err on different slices (measured: the crop
    one is weaker on glioma, the whole-slice one on meningioma), so their mean beats either alone;
    see ``weights/cls_lite0_full_crop.md``. ``mode`` is the members' modes joined by ``+``.
    """

    def __init__(self, members: Sequence[Classifier], name: str = "", second_opinion: Sequence[Classifier] = (),
                 below: float | None = None):
        self.members = list(members)
        #: consulted only where the members' mean is unsure (top probability < ``below``); see predict_views
        self.second_opinion = list(second_opinion)
        if len(self.members) < 2:
            raise WeightsError(f"ensemble {name!r}: needs at least two members, got {len(self.members)}")
        if self.second_opinion and not (below is not None and 0.0 < float(below) <= 1.0):
            raise WeightsError(f"ensemble {name!r}: second-opinion members need \"below\" in (0, 1], got {below!r}")
        self.below = float(below) if self.second_opinion else None
        everyone = self.members + self.second_opinion
        self.name = name
        self.views = tuple(dict.fromkeys(v for m in everyone for v in m.views))
        self.mode = "+".join(dict.fromkeys(m.mode for m in self.members))
        self.size = self.members[0].size
        self.device = self.members[0].device
        # each crop/masked member reads the ROI at its own margin (part of its view); "margin" is the
        # first one, kept for callers that record a single margin
        margins = [v[2] for v in self.views if v[2] is not None]
        self.meta = {"model": "ensemble", "mode": self.mode, "margin": margins[0] if margins else 0.25,
                     "margins": sorted(set(margins)), "classes": list(CLASSES),
                     "members": [m.meta for m in self.members]}
        # what was run, not how it was named: the same members resume a folder however they are spelt
        self.fingerprint = {"ensemble": "mean", "members": sorted(m.fingerprint["weights_sha256"] for m in self.members)}
        if self.second_opinion:
            self.meta["second_opinion"] = {"below": self.below, "members": [m.meta for m in self.second_opinion]}
            self.fingerprint["second_opinion"] = {
                "below": self.below, "members": sorted(m.fingerprint["weights_sha256"] for m in self.second_opinion)}
        #: the segmenter whose masks the crop/masked members were trained on (``--seg auto`` picks it):
        #: a manifest name, else the sha256 training recorded
        self.segmenter: str | None = None
        self.segmenter_sha256: str | None = None
        #: run the members side by side (ONNX Runtime sessions only; torch shares one thread pool)
        self.parallel = all(m.backend == "onnx" for m in everyone)

    def _mean(self, members: Sequence[Classifier], views: dict) -> np.ndarray:
        if self.parallel and len(members) > 1:
            # ONNX Runtime releases the GIL, and one small network scales poorly past one core:
            # side by side, each on its own thread(s), beats one after the other on all cores
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(len(members)) as pool:
                probs = list(pool.map(lambda m: m.predict_views(views), members))
        else:
            probs = [m.predict_views(views) for m in members]
        return np.mean(probs, axis=0)

    def predict_views(self, views: dict[View, np.ndarray]) -> np.ndarray:
        """``{(mode, size, margin): (B, size, size) uint8}`` holding every member's view -> (B, 4) mean probabilities.

        With second-opinion members, a row whose mean has its top probability below ``below`` gets
        the mean over all members, the second-opinion ones included. Why: most slices are clear-cut
        and the extra networks would only cost time there; the few unsure ones are where the errors are.
        """
        missing = [v for v in self.views if v not in views]
        if missing:
            raise ValueError(f"ensemble {self.name!r}: no input for {missing}")
        probs = self._mean(self.members, views)
        if self.second_opinion:
            unsure = np.flatnonzero(probs.max(1) < self.below)
            if unsure.size:
                extra = self._mean(self.second_opinion, {v: views[v][unsure] for v in self.views})
                n, k = len(self.members), len(self.second_opinion)
                probs[unsure] = (probs[unsure] * n + extra * k) / (n + k)
        return probs

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        if len(self.views) > 1:
            raise ValueError(f"ensemble {self.name!r} reads {len(self.views)} inputs {list(self.views)}; "
                             f"use predict_views")
        return self.predict_views({self.views[0]: images})


TTA_MODES = ("none", "hflip")


def predict_views_tta(classifier, views: dict[View, np.ndarray], tta: str = "none") -> np.ndarray:
    """``classifier.predict_views`` with test-time augmentation -> (B, 4) probabilities.

    ``hflip``: the mean over each input and its left-right mirror (one forward pass of 2B rows).
    Why mirrors only: brains are close to left-right symmetric and every member was trained with
    horizontal flips; vertical flips and rotations are not views the scanner gives.
    """
    if tta == "none":
        return classifier.predict_views(views)
    if tta != "hflip":
        raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    both = {v: np.concatenate([x, x[:, :, ::-1]]) for v, x in views.items()}
    probs = classifier.predict_views(both)
    n = len(probs) // 2
    return (probs[:n] + probs[n:]) / 2


def load_classifier(weights: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                    backend: str = "torch", compile: bool = False) -> Classifier | ClassifierEnsemble:
    """A checkpoint (manifest name or .pt path) -> :class:`Classifier`; an ensemble file (manifest
    name of kind ``classifier-ensemble``, or a .json path) or ``"a.pt,b.pt"`` -> :class:`ClassifierEnsemble`.

    An ensemble file is JSON: ``{"members": [...], "segmenter": NAME}``, each member a manifest name
    or a path relative to the file; ``segmenter`` (optional) is the one whose masks its members were
    trained on; ``second_opinion`` (optional), ``{"members": [...], "below": P}``, names networks
    that join the mean only on slices where the members' top probability is below ``P``.
    Manifest entries are sha256-checked like checkpoints.
    """
    import json

    from pipeline.weights import load_manifest, resolve

    name = str(weights)
    manifest = load_manifest()
    spec: dict = {}
    extra: list[str] = []
    below = None
    if manifest.get(name, {}).get("kind") == "classifier-ensemble" or name.endswith(".json"):
        path = resolve(name)
        try:
            spec = json.loads(path.read_text())
            members = spec["members"]
            if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise WeightsError(f"{path}: not an ensemble file (expected JSON with \"members\": a list of "
                               f"manifest names or paths)") from None
        second = spec.get("second_opinion") or {}
        if not isinstance(second, dict) or not isinstance(second.get("members", []), list) \
                or not all(isinstance(m, str) for m in second.get("members", [])):
            raise WeightsError(f"{path}: \"second_opinion\" must be {{\"members\": [...], \"below\": P}}")
        members, extra = ([m if m in manifest else str(path.parent / m) for m in names]
                          for names in (members, second.get("members", [])))
        below = second.get("below")
    elif "," in name and not Path(name).exists():
        members = [m.strip() for m in name.split(",") if m.strip()]
    else:
        return Classifier(weights, device=device, threads=threads, backend=backend, compile=compile)
    cores = threads or torch.get_num_threads()
    if backend == "onnx" and members:  # the sessions run side by side: share the cores between them
        threads = max(1, cores // len(members))

    def build(paths):
        return [Classifier(m, device=device, threads=threads, backend=backend, compile=compile) for m in paths]

    ensemble = ClassifierEnsemble(build(members), name=name, second_opinion=build(extra), below=below)
    if cores < len(ensemble.members):  # side by side, one thread each would take more cores than given
        ensemble.parallel = False
    named = spec.get("segmenter")
    if named:  # a manifest name, or a file beside the ensemble file like its members
        beside = path.parent / named
        ensemble.segmenter = str(beside) if named not in manifest and beside.is_file() else named
    else:  # a list of checkpoints: what their crop/masked members record
        readers = [m for m in [*ensemble.members, *ensemble.second_opinion] if m.mode != "full"]
        recorded = {m.segmenter or m.segmenter_sha256 for m in readers} - {None}
        if len(recorded) > 1:
            raise WeightsError(f"{name}: its members were trained on masks of different segmenters "
                               f"({', '.join(sorted(recorded))}); one run reads one segmenter's masks")
        known = next((m for m in readers if m.segmenter or m.segmenter_sha256), None)
        if known is not None:  # members that record nothing are taken to share it
            ensemble.segmenter, ensemble.segmenter_sha256 = known.segmenter, known.segmenter_sha256
    return ensemble


def _trained_on_segmenter(weights: str | os.PathLike, own_sha256: str, meta: dict) -> tuple[str | None, str | None]:
    """(manifest name, sha256) of the segmenter a crop/masked checkpoint was trained on; (None, None) for a
    whole-slice model or one that records neither (trained before the cache recorded it). The checkpoint's
    manifest entry is found by name or by its own hash (a copy of a listed file is that file)."""
    from pipeline.weights import load_manifest, name_of_sha256

    if meta.get("mode") == "full":
        return None, None
    manifest = load_manifest()
    entry = manifest.get(str(weights)) or manifest.get(name_of_sha256(own_sha256, manifest) or "") or {}
    sha = meta.get("segmenter_sha256")
    if entry.get("segmenter"):
        return entry["segmenter"], sha
    named = name_of_sha256(sha, manifest)
    return (named if named and manifest[named].get("kind") == "segmenter" else None), sha


def export_checkpoint(run_best: str | os.PathLike, dest: str | os.PathLike, half: bool = True) -> str:
    """Copy a training ``best.pt`` to a small shippable checkpoint (fp16 weights); returns its sha256."""
    from pipeline.weights import resolve, save_checkpoint, sha256_file

    run_best = resolve(run_best)  # a manifest name works; a listed file is sha256-checked
    try:
        ckpt = torch.load(run_best, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds on a file that is not a checkpoint
        raise WeightsError(f"{run_best}: not a loadable weights-only checkpoint ({type(exc).__name__}: {exc})"[:500]) from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "meta" not in ckpt:
        raise WeightsError(f"{run_best}: not a training best.pt (expected keys state_dict and meta)")
    check_classifier_meta(ckpt["meta"], run_best)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in ckpt["state_dict"].items()}
    save_checkpoint({"state_dict": state, "meta": ckpt["meta"]}, dest)
    return sha256_file(dest)
