"""ONNX Runtime backends agree with the PyTorch reference: same labels, probabilities within 1e-4."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from pipeline.backends import OnnxModule, as_backend, cache_dir  # noqa: E402
from pipeline.phantoms import make_phantom  # noqa: E402
from pipeline.roi import make_input  # noqa: E402

PROB_TOL = 1e-4


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAIN_MRI_CACHE", str(tmp_path / "cache"))


def test_onnx_module_matches_torch_and_is_cached(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.InstanceNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    x = torch.randn(5, 1, 24, 24)
    fast = as_backend(net, torch.zeros(1, 1, 24, 24), "onnx", key="tiny")
    assert isinstance(fast, OnnxModule)
    np.testing.assert_allclose(fast(x).numpy(), net(x).detach().numpy(), atol=1e-5)
    assert [p.name for p in cache_dir().iterdir()] == ["tiny-1x24x24.onnx"]
    assert fast(x[:1]).shape == (1, 3)  # dynamic batch
    assert as_backend(net, x, "torch") is net
    with pytest.raises(ValueError, match="backend must be one of"):
        as_backend(net, x, "tensorrt")


def test_shipped_classifier_onnx_agrees_with_torch():
    from pipeline.classify.predict import Classifier

    ref = Classifier("cls-lite0-full")
    fast = Classifier("cls-lite0-full", backend="onnx")
    inputs = np.stack([make_input(make_phantom(c, 160, seed)[0], ref.mode, ref.size)[0]
                       for c in ("glioma", "meningioma", "notumor", "pituitary") for seed in (0, 1)])
    p_ref, p_fast = ref.predict_proba(inputs), fast.predict_proba(inputs)
    assert (p_ref.argmax(1) == p_fast.argmax(1)).all()
    assert np.abs(p_ref - p_fast).max() < PROB_TOL


@pytest.mark.parametrize("coarse_net", [None, {"arch": "lite0-unet", "decoder": [16, 8]}])
def test_unet_cascade_onnx_agrees_with_torch(tmp_path, coarse_net):
    from pipeline.segment.load import load_segmenter
    from pipeline.segment.unet import build_net, build_unet

    torch.manual_seed(0)
    net = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}
    meta = {"task": "segment", "arch": "monai-unet-cascade", "net": net, "size": 64, "fine_size": 48,
            "margin": 0.25, "threshold": 0.5, "min_area": 1}
    if coarse_net:
        meta["coarse_net"] = coarse_net
    coarse = build_net(coarse_net or net).eval()
    dest = tmp_path / "c.pt"
    torch.save({"coarse": coarse.state_dict(), "fine": build_unet(**net).state_dict(), "meta": meta}, dest)
    images = [make_phantom(c, 128, 3)[0] for c in ("glioma", "pituitary", "notumor")]
    ref = load_segmenter(dest).predict(images)
    fast = load_segmenter(dest, backend="onnx").predict(images)
    for a, b in zip(ref, fast):
        assert a.mask.shape == b.mask.shape
        assert (a.mask == b.mask).mean() > 0.999  # a pixel sitting exactly on the threshold may flip
    with pytest.raises(Exception, match="runs on the CPU"):
        load_segmenter(dest, device="cuda", backend="onnx")


def test_onnx_backend_without_onnxruntime_is_an_error_line_not_a_traceback(monkeypatch):
    import sys

    from pipeline.backends import OnnxModule

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(RuntimeError, match="pip install onnxruntime"):
        OnnxModule(b"")  # main() prints a RuntimeError as one `error:` line


def test_a_damaged_cached_onnx_file_is_exported_again(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten()).eval()
    x = torch.randn(2, 1, 8, 8)
    as_backend(net, torch.zeros(1, 1, 8, 8), "onnx", key="cut")
    cached = cache_dir() / "cut-1x8x8.onnx"
    cached.write_bytes(cached.read_bytes()[:40])  # a copy cut short, as by a full disk or a kill
    fast = as_backend(net, torch.zeros(1, 1, 8, 8), "onnx", key="cut")
    np.testing.assert_allclose(fast(x).numpy(), net(x).detach().numpy(), atol=1e-5)


def test_an_onnx_ensemble_leaves_torchs_thread_count_alone(tmp_path):
    import json

    from pipeline.classify.predict import load_classifier

    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        from pipeline.classify.models import create_model

        path = tmp_path / f"m{seed}.pt"
        torch.save({"state_dict": create_model("smallcnn").state_dict(),
                    "meta": {"model": "smallcnn", "mode": "full", "size": 32,
                             "classes": ["glioma", "meningioma", "notumor", "pituitary"]}}, path)
        members.append(str(path))
    (tmp_path / "pair.json").write_text(json.dumps({"members": members}))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pair = load_classifier(str(tmp_path / "pair.json"), backend="onnx", threads=2)
        assert torch.get_num_threads() == 2  # the segmenter and Grad-CAM, loaded later, keep both cores
        assert [m.model.session.get_session_options().intra_op_num_threads for m in pair.members] == [1, 1]
    finally:
        torch.set_num_threads(before)
