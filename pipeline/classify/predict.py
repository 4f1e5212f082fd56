"""Load a trained classifier checkpoint (weights-only, sha256-checked) and classify batches."""
from __future__ import annotations

import os

import numpy as np
import torch

from pipeline import CLASSES
from pipeline.classify.models import INPUT_MEAN, INPUT_STD, create_model
from pipeline.weights import WeightsError, load_checkpoint


class Classifier:
    """A trained stage-2 model plus the input settings it was trained with.

    ``meta`` carries ``model``, ``mode`` (full | crop | masked), ``size`` and ``classes``.
    """

    def __init__(self, weights: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 backend: str = "torch", compile: bool = False):
        ckpt = load_checkpoint(weights, map_location="cpu")
        if "state_dict" not in ckpt or "meta" not in ckpt:
            raise WeightsError(f"{weights}: not a classifier checkpoint (expected keys state_dict and meta)")
        self.meta = ckpt["meta"]
        if tuple(self.meta.get("classes", CLASSES)) != CLASSES:
            raise WeightsError(f"{weights}: classes {self.meta.get('classes')} differ from {CLASSES}")
        self.mode, self.size = self.meta["mode"], int(self.meta["size"])
        from pipeline.weights import resolve, sha256_file

        self.fingerprint = {"weights_sha256": sha256_file(resolve(weights, verify=False))}
        self.device = device
        if threads:
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


def export_checkpoint(run_best: str | os.PathLike, dest: str | os.PathLike, half: bool = True) -> str:
    """Copy a training ``best.pt`` to a small shippable checkpoint (fp16 weights); returns its sha256."""
    from pipeline.weights import sha256_file

    ckpt = torch.load(run_best, map_location="cpu", weights_only=True)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in ckpt["state_dict"].items()}
    torch.save({"state_dict": state, "meta": ckpt["meta"]}, dest)
    return sha256_file(dest)
