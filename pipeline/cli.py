"""One entry point: ``python -m pipeline <command>`` (or ``brain-mri <command>``).

Defaults come from ``configs/default.yaml`` (section per command, plus ``common``), then
``--config FILE``, then flags. Every command reads files and writes files.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config, resolve_device, seed_everything

COMMANDS: dict[str, tuple[str, callable]] = {}


def command(name: str, help: str):
    def wrap(fn):
        COMMANDS[name] = (help, fn)
        return fn
    return wrap


def _nifti_slices(text: str):
    from pipeline.scans import parse_nifti_slices

    return parse_nifti_slices(text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_dicom_window_argument(p) -> None:
    """``--dicom-window``, the same for every command that reads scans (predict, segment, read)."""
    from pipeline.scans import DICOM_WINDOWS

    p.add_argument("--dicom-window", choices=DICOM_WINDOWS, default="file",
                   help="file (default): a DICOM's own WindowCenter/Width where it has one, as a viewer opens it; "
                        "minmax: the full range of its values, whatever window the file suggests")


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _fraction(text: str) -> float:
    """A float strictly between 0 and 1 (a significance level)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return value


def _margin(text: str) -> float:
    from pipeline.preprocess import MAX_MARGIN

    value = float(text)
    if not 0 <= value <= MAX_MARGIN:  # NaN and inf too
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_MARGIN:g} (a fraction of the lesion box's "
                                         f"longer side on each side), got {text}")
    return value


def _bool(text: str) -> bool:
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


# --- argument definitions, one function per command ---------------------------------------------

def _args_audit(p):
    p.add_argument("--train", required=True, help="Training folder (Kaggle layout: <class>/<image>)")
    p.add_argument("--test", required=True, help="Testing folder (Kaggle layout)")
    p.add_argument("--out", required=True, help="output folder: audit.json, duplicates.csv, clean_test.txt")
    p.add_argument("--max-distance", type=int, help="largest perceptual-hash Hamming distance for a candidate")
    p.add_argument("--min-corr", type=float, help="smallest pixel correlation that confirms a near-copy")


def _args_split(p):
    p.add_argument("--train", required=True, help="Training folder (Kaggle layout)")
    p.add_argument("--out", required=True, help="split CSV to write (path,label,split)")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--train-duplicates", help="train_duplicates.csv from `audit`: keeps near-copies on one side")


def _args_phantoms(p):
    p.add_argument("--out", required=True, help="folder for a Kaggle-layout phantom dataset with masks/")
    p.add_argument("--n-per-class", type=_positive_int, default=20)
    p.add_argument("--size", type=_positive_int, default=256)


def _args_read(p):
    p.add_argument("files", nargs="+", help="scan files (image, DICOM, NIfTI, figshare .mat)")
    p.add_argument("--nifti-slices", type=_nifti_slices, default="nonempty",
                   help="all | middle | nonempty (default) | 3,4,5: which slices of a volume to list, as predict reads them")
    add_dicom_window_argument(p)


def _args_crop(p):
    p.add_argument("--split", help="split CSV from `split` (writes train.npz and val.npz)")
    p.add_argument("--input", help="a Kaggle-layout folder to cache whole (writes <name>.npz), e.g. Testing")
    p.add_argument("--root", help="folder the split's paths are relative to (the Training folder)")
    p.add_argument("--masks", help="masks folder from `segment` (needed for crop and masked)")
    p.add_argument("--out", required=True, help="output folder for the caches")
    p.add_argument("--mode", choices=["full", "crop", "masked"])
    p.add_argument("--size", type=_positive_int)
    p.add_argument("--margin", type=_margin)
    p.add_argument("--workers", type=_positive_int)


def _args_train_cls(p):
    p.add_argument("--data", required=True, help="folder holding train.npz and val.npz from `crop`")
    p.add_argument("--out", required=True, help="run folder: best.pt, last.pt, curves.csv/png, summary.json")
    p.add_argument("--model", help="registry name, e.g. timm:tf_efficientnet_lite0, timm:resnet18, smallcnn")
    p.add_argument("--pretrained", type=_bool)
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--patience", type=_positive_int, help="epochs without a validation gain before stopping")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/last.pt when it is there (default); --no-resume starts over")
    p.add_argument("--drop", help="path list (e.g. training_sartaj.txt from `sources`) left out of train and "
                                  "validation: leave-one-source-out runs")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (default: torch's own)")
    p.add_argument("--ema", type=float, help="decay of a moving average of the weights, validated and saved "
                                             "instead of the raw weights (e.g. 0.995; 0: off)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=False,
                   help="once the recipe is chosen on validation: train on train + validation for all --epochs "
                        "and keep the last epoch (the val columns are then on seen slices)")
    p.add_argument("--flip-shear", action=argparse.BooleanOptionalAction, default=False,
                   help="a flipped slice is also sheared by its rotation (up to 1.30x / 0.84x), as the classifiers "
                        "before session 24 were trained; default: an exact mirror (Augment in classify/data.py)")
    p.add_argument("--mixup", type=float,
                   help="mixup: each batch blended with a shuffled copy, lam ~ Beta(MIXUP, MIXUP) (e.g. 0.2; 0: off)")
    p.add_argument("--stretch", type=float,
                   help="stretch every training slice along x by a and y by 1/a, log a ~ U(+-log(1 + STRETCH)) "
                        "(0.2: up to 1.2x / 0.83x; 0: off)")


# --- command bodies ------------------------------------------------------------------------------

@command("audit", "find exact and near-duplicate images within Training and across Training/Testing")
def cmd_audit(a):
    from pipeline import audit

    kwargs = {k: v for k, v in (("max_distance", a.max_distance), ("min_corr", a.min_corr)) if v is not None}
    result = audit.run_audit(a.train, a.test, a.out, **kwargs)
    print(json.dumps(result.get("totals", result), indent=2))


@command("split", "carve a stratified, deterministic validation split from Training")
def cmd_split(a):
    from pipeline.datasets import make_split

    counts = make_split(a.train, a.out, a.val_fraction, a.seed, a.train_duplicates)
    print(f"wrote {a.out}: {counts}")


@command("phantoms", "write a synthetic phantom dataset (Kaggle layout + masks) for demos and tests")
def cmd_phantoms(a):
    from pipeline.phantoms import write_phantom_dataset

    print(write_phantom_dataset(a.out, a.n_per_class, a.size, a.seed))


@command("read", "read scans and print their shape and metadata (a quick check of a file)")
def cmd_read(a):
    from pipeline.scans import ScanReadError, is_blank, read_scans

    status = 0
    for f in a.files:
        try:
            scans = read_scans(f, nifti_slices=getattr(a, "nifti_slices", None) or "nonempty",
                               dicom_window=getattr(a, "dicom_window", None) or "file")
            if not scans:  # what predict records as an error row
                print(f"error: {f}: no slice selected (volume is blank)", file=sys.stderr)
                status = 1
            for scan in scans:
                blank = {"blank": True} if is_blank(scan.image) else {}
                print(json.dumps({"key": scan.key, "shape": list(scan.image.shape), **blank,
                                  **{k: v for k, v in scan.meta.items() if isinstance(v, (str, int, float))}}))
        except ScanReadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status


@command("crop", "decode a split once into classifier inputs (full | crop | masked) cached as .npz")
def cmd_crop(a):
    from pipeline.classify.data import build_cache
    from pipeline.datasets import list_class_folder, read_split

    out = Path(a.out)
    if a.split and a.input and a.masks:  # one masks folder cannot hold the masks of both folders' scans
        raise ConfigError("crop --masks with both --split and --input: the masks of Training and of the --input "
                          "folder are different folders (segment's OUT/masks of each); run crop once for each")
    kw = dict(mode=a.mode, size=a.size, masks_dir=a.masks, workers=a.workers, margin=a.margin)
    if a.split:
        if not a.root:
            raise ConfigError("--split needs --root (the Training folder its paths are relative to)")
        parts = read_split(a.split, a.root)
        empty = [name for name, samples in parts.items() if not samples]
        if empty:
            raise ConfigError(f"{a.split}: no {' or '.join(empty)} rows (a split needs both parts; "
                              f"`python -m pipeline split` makes one)")
        for name, samples in parts.items():
            print(build_cache(samples, out / f"{name}.npz", image_root=a.root, **kw))
    if a.input:
        # the folder's own name, also when it is given as `.` or with a trailing slash
        print(build_cache(list_class_folder(a.input), out / f"{Path(a.input).resolve().name.lower()}.npz",
                          image_root=a.input, **kw))
    if not (a.split or a.input):
        raise ConfigError("crop needs --split (with --root) or --input")


@command("train-cls", "train a classifier on cached inputs; early stopping on the validation split")
def cmd_train_cls(a):
    from pipeline.classify.train import train

    data = Path(a.data)
    summary = train(str(data / "train.npz"), str(data / "val.npz"), a.out, model_name=a.model,
                    pretrained=a.pretrained, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
                    patience=a.patience, seed=a.seed, device=a.device, resume=a.resume,
                    drop=a.drop, threads=a.threads, ema=a.ema, refit=a.refit, mixup=a.mixup or 0.0,
                    augment={"flip_shear": a.flip_shear, "stretch": a.stretch})
    print(json.dumps({k: summary[k] for k in ("best_epoch", "best", "train_seconds", "best_sha256")}, indent=2))


def _args_predict(p):
    p.add_argument("--input", required=True, help="folder of scans (walked recursively; any format)")
    p.add_argument("--out", required=True, help="output folder: predictions.csv (+ overlays/, gradcam/ when asked)")
    p.add_argument("--mode", help="classifier input: full, crop, masked, or an ensemble's full+crop "
                                  "(default and only choice: the classifier's own)")
    p.add_argument("--cls", help="classifier: a manifest name from weights/manifest.json (an ensemble too), a .pt "
                                 "path, or A.pt,B.pt: the mean of several (default: cls-lite0-full+crop)")
    p.add_argument("--seg", help="segmenter: a manifest name, a .pt path, none, or auto (default): the one the "
                                 "classifier's crop member was trained on; for a whole-slice classifier, the "
                                 "shipped default segmenter (its lesion box is reported)")
    p.add_argument("--backend", choices=["auto", "torch", "onnx"],
                   help="auto (onnx on the CPU when onnxruntime is installed, else torch), torch, or onnx (ONNX "
                        "Runtime on the CPU; the networks are exported once and cached); default auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the classifier (torch backend; pays off on CUDA with large batches)")
    p.add_argument("--batch-size", type=_positive_int, help="scans per forward pass (default 32)")
    p.add_argument("--workers", type=_positive_int, help="reader threads (default 2)")
    p.add_argument("--overlays", action=argparse.BooleanOptionalAction, default=False,
                   help="write each scan with the mask outline and label")
    p.add_argument("--gradcam", action=argparse.BooleanOptionalAction, default=False,
                   help="write OUT/gradcam/<path>.png: the classifier input with the Grad-CAM map of its label")
    p.add_argument("--nifti-slices", type=_nifti_slices,
                   help="all | middle | nonempty (default) | 3,4,5: slices of a NIfTI volume or frames of a "
                        "multi-frame DICOM")
    add_dicom_window_argument(p)


def _args_train_seg(p):
    p.add_argument("--data", required=True, help="data.yaml of a YOLO-seg dataset (from `seg-data`)")
    p.add_argument("--out", required=True, help="run folder (ultralytics layout: weights/best.pt, results.csv)")
    p.add_argument("--imgsz", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--patience", type=int, help="epochs without a validation gain before stopping (0: never stop early, as in ultralytics)")
    p.add_argument("--time-hours", type=float, help="wall-time cap; ultralytics fits the schedule into it")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue from OUT/weights/last.pt")


def _args_seg_data(p):
    p.add_argument("--figshare", required=True, help="figshare-cheng2017 folder (images/, masks/, labels.csv)")
    p.add_argument("--brisc", help="brisc2025-seg folder (images/, masks/)")
    p.add_argument("--split", help="classifier split CSV: its notumor slices become background images")
    p.add_argument("--root", help="folder the split's paths are relative to (Training)")
    p.add_argument("--n-background", type=_non_negative_int)
    p.add_argument("--exclude-copies-of", help="Kaggle-layout folder (Testing) whose near-copies are left out, "
                                               "lesion slices and no-tumor backgrounds alike (not used by the "
                                               "shipped segmenters' builds: their Testing no-tumor scores say so)")
    p.add_argument("--out", required=True, help="YOLO dataset folder to write (data.yaml, images/, labels/)")


@command("seg-data", "convert masked slices to a YOLO-seg dataset (polygon labels, held-out test split)")
def cmd_seg_data(a):
    from pipeline.segment.yolo_data import build_yolo_dataset

    print(build_yolo_dataset(a.out, a.figshare, a.brisc, a.split, a.root, n_background=a.n_background,
                             seed=a.seed, exclude_copies_of=a.exclude_copies_of))


@command("train-seg", "train YOLOv8n-seg (from weights/yolov8n-seg.pt if present, else from the YAML)")
def cmd_train_seg(a):
    from pipeline.segment.yolo import train_yolo_seg

    print(train_yolo_seg(a.data, a.out, imgsz=a.imgsz, epochs=a.epochs, batch=a.batch, device=a.device,
                         seed=a.seed, patience=a.patience, time_hours=a.time_hours, resume=a.resume))


def auto_backend(device: str, compile: bool = False) -> str:
    """``onnx`` on the CPU when onnxruntime is installed (about twice as fast here, see bench/), else ``torch``."""
    import importlib.util

    if str(device) != "cpu" or compile or any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnx")):
        return "torch"
    return "onnx"


def load_segmenter(name: str | None, device: str, backend: str = "torch", backend_chosen: bool = True):
    """``none`` -> None; ``auto`` -> the shipped default segmenter, or None when there is none; else a name or path.

    ``backend_chosen`` False (``--backend auto``): a segmenter the backend cannot run (YOLO under ONNX
    Runtime) runs with torch instead of failing on a flag the user did not give."""
    from pipeline.segment.load import segmenter_arch
    from pipeline.segment.run import build_segmenter, default_segmenter_name
    from pipeline.weights import WeightsError

    if not name or name == "none":
        return None
    if name == "auto":
        try:
            name = default_segmenter_name()
        except WeightsError:
            print("note: no shipped segmenter; classifying without one (found/x0..y1 stay empty)", file=sys.stderr)
            return None
    if not backend_chosen and backend != "torch" and segmenter_arch(name) != "unet":
        backend = "torch"
    return build_segmenter(None, weights=name, device=device, backend=backend)


def _args_export(p):
    p.add_argument("--run", required=True, help="training output: ultralytics weights/best.pt (segmenter) or "
                                                "train-cls best.pt (classifier)")
    p.add_argument("--out", required=True, help="weights-only checkpoint to write (e.g. weights/my_model.pt)")
    p.add_argument("--kind", choices=["segmenter", "classifier"], required=True)
    p.add_argument("--conf", type=float, default=0.25, help="segmenter: detection threshold stored with it")
    p.add_argument("--fp32", action=argparse.BooleanOptionalAction, default=False,
                   help="keep float32 weights (default: float16 to halve the size)")


@command("export", "turn a training checkpoint into a small weights-only file for weights/ (prints its sha256)")
def cmd_export(a):
    from pipeline.weights import sha256_file

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    if a.kind == "segmenter":
        from pipeline.segment.load import export_yolo_seg

        export_yolo_seg(a.run, a.out, conf=a.conf, half=not a.fp32)
    else:
        from pipeline.classify.predict import export_checkpoint

        export_checkpoint(a.run, a.out, half=not a.fp32)
    print(json.dumps({"file": str(a.out), "sha256": sha256_file(a.out), "bytes": Path(a.out).stat().st_size}))


def _args_train_yolo_cls(p):
    p.add_argument("--data", required=True, help="folder with train.npz, val.npz, testing.npz from `crop`")
    p.add_argument("--out", required=True, help="run folder; also writes OUT/testing_predictions.csv for compare")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--time-hours", type=float, default=None, help="wall-time cap")


@command("train-yolo-cls", "the YOLOv8n-cls baseline on the same cached inputs, split and size as the CNNs")
def cmd_train_yolo_cls(a):
    import numpy as np

    from pipeline.classify.yolo_cls import check_all_classes, export_cache_as_folders, predict_yolo_cls, train_yolo_cls

    from pipeline.evaluate_cls import _describe, cache_view

    data, out = Path(a.data), Path(a.out)
    views = {}
    for part in ("train", "val", "testing"):
        if (data / f"{part}.npz").is_file() or part != "testing":
            with np.load(data / f"{part}.npz") as cache:  # reads only the small entries asked for
                views[part] = cache_view({k: cache[k] for k in ("mode", "size", "margin") if k in cache.files})
    other = {part: v for part, v in views.items() if v != views["train"]}
    if other:  # the baseline is scored as it was trained, like every CNN (evaluate-cls checks the same)
        raise ConfigError(f"{data}: " + "; ".join(f"{part}.npz is {_describe(*v)}" for part, v in other.items())
                          + f", but train.npz is {_describe(*views['train'])}; make all three with one `crop` setting")
    try:  # ultralytics numbers each split's folders on its own: a class missing in val shifts its labels
        check_all_classes(data / "train.npz")
        check_all_classes(data / "val.npz")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    folders = export_cache_as_folders({"train": data / "train.npz", "val": data / "val.npz"}, out / "images")
    size = int(views["train"][1])
    best = train_yolo_cls(folders, out / "run", imgsz=size, epochs=a.epochs, batch=a.batch, device=a.device,
                          seed=a.seed, time_hours=a.time_hours)
    if (data / "testing.npz").is_file():
        print(predict_yolo_cls(best, data / "testing.npz", out / "testing_predictions.csv", device=a.device))


def _args_sources(p):
    p.add_argument("--root", required=True, help="Kaggle-layout root holding Training/ and Testing/")
    p.add_argument("--figshare", required=True, help="figshare-cheng2017 folder (images/*.jpg)")
    p.add_argument("--out", required=True, help="output folder: sources.csv, sources.json, <split>_<source>.txt")
    p.add_argument("--workers", type=_positive_int, default=2, help="decoding threads")


@command("sources", "tag each Kaggle slice with its public source (figshare, sartaj, br35h)")
def cmd_sources(a):
    from pipeline.sources import tag_sources, write_sources

    print(json.dumps(write_sources(tag_sources(a.root, a.figshare, workers=a.workers), a.out), indent=2))


def _auto_segmenter(classifier, cls_name) -> str:
    """``--seg auto`` for a crop/masked classifier: the segmenter whose masks it was trained on. Another
    one draws other boxes and other found/not-found calls than the model learnt from."""
    if getattr(classifier, "segmenter", None):
        return classifier.segmenter
    sha = getattr(classifier, "segmenter_sha256", None)
    if sha:
        raise ConfigError(f"--seg auto: {cls_name} was trained on masks of a segmenter with sha256 {sha[:16]}..., "
                          f"which weights/manifest.json does not list; pass that checkpoint with --seg PATH")
    print(f"warning: {cls_name} does not record which segmenter its training masks came from (trained before "
          f"this was recorded); --seg auto uses the default segmenter, which may draw other boxes. Pass the "
          f"one it was trained on with --seg NAME_OR_PATH", file=sys.stderr)
    return "auto"


@command("predict", "run the whole chain on a folder of scans -> predictions.csv (resumable)")
def cmd_predict(a):
    from pipeline.batch import run_predict
    from pipeline.classify.predict import load_classifier

    backend = a.backend or "torch"
    if backend == "auto":
        backend = auto_backend(a.device, a.compile)
    if a.compile and backend != "torch":
        raise ConfigError("--compile applies to --backend torch only")
    classifier = load_classifier(a.cls, device=a.device, backend=backend, compile=a.compile)
    mode = a.mode or classifier.mode
    if mode != classifier.mode:
        raise ConfigError(f"--mode {mode}: the classifier {a.cls} was trained on {classifier.mode} inputs; "
                          f"pass a classifier trained on {mode} (--cls)")
    seg = a.seg
    reads_masks = any(v[0] != "full" for v in getattr(classifier, "views", [(mode,)]))  # second opinions too
    if seg == "auto" and reads_masks:
        seg = _auto_segmenter(classifier, a.cls)
    segmenter = load_segmenter(seg, a.device, backend, backend_chosen=(a.backend or "torch") != "auto")
    if reads_masks and segmenter is None:
        raise ConfigError(f"--mode {mode} (classifier {a.cls}) needs a segmenter: pass --seg auto or --seg NAME "
                          f"(see weights/manifest.json)")
    counts = run_predict(a.input, a.out, classifier, segmenter, mode=mode, batch_size=a.batch_size,
                         workers=a.workers, overlays=a.overlays, gradcam=a.gradcam, nifti_slices=a.nifti_slices,
                         dicom_window=a.dicom_window or "file",
                         margin=float(classifier.meta.get("margin", 0.25)))
    print(json.dumps(counts))


#: Commands whose arguments and body live in their stage's module (``add_arguments`` / ``run``).
MODULE_COMMANDS = {
    "segment": ("pipeline.segment.run", "segment every scan of a folder -> masks/ + segments.csv (resumable)"),
    "evaluate-seg": ("pipeline.evaluate_seg", "Dice, IoU, HD95, detection and false-mask rates of predicted masks"),
    "evaluate-cls": ("pipeline.evaluate_cls", "classify a cache with a checkpoint -> predictions.csv + metrics"),
    "compare": ("pipeline.report", "masked vs crop vs full report: metrics with CIs, all vs clean, McNemar"),
    "train-unet": ("pipeline.segment.unet", "train one stage of the U-Net cascade (coarse: whole slice; fine: crop)",
                   "add_train_arguments", "run_train"),
    "export-unet": ("pipeline.segment.unet", "pack the coarse and fine U-Nets into one weights-only checkpoint",
                    "add_export_arguments", "run_export"),
    "tune-seg": ("pipeline.segment.tune", "choose the segmenter's threshold on the validation split"),
    "diagnose-seg": ("pipeline.segment.diagnose", "where a U-Net cascade loses Dice: oracle box, coarse box errors"),
    "weights": ("pipeline.weights_cli", "list, verify and download the checkpoints in weights/manifest.json"),
    "index": ("pipeline.classify.search", "embed labelled scans with a classifier for similar-case search",
              "add_index_arguments", "run_index"),
    "similar": ("pipeline.classify.search", "the nearest indexed scans to a query scan",
                "add_similar_arguments", "run_similar"),
}

ARGS = {"audit": _args_audit, "split": _args_split, "phantoms": _args_phantoms, "read": _args_read,
        "crop": _args_crop, "train-cls": _args_train_cls,
        "predict": _args_predict, "export": _args_export,
        "train-yolo-cls": _args_train_yolo_cls, "seg-data": _args_seg_data, "train-seg": _args_train_seg,
        "sources": _args_sources}


class _AppendOverConfig(argparse._AppendAction):
    """A repeatable flag whose first use on the command line replaces a config file's list rather than
    adding to it: flags win, for lists as for single values."""

    def __call__(self, parser, namespace, values, option_string=None):
        if self.default and getattr(namespace, self.dest, None) is self.default:  # still the config's list
            setattr(namespace, self.dest, None)
        super().__call__(parser, namespace, values, option_string)


def build_parser(config: dict) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    common = config.get("common", {})
    import importlib

    entries = [(name, help_text, ARGS[name]) for name, (help_text, _) in COMMANDS.items()]
    entries += [(name, spec[1], lambda p, spec=spec: getattr(importlib.import_module(spec[0]),
                                                           spec[2] if len(spec) > 2 else "add_arguments")(p))
                for name, spec in MODULE_COMMANDS.items()]
    for name, help_text, add_args in entries:
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        p.register("action", "append", _AppendOverConfig)
        p.add_argument("--config", help="YAML file layered over configs/default.yaml")
        p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: %(default)s)")
        p.add_argument("--seed", type=int, help="random seed (default: %(default)s)")
        add_args(p)
        section = {str(k).replace("-", "_"): v for k, v in config.get(name, {}).items()}
        actions = {action.dest: action for action in p._actions if action.dest not in ("help", "config")}
        unknown = sorted(set(section) - set(actions))
        if unknown:
            raise ConfigError(f"config section {name!r}: unknown key(s) {', '.join(unknown)} (known: "
                              f"{', '.join(sorted(actions))})")
        p.set_defaults(**{k: _config_value("common", actions[k], v) for k, v in common.items() if k in actions})
        p.set_defaults(**{k: _config_value(name, actions[k], v) for k, v in section.items()})
        for k, v in section.items():  # a required flag the config file gives is no longer asked for
            if v is not None and actions[k].required:
                actions[k].required = False
    unknown_common = sorted(set(map(str, common)) - {"device", "seed"})
    if unknown_common:
        raise ConfigError(f"config section 'common': unknown key(s) {', '.join(unknown_common)} (known: device, seed)")
    unknown = sorted(set(config) - {"common"} - set(sub.choices))
    if unknown:
        raise ConfigError(f"config section(s) {', '.join(map(repr, unknown))}: no such command "
                          f"(sections are named after commands: {', '.join(sorted(sub.choices))}, or common)")
    return parser


def _config_value(command: str, action: argparse.Action, value):
    """A value from a config file, checked and converted as the flag's own text would be: argparse
    applies ``type`` and ``choices`` to what is typed, not to defaults."""
    if value is None:
        return value
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):  # an on/off switch
        try:
            return value if isinstance(value, bool) else _bool(str(value))
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"config section {command!r}: {action.dest} = {value!r}: {exc}") from None
    if isinstance(action, argparse._AppendAction):  # a repeatable flag, given once or as a list
        return [_config_value(command, _single(action), v)
                for v in (value if isinstance(value, (list, tuple)) else [value])]

    def one(v):
        if isinstance(v, bool):
            v = str(v).lower()  # YAML's true/false, read as the text a flag would get
        try:
            # text, as a typed flag would be: a YAML number or yes/no is not a name or a device
            out = str(v) if action.type is None else action.type(str(v))
        except (argparse.ArgumentTypeError, TypeError, ValueError) as exc:
            raise ConfigError(f"config section {command!r}: {action.dest} = {v!r}: {exc}") from None
        if action.choices is not None and out not in action.choices:
            raise ConfigError(f"config section {command!r}: {action.dest} = {v!r}: expected one of "
                              f"{', '.join(map(str, action.choices))}")
        return out

    many = action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1)
    if many:
        return [one(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if isinstance(value, (list, tuple)):  # a YAML list for a flag that takes one comma list
        value = ",".join(map(str, value))
    return one(value)


def _single(action: argparse.Action) -> argparse.Action:
    """One occurrence of a repeatable flag, for checking its values one by one."""
    return argparse.Action(action.option_strings, action.dest, type=action.type, choices=action.choices)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    try:
        config = load_config(known.config)
        parser = build_parser(config)
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help(sys.stderr)
            return 2  # as argparse does for a missing argument
        args.device = resolve_device(args.device or "auto")
        seed_everything(args.seed if args.seed is not None else 0)
        if args.command in MODULE_COMMANDS:
            import importlib

            spec = MODULE_COMMANDS[args.command]
            return getattr(importlib.import_module(spec[0]), spec[3] if len(spec) > 3 else "run")(args) or 0
        return COMMANDS[args.command][1](args) or 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
