"""Settings: defaults from ``configs/default.yaml``, overridden by ``--config`` files and the command line.

Ultralytics-style: every setting has a YAML default; a flag on the command line wins.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A settings file or override is malformed."""


def load_config(*paths: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """Merge YAML files (later wins, section by section) over ``configs/default.yaml``.

    ``null`` in a later file means "the default", as it does in ``default.yaml``: it does not
    replace a value an earlier file gives (several options have no default but that file's)."""
    merged: dict[str, dict[str, Any]] = {}
    for path in (DEFAULT_CONFIG, *[p for p in paths if p]):
        path = Path(path)
        if not path.is_file():
            if path == DEFAULT_CONFIG:
                # every command's defaults live there: without it they would all be None
                raise ConfigError(f"{path}: the default settings are missing; the package reads them from its "
                                  f"checkout, so install it from one with `pip install -e .` (or `make setup`)")
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in data.items():
            if values is None:
                values = {}
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping")
            into = merged.setdefault(section, {})
            into.update({k: v for k, v in values.items() if v is not None or k not in into})
    return merged


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` -> (key, YAML-typed value), e.g. ``imgsz=128`` -> ("imgsz", 128)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key, yaml.safe_load(value) if value != "" else ""


def resolve_device(name: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible else ``cpu``; ``cuda:N`` is checked to exist."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
        if ":" in name:
            index = int(name.split(":", 1)[1])
            if index >= torch.cuda.device_count():
                raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return name
    raise ConfigError(f"--device {name}: expected auto, cpu, cuda or cuda:N")


def environment() -> dict:
    """What a run's numbers may depend on besides its command and seed: library versions, the CPU and
    torch's thread count. Recorded in training summaries because a run repeated on another machine
    can differ by a few slices even though it repeats bit for bit on one."""
    import importlib.metadata
    import platform

    import torch

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__,
            **{name: version(name) for name in ("torchvision", "timm", "monai", "numpy")},
            # one OpenCV, under whichever of its distributions is installed (GPU images ship -headless)
            "opencv-python": next(filter(None, map(version, ("opencv-python", "opencv-python-headless",
                                                             "opencv-contrib-python"))), None),
            "cpu": cpu, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) for repeatable runs."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
