"""Checkpoints: the manifest in ``weights/manifest.json``, sha256 checks, safe loading.

A checkpoint is code-adjacent: it is loaded only with ``torch.load(weights_only=True)`` and,
when the manifest lists it, only if its sha256 matches.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import urllib.request
from pathlib import Path
from typing import Any

from pipeline.config import REPO_ROOT

WEIGHTS_DIR = REPO_ROOT / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"


class WeightsError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the manifest; the message says what to do."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """``{name: {file, url, sha256, license, ...}}``; an absent manifest is empty."""
    path = Path(path or MANIFEST)
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
        return {e["name"]: e for e in entries["weights"]}
    except (ValueError, KeyError, TypeError) as exc:  # every command reads it: say which file is broken
        raise WeightsError(f"{path}: not a valid weights manifest ({type(exc).__name__}: {exc}); restore it with "
                           f"`git checkout -- {path.name}` if it is the repository's") from None


def listed_name(path: str | os.PathLike, manifest: dict | None = None) -> str | None:
    """The manifest name of the file at ``path``, or None when the manifest does not list it."""
    manifest = load_manifest() if manifest is None else manifest
    path = Path(path)
    if not path.is_file():
        return None
    return next((n for n, e in manifest.items() if (WEIGHTS_DIR / e["file"]).resolve() == path.resolve()), None)


def name_of_sha256(sha256: str | None, manifest: dict | None = None) -> str | None:
    """The manifest name whose pinned sha256 is ``sha256``, or None."""
    manifest = load_manifest() if manifest is None else manifest
    return next((n for n, e in manifest.items() if sha256 and e.get("sha256") == sha256), None)


def resolve(name_or_path: str | os.PathLike, manifest: dict | None = None, verify: bool = True) -> Path:
    """Path of a checkpoint given by manifest name or path, sha256-checked against the manifest.

    A path that the manifest lists (by file name) is checked too; a path it does not list is
    accepted as the user's own checkpoint.
    """
    manifest = load_manifest() if manifest is None else manifest
    entry = manifest.get(str(name_or_path))
    if entry is None:
        path = Path(name_or_path)
        entry = manifest.get(listed_name(path, manifest))
    else:
        path = WEIGHTS_DIR / entry["file"]
    if not path.is_file():
        if entry and entry.get("url"):
            hint = (f" Run `python -m pipeline weights --download {entry.get('name', name_or_path)}` (downloads "
                    f"{entry['url']}; `make weights` fetches sam_vit_b and the YOLO checkpoints) or place the file there.")
        elif entry:  # trained by this project: it ships in the repository
            hint = " It ships with the repository: restore it with `git checkout -- weights/`."
        elif str(name_or_path) == Path(name_or_path).name and not Path(name_or_path).suffix:
            hint = f" It is not a name in {MANIFEST.name} either; known names: {', '.join(sorted(manifest))}."
        else:
            hint = ""
        raise WeightsError(f"{path}: checkpoint not found.{hint}")
    if verify and entry and entry.get("sha256"):
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise WeightsError(f"{path}: sha256 {actual} does not match the manifest ({entry['sha256']}); "
                               f"refusing to load a checkpoint that is not the one published")
    return path


def save_checkpoint(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` so that ``path`` is either the old file or the whole new one: a run killed mid-write
    must not leave a torn checkpoint that the next run (a resume, an export, Make) would take as done."""
    import torch

    from pipeline.folders import write_atomic

    return write_atomic(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(name_or_path: str | os.PathLike, map_location: str = "cpu") -> dict:
    """``torch.load(weights_only=True)`` of a verified checkpoint."""
    import torch

    path = resolve(name_or_path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if not any(w in text.lower() for w in ("unsupported global", "unsupported class")):  # damaged or foreign
            with open(path, "rb") as fh:
                if fh.read(40).startswith(b"version https://git-lfs"):
                    raise WeightsError(f"{path}: a Git LFS pointer, not the checkpoint; fetch it with "
                                       f"`git lfs pull`") from exc
            # torch's own reason, without its preamble (which advises loading unsafely)
            reason = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0].strip()
            raise WeightsError(f"{path}: not a loadable weights-only checkpoint ({reason[:200]})") from exc
        # torch's own text suggests weights_only=False: never here
        raise WeightsError(f"{path}: holds Python objects beyond tensors, so it is refused (checkpoints are "
                           f"loaded weights-only; a file that needs more can run code when loaded)") from exc
    except Exception as exc:
        raise WeightsError(f"{path}: not a loadable weights-only checkpoint ({type(exc).__name__}: {exc})") from exc


def download(name: str, manifest: dict | None = None, timeout: float = 30.0) -> Path:
    """Fetch a manifest entry from its URL and verify it; a clear error where there is no internet."""
    manifest = load_manifest() if manifest is None else manifest
    if name not in manifest:
        raise WeightsError(f"{name}: not in {MANIFEST}; known: {', '.join(sorted(manifest))}")
    entry = manifest[name]
    dest = WEIGHTS_DIR / entry["file"]
    if dest.is_file() and sha256_file(dest) == entry.get("sha256"):
        return dest
    if not entry.get("url"):
        raise WeightsError(f"{name}: no download URL; it is trained by this project (see its model card)")
    import http.client

    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(entry["url"], timeout=timeout) as response, open(tmp, "wb") as fh:
            headers = getattr(response, "headers", None) or {}
            expected = headers.get("Content-Length")
            received = 0
            while block := response.read(1 << 20):
                fh.write(block)
                received += len(block)
        # a dropped connection can end the body early without an error: a short file must not pass,
        # least of all where the manifest has no hash yet and this download's would be recorded
        if expected is not None and expected.isdigit() and received != int(expected):
            raise OSError(f"the connection ended after {received} of {expected} bytes")
    except (OSError, http.client.HTTPException) as exc:
        tmp.unlink(missing_ok=True)
        by_hand = (f"copy the file to {dest} by hand (sha256 {entry['sha256']})" if entry.get("sha256") else
                   f"copy the file to {dest} by hand; its sha256 is not known offline, so check it against "
                   f"the publisher's, then `python -m pipeline weights --record {name}` records it")
        raise WeightsError(f"{name}: could not download {entry['url']} ({exc}). Without internet, {by_hand}") from exc
    actual = sha256_file(tmp)
    if entry.get("sha256") and actual != entry["sha256"]:
        tmp.unlink(missing_ok=True)
        raise WeightsError(f"{name}: downloaded file has sha256 {actual}, manifest says {entry['sha256']}")
    os.replace(tmp, dest)
    return dest
