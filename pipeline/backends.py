"""Inference backends: the PyTorch network itself, or the same network exported to ONNX and run
by ONNX Runtime (often faster on a small CPU; its kernels fuse convolution, norm and activation).

``as_backend(module, example, "onnx", key=...)`` returns a drop-in callable: it takes and returns
torch tensors like the module, so the stage code does not change. Exports are cached on disk by
``key`` (the checkpoint's sha256 plus what was exported), so a run pays for the export once.
Numerical agreement with PyTorch is tested (``tests/test_backends.py``).
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch

BACKENDS = ("torch", "onnx")


def cache_dir() -> Path:
    root = os.environ.get("BRAIN_MRI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "brain-mri-pipeline")
    return Path(root) / "onnx"


def export_onnx(module: torch.nn.Module, example: torch.Tensor, dest: str | os.PathLike | None = None,
                opset: int = 17) -> bytes:
    """Export ``module`` (eval mode, float32, CPU) with a dynamic batch axis; returns the model bytes
    (also written atomically to ``dest`` when given)."""
    module = module.float().cpu().eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter warns about eval-mode instance norm: expected
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example.float().cpu(),), buf, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=opset, dynamo=False)
    data = buf.getvalue()
    if dest is not None:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    return data


class OnnxModule:
    """An ONNX Runtime session that is called like the module it came from: (B, ...) tensor -> tensor."""

    def __init__(self, model: bytes | str | os.PathLike, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeError("--backend onnx needs onnxruntime: pip install onnxruntime "
                              "(or `pip install -e .[bench]`)") from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.session.run(None, {"x": np.ascontiguousarray(x.detach().float().cpu().numpy())})[0]
        return torch.from_numpy(y)

    # the stages call .eval()/.to() on their networks; a session is always both
    def eval(self):
        return self

    def to(self, *args, **kwargs):
        return self


def as_backend(module: torch.nn.Module, example: torch.Tensor, backend: str = "torch", key: str | None = None,
               threads: int | None = None):
    """``module`` itself for ``torch``; an :class:`OnnxModule` of it for ``onnx`` (exported once per ``key``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return module
    if key is None:  # no stable identity: hash the weights
        h = hashlib.sha256()
        for name, t in module.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        key = h.hexdigest()
    path = cache_dir() / f"{key}-{'x'.join(str(d) for d in example.shape[1:])}.onnx"
    if not path.is_file():
        export_onnx(module, example, path)
        return OnnxModule(path, threads=threads)
    try:
        return OnnxModule(path, threads=threads)
    except Exception as exc:  # noqa: BLE001 - a cached file cut short or damaged: onnxruntime raises its own kinds
        if isinstance(exc.__cause__, ImportError):
            raise  # onnxruntime missing: exporting again would not help
        export_onnx(module, example, path)  # the cache is ours to remake, from the weights just loaded
        return OnnxModule(path, threads=threads)
