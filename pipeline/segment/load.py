"""Segmenter checkpoints in a weights-only format, and the registry that builds a segmenter by name.

Ultralytics ``.pt`` files are pickles of whole Python objects; loading one runs code. The project
ships YOLO-seg weights instead as ``{"state_dict", "meta"}`` (tensors plus plain data: the model's
YAML dict, class names, image size, threshold) and rebuilds the network from the YAML, so a
shipped checkpoint is loaded with ``torch.load(weights_only=True)`` after its sha256 is checked.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.weights import WeightsError, load_checkpoint, load_manifest, save_checkpoint

UNET_ARCH = "monai-unet-cascade"  # pipeline.segment.unet.ARCH, without importing MONAI here


def export_yolo_seg(run_best: str | os.PathLike, dest: str | os.PathLike, conf: float = 0.25,
                    imgsz: int | None = None, half: bool = True) -> None:
    """Turn an ultralytics training checkpoint (one we trained ourselves) into the weights-only format."""
    from pipeline.segment.yolo import offline_ultralytics

    if not Path(run_best).is_file():  # ultralytics would try to download a missing name from GitHub
        raise WeightsError(f"{run_best}: no such file (an ultralytics best.pt, as `train-seg` writes)")
    offline_ultralytics()
    from ultralytics.nn import tasks
    from ultralytics.nn.tasks import torch_safe_load

    # weights_only load against ultralytics' allow-list of its own classes: no arbitrary code runs. Where
    # torch or ultralytics cannot do that, torch_safe_load quietly unpickles instead: refuse
    if not getattr(getattr(tasks, "_SafeLoad", None), "SUPPORTED", False):
        raise WeightsError(f"{run_best}: this torch/ultralytics cannot load an ultralytics checkpoint weights-only "
                           f"(needs torch >= 2.6 and an ultralytics with torch_safe_load(safe_only=True)); "
                           f"not unpickling it")
    try:
        ckpt, _ = torch_safe_load(str(run_best), safe_only=True)
    except Exception as exc:  # noqa: BLE001 - a missing, torn or foreign file fails in many ways
        raise WeightsError(f"{run_best}: not an ultralytics training checkpoint ({type(exc).__name__}: {exc})"[:500]) from exc
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    from ultralytics.nn.tasks import SegmentationModel

    if not isinstance(model, SegmentationModel):
        raise WeightsError(f"{run_best}: not a YOLO-seg training checkpoint (expected an ultralytics best.pt "
                           f"of a segmentation model, as `train-seg` writes)")
    model = model.float()
    args = ckpt.get("train_args", {}) or {}
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    meta = {"yaml": _plain(model.yaml), "names": {int(k): str(v) for k, v in model.names.items()},
            "imgsz": int(imgsz or args.get("imgsz", 256)), "conf": float(conf), "task": "segment"}
    save_checkpoint({"state_dict": state, "meta": meta}, dest)


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


#: Architectures a shipped segmenter may have: the network is always built from ultralytics' own
#: packaged YAML, never from YAML carried in a checkpoint (ultralytics' parser evaluates names in it).
ALLOWED_YAMLS = ("yolov8n-seg.yaml", "yolov8s-seg.yaml")


def _reference_yaml(meta: dict) -> dict:
    import json

    from ultralytics.nn.tasks import yaml_model_load

    name = str(meta["yaml"].get("yaml_file", ""))
    if name not in ALLOWED_YAMLS:
        raise WeightsError(f"segmenter architecture {name!r} is not one of {ALLOWED_YAMLS}")
    ref = yaml_model_load(name)
    for key in ("backbone", "head", "scale"):
        if json.dumps(meta["yaml"].get(key)) != json.dumps(ref.get(key)):
            raise WeightsError(f"segmenter checkpoint's {key} differs from ultralytics' {name}; refusing to build it")
    return {**ref, "nc": len(meta["names"])}


def build_yolo_seg(ckpt: dict, device: str = "cpu"):
    """An ultralytics ``YOLO`` object around a network rebuilt from a weights-only checkpoint."""
    from pipeline.segment.yolo import offline_ultralytics

    offline_ultralytics()
    from ultralytics import YOLO
    from ultralytics.nn.tasks import SegmentationModel

    meta = ckpt["meta"]
    cfg = _reference_yaml(meta)
    net = SegmentationModel(cfg=cfg, ch=3, nc=len(meta["names"]), verbose=False)
    missing, unexpected = net.load_state_dict({k: v.float() if v.is_floating_point() else v
                                               for k, v in ckpt["state_dict"].items()}, strict=False)
    if missing or unexpected:
        raise WeightsError(f"segmenter checkpoint does not fit its YAML: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    net.names = {int(k): str(v) for k, v in meta["names"].items()}
    net.args = {"imgsz": int(meta["imgsz"]), "task": "segment"}
    net.eval()
    yolo = YOLO(model=cfg["yaml_file"], task="segment", verbose=False)
    yolo.model = net
    yolo.overrides.update({"task": "segment", "imgsz": int(meta["imgsz"])})
    return yolo


def load_segmenter(name: str | os.PathLike, device: str = "cpu", imgsz: int | None = None, conf: float | None = None,
                   backend: str = "torch"):
    """Build a segmenter from a manifest name or a weights-only checkpoint path.

    The checkpoint says what it is: ``meta.arch == "monai-unet-cascade"`` gives the U-Net cascade
    (``conf`` is then its coarse probability threshold), anything else a YOLO-seg network.
    """
    from pipeline.segment.yolo import YoloSegmenter

    entry = load_manifest().get(str(name), {})
    if entry and entry.get("kind") not in (None, "segmenter"):
        raise WeightsError(f"{name}: manifest entry is a {entry['kind']}, not a segmenter")
    ckpt = load_checkpoint(name)
    if "meta" not in ckpt or ckpt["meta"].get("task") != "segment":
        raise WeightsError(f"{name}: not a segmenter checkpoint (expected meta.task == 'segment')")
    meta = ckpt["meta"]
    from pipeline.weights import resolve, sha256_file

    sha = sha256_file(resolve(name, verify=False))
    if meta.get("arch") == UNET_ARCH:
        from pipeline.segment.unet import load_unet_cascade, with_borrowed_coarse

        if backend != "torch" and str(device) != "cpu":
            raise WeightsError(f"--backend {backend} runs on the CPU; use --device cpu or --backend torch")
        seg = load_unet_cascade(with_borrowed_coarse(ckpt), device=device, threshold=conf, backend=backend,
                                key=f"unet-{sha[:16]}" if backend != "torch" else None)
        seg.fingerprint = {"weights_sha256": sha, "threshold": seg.threshold, "min_area": seg.min_area}
        return seg
    if backend != "torch":
        raise WeightsError(f"--backend {backend}: available for the U-Net segmenter and the classifiers; "
                           f"run YOLO segmenters with --backend torch")
    seg = YoloSegmenter.__new__(YoloSegmenter)
    seg.model = build_yolo_seg(ckpt, device)
    seg.imgsz, seg.conf = int(imgsz or meta["imgsz"]), float(conf if conf is not None else meta["conf"])
    seg.iou, seg.device, seg.max_det, seg.half = 0.5, device, 3, False
    seg.fingerprint = {"weights_sha256": sha, "imgsz": seg.imgsz, "conf": seg.conf}
    return seg


def segmenter_arch(name: str | os.PathLike) -> str:
    """``unet`` or ``yolo``: what a segmenter checkpoint holds (sha256-checked, weights-only load)."""
    meta = load_checkpoint(name).get("meta", {})
    return "unet" if meta.get("arch") == UNET_ARCH else "yolo"
