"""The CUDA paths: each runs on the GPU and is checked against the same work on the CPU.

Skipped where torch sees no CUDA device (CI, most laptops). On a GPU machine:
``python -m pytest tests/test_cuda.py``. AMP (float16 autocast) is on for inference and training
on CUDA, so outputs are compared with tolerances rather than bit for bit.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import CLASSES
from pipeline.phantoms import make_phantom, write_phantom_dataset
from tests.fakes import phantom_cls_caches

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SHARED = Path(os.environ.get("BRAIN_MRI_SHARED", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total


def sample_slices(n_per_class: int = 12) -> list[np.ndarray]:
    """Real Testing slices when the shared data is there, else phantoms: (H, W) uint8 of mixed sizes."""
    from pipeline.scans import read_scan

    testing = SHARED / "brain-tumor-mri" / "Testing"
    if testing.is_dir():
        files = [f for c in CLASSES for f in sorted((testing / c).iterdir())[:n_per_class]]
        return [read_scan(f).image for f in files]
    rng = np.random.default_rng(0)
    return [make_phantom(c, int(rng.choice([160, 256, 300])), rng)[0] for c in CLASSES for _ in range(n_per_class)]


def test_auto_device_is_cuda_and_a_missing_index_is_refused():
    from pipeline.config import ConfigError, environment, resolve_device

    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:0") == "cuda:0"
    with pytest.raises(ConfigError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")
    assert environment()["cuda"] == torch.cuda.get_device_name(0)


@pytest.fixture(scope="module")
def tiny_cls_caches(tmp_path_factory):
    return phantom_cls_caches(tmp_path_factory.mktemp("cls_cache"), {"train": 24, "val": 8}, 48)


class _Stopped(Exception):
    pass


def test_train_cls_with_amp_on_cuda_resumes_and_gives_a_checkpoint_the_cpu_reads_alike(tiny_cls_caches, tmp_path,
                                                                                        monkeypatch):
    import pipeline.classify.train as train_mod
    from pipeline.classify.predict import Classifier

    run = tmp_path / "run"
    where = (str(tiny_cls_caches / "train.npz"), str(tiny_cls_caches / "val.npz"), str(run))
    kw = dict(model_name="smallcnn", pretrained=False, epochs=3, batch_size=16, lr=3e-3, device="cuda",
              patience=10, ema=0.9)
    real_curves = train_mod.write_curves

    def curves_then_stop(history, out_dir):  # stopped right after epoch 0's last.pt is written
        real_curves(history, out_dir)
        raise _Stopped

    monkeypatch.setattr(train_mod, "write_curves", curves_then_stop)
    torch.cuda.reset_peak_memory_stats()
    with pytest.raises(_Stopped):
        train_mod.train(*where, **kw)
    assert torch.cuda.max_memory_allocated() > 0
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and last["cuda_rng"] is not None and last["scaler"]["scale"] > 0
    monkeypatch.setattr(train_mod, "write_curves", real_curves)
    summary = train_mod.train(*where, **kw)  # resumes at epoch 1, optimizer, EMA and scaler state on the GPU

    curves = np.genfromtxt(run / "curves.csv", delimiter=",", names=True)
    assert curves["epoch"].tolist() == [0, 1, 2] and np.isfinite(curves["train_loss"]).all()
    assert curves["train_loss"][-1] < curves["train_loss"][0]
    assert summary["environment"]["cuda"] == torch.cuda.get_device_name(0)
    saved = torch.load(run / "best.pt", weights_only=True)  # tensors come back on the device they were saved from
    assert all(v.device.type == "cuda" for v in saved["state_dict"].values())

    images = np.load(tiny_cls_caches / "val.npz")["images"]
    on_gpu = Classifier(run / "best.pt", device="cuda").predict_proba(images)
    on_cpu = Classifier(run / "best.pt", device="cpu").predict_proba(images)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-2)
    assert (on_gpu.argmax(1) == on_cpu.argmax(1)).mean() >= 0.95


@pytest.fixture(scope="module")
def slices():
    return sample_slices()


@pytest.fixture(scope="module")
def shipped_masks(slices):
    """The default segmenter's masks on the CPU and on CUDA (same images, same order)."""
    from pipeline.segment.run import build_segmenter

    out = {}
    for device in ("cpu", "cuda"):
        seg = build_segmenter(device=device)
        out[device] = [r.mask for r in seg.predict(slices)]
    return out


def test_shipped_segmenter_on_cuda_matches_the_cpu(shipped_masks):
    cpu, gpu = shipped_masks["cpu"], shipped_masks["cuda"]
    assert [m.shape for m in gpu] == [m.shape for m in cpu]
    found_cpu, found_gpu = np.array([m.any() for m in cpu]), np.array([m.any() for m in gpu])
    assert (found_cpu != found_gpu).sum() <= 1, "float16 may flip at most a borderline slice"
    both = [dice(a, b) for a, b in zip(cpu, gpu) if a.any() and b.any()]
    assert both and np.mean(both) >= 0.98, f"mean Dice CPU vs CUDA {np.mean(both):.4f}"


def test_shipped_classifier_on_cuda_matches_the_cpu(slices, shipped_masks):
    from pipeline.classify.predict import load_classifier
    from pipeline.config import load_config
    from pipeline.roi import make_views

    name = load_config()["predict"]["cls"]
    cpu = load_classifier(name, device="cpu")
    gpu = load_classifier(name, device="cuda")
    views = make_views(slices, shipped_masks["cpu"], cpu.views)
    p_cpu, p_gpu = cpu.predict_views(views), gpu.predict_views(views)
    assert p_gpu.shape == (len(slices), len(CLASSES))
    np.testing.assert_allclose(p_gpu.sum(1), 1, atol=1e-3)
    np.testing.assert_allclose(p_gpu, p_cpu, atol=2e-2)
    assert (p_gpu.argmax(1) == p_cpu.argmax(1)).all()


def test_gradcam_on_cuda_matches_the_cpu():
    from pipeline.classify.gradcam import grad_cam, normalise
    from pipeline.classify.models import create_model

    torch.manual_seed(0)
    model = create_model("smallcnn").eval()
    image = make_phantom("glioma", 64, np.random.default_rng(1))[0][None]
    on_cpu = grad_cam(model, normalise(image, "cpu"))
    on_gpu = grad_cam(model.cuda(), normalise(image, "cuda"))
    assert on_gpu.shape == (64, 64) and on_gpu.dtype == np.float32
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3)


def test_unet_stage_trains_on_cuda_and_its_cascade_segments_there(tmp_path):
    from pipeline.segment import unet
    from pipeline.segment.load import load_segmenter
    from tests.test_unet import TINY, synthetic_cache

    cache = synthetic_cache(tmp_path / "cache.npz")
    runs = {}
    for stage in ("coarse", "fine"):
        torch.cuda.reset_peak_memory_stats()
        summary = unet.train_stage(cache, tmp_path / stage, stage=stage, size=32, epochs=2, batch_size=8,
                                   net=TINY, device="cuda")
        assert torch.cuda.max_memory_allocated() > 0
        assert all(np.isfinite(h["train_loss"]) for h in summary["history"])
        runs[stage] = tmp_path / stage / "best.pt"
    dest = tmp_path / "cascade.pt"
    unet.export_cascade(runs["coarse"], runs["fine"], dest, threshold=0.4, min_area=2)
    images = [np.zeros((70, 90), np.uint8), np.full((50, 50), 30, np.uint8)]
    images[0][20:40, 30:50] = 200
    gpu = load_segmenter(dest, device="cuda").predict(images)
    cpu = load_segmenter(dest, device="cpu").predict(images)
    assert [r.mask.shape for r in gpu] == [(70, 90), (50, 50)]
    for a, b in zip(gpu, cpu):
        assert dice(a.mask, b.mask) >= 0.95


def test_sam_refiner_on_cuda_matches_the_cpu():
    from pipeline.segment.sam import SamRefiner
    from tests.test_sam import tiny_sam

    image = np.random.default_rng(0).integers(0, 256, (100, 150), dtype=np.uint8)
    boxes = np.array([[10, 20, 60, 80], [90, 5, 140, 50]], np.float32)
    on_cpu = SamRefiner(tiny_sam()).refine(image, boxes)
    refiner = SamRefiner(tiny_sam().cuda())
    assert refiner.predictor.device.type == "cuda"
    on_gpu = refiner.refine(image, boxes)
    assert on_gpu.shape == (100, 150) and on_gpu.dtype == np.uint8
    assert dice(on_gpu, on_cpu) >= 0.98


def test_yolo_seg_trains_with_amp_on_cuda_offline_and_segments_there(tmp_path):
    from pipeline.datasets import make_split
    from pipeline.segment.load import export_yolo_seg, load_segmenter
    from pipeline.segment.yolo import train_yolo_seg
    from pipeline.segment.yolo_data import build_yolo_dataset

    root = write_phantom_dataset(tmp_path / "ph", n_per_class=8, size=96, seed=1)
    make_split(root / "Training", tmp_path / "split.csv", 0.25, seed=0)
    data_yaml = build_yolo_dataset(tmp_path / "yolo", root / "seg", cls_split=tmp_path / "split.csv",
                                   cls_root=root / "Training", n_background=4, val_fraction=0.2, test_fraction=0.2)
    best = train_yolo_seg(data_yaml, tmp_path / "run", imgsz=64, epochs=1, batch=8, device="cuda:0",
                          workers=0, model="yolov8n-seg.yaml")
    assert best.is_file()
    export_yolo_seg(best, tmp_path / "seg.pt", conf=0.01)
    seg = load_segmenter(tmp_path / "seg.pt", device="cuda")
    images = [make_phantom("glioma", 96, np.random.default_rng(2))[0], np.zeros((80, 120), np.uint8)]
    results = seg.predict(images)
    assert [r.mask.shape for r in results] == [(96, 96), (80, 120)]
    assert all(set(np.unique(r.mask)) <= {0, 255} for r in results)


def test_yolo_cls_trains_with_amp_on_cuda_offline(tiny_cls_caches, tmp_path):
    from pipeline.classify.yolo_cls import export_cache_as_folders, train_yolo_cls

    folders = export_cache_as_folders({"train": tiny_cls_caches / "train.npz", "val": tiny_cls_caches / "val.npz"},
                                      tmp_path / "images")
    best = train_yolo_cls(folders, tmp_path / "run", imgsz=32, epochs=1, batch=8, workers=0, device="cuda:0")
    assert best.is_file()
