"""Grad-CAM (Selvaraju et al. 2017): where in the slice the classifier's evidence for a class lies.

The activations A_k of a late conv layer are weighted by the spatial mean of d(logit_c)/dA_k,
summed, rectified, upsampled to the input and scaled to [0, 1]. It shows which regions drove
the score, at the coarse resolution of that layer; it is not a segmentation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import CLASSES
from pipeline.classify.models import INPUT_MEAN, INPUT_STD


def find_target_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM hooks by default: the last feature map the classifier head reads, all its
    channels. timm's ``conv_head`` or MONAI EfficientNet's ``_conv_head``; MONAI DenseNet's
    ``class_layers.relu`` (the last conv of a dense block adds only 32 of its 1024 channels); a
    ResNet's ``layer4`` (after the residual sum); else the last ``nn.Conv2d`` of ``model.features``
    (SmallCNN), else the last ``nn.Conv2d`` of the model."""
    for name in ("conv_head", "_conv_head", "class_layers.relu", "layer4"):
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    features = getattr(model, "features", None)
    for scope in ((features,) if isinstance(features, nn.Module) else ()) + (model,):
        convs = [m for m in scope.modules() if isinstance(m, nn.Conv2d)]
        if convs:
            return convs[-1]
    raise ValueError(f"{type(model).__name__}: no nn.Conv2d layer to hook; pass layer=")


def _resolve_layer(model: nn.Module, layer) -> nn.Module:
    if layer is None:
        return find_target_layer(model)
    if isinstance(layer, str):
        return model.get_submodule(layer)
    return layer


def grad_cam(model: nn.Module, x: torch.Tensor, target_class: int | None = None, layer=None) -> np.ndarray:
    """Grad-CAM heatmap of ``model`` for one normalised input ``x`` (1, C, H, W) -> (H, W) float32 in [0, 1].

    ``target_class`` defaults to the predicted class; ``layer`` is a module, a dotted module
    name, or None for :func:`find_target_layer`. A map with no positive evidence is all zeros.
    The model is run in eval mode and left as it was.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one input of shape (1, C, H, W), got {tuple(x.shape)}")
    target = _resolve_layer(model, layer)
    store: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        store["act"] = output
        return output.clone()  # an in-place op after the layer must not overwrite what we keep

    was_training = model.training
    model.eval()
    handle = target.register_forward_hook(hook)
    try:
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            x = x.detach().float().requires_grad_(True)
            logits = model(x)
            cls = int(logits[0].argmax()) if target_class is None else int(target_class)
            act = store["act"]
            grads = torch.autograd.grad(logits[0, cls], act)[0]
    finally:
        handle.remove()
        model.train(was_training)
    with torch.no_grad():
        weights = grads.float().mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * act.float()).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        cam = cam - cam.min()
        top = cam.max()
        cam = cam / top if top > 1e-12 else torch.zeros_like(cam)
    return cam.clamp(0, 1).cpu().numpy().astype(np.float32)


def normalise(images: np.ndarray, device="cpu") -> torch.Tensor:
    """(B, S, S) uint8 -> (B, 1, S, S) float tensor as the classifiers expect it."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().unsqueeze(1)
    return ((x - INPUT_MEAN) / INPUT_STD).to(device)


def pick_examples(labels: Sequence[int], preds: Sequence[int], n: int = 8, seed: int = 0) -> list[int]:
    """Up to ``n`` indices: half right, half wrong (the other kind fills in when one runs short),
    drawn at random with ``seed``, right ones first."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    rng = np.random.default_rng(seed)
    right = rng.permutation(np.flatnonzero(labels == preds))
    wrong = rng.permutation(np.flatnonzero(labels != preds))
    n_wrong = min(len(wrong), n // 2)
    n_right = min(len(right), n - n_wrong)
    n_wrong = min(len(wrong), n - n_right)
    return [int(i) for i in right[:n_right]] + [int(i) for i in wrong[:n_wrong]]


def gradcam_panel(classifier, images: np.ndarray, labels: Sequence[int], preds: Sequence[int],
                  out_png: str | os.PathLike, n: int = 8, seed: int = 0, probs: np.ndarray | None = None,
                  cols: int = 4) -> list[int]:
    """Grid of right (green title) and wrong (red title) predictions with their Grad-CAM overlaid.

    The map explains the *predicted* class. ``classifier`` is a
    :class:`pipeline.classify.predict.Classifier` (or anything with ``.model`` and a device);
    returns the indices shown.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = pick_examples(labels, preds, n, seed)
    model = getattr(classifier, "torch_model", classifier.model)  # an ONNX-backed one keeps its torch network
    device = next(model.parameters()).device
    rows = max(1, -(-len(chosen) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.8 * rows), squeeze=False, layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), chosen):
        x = normalise(images[i:i + 1], device).contiguous(memory_format=torch.channels_last)
        cam = grad_cam(model, x, target_class=int(preds[i]))
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        ok = int(labels[i]) == int(preds[i])
        conf = f" {probs[i, int(preds[i])]:.2f}" if probs is not None else ""
        ax.set_title(f"true {CLASSES[int(labels[i])]}\npred {CLASSES[int(preds[i])]}{conf}",
                     fontsize=8, color="green" if ok else "red")
    if not chosen:
        axes[0, 0].text(0.5, 0.5, "no images", ha="center", va="center")
    fig.suptitle("Grad-CAM of the predicted class (green: right, red: wrong)", fontsize=9)
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return chosen
