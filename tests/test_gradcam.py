import numpy as np
import pytest
import torch
from torch import nn

from pipeline.classify.gradcam import find_target_layer, grad_cam, gradcam_panel, pick_examples
from pipeline.classify.models import SmallCNN


class BlobNet(nn.Module):
    """Hand-set toy: class 0 = evidence of a bright blob, class 1 = of a dark blob (on a zero background).

    conv1 (fixed 3x3 box filters: +, -) -> ReLU -> max-pool /2 -> conv2 (1x1 identity, the hooked
    layer, at half resolution) -> ReLU -> global mean -> linear (class 0 reads channel 0, class 1
    channel 1). A class's score depends only on the region holding its blob.
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2, 2, 1, bias=False)
        self.fc = nn.Linear(2, 4, bias=False)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.stack([torch.ones(1, 3, 3), -torch.ones(1, 3, 3)]) / 9)
            self.conv2.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.fc.weight.zero_()
            self.fc.weight[0, 0] = 10
            self.fc.weight[1, 1] = 10

    def forward(self, x):
        h = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        return self.fc(torch.relu(self.conv2(h)).mean((2, 3)))


def _image(bright, dark, size=48, r=4):
    x = torch.zeros(1, 1, size, size)
    (by, bx), (dy, dx) = bright, dark
    x[..., by - r:by + r, bx - r:bx + r] = 1.0
    x[..., dy - r:dy + r, dx - r:dx + r] = -1.0
    return x


def test_heatmap_has_input_shape_and_range():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(1, 1, 64, 48)
    cam = grad_cam(model, x)
    assert cam.shape == (64, 48) and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() <= 1 and cam.max() == pytest.approx(1.0)
    assert not model.training
    assert grad_cam(model, x, target_class=3).shape == (64, 48)


@pytest.mark.parametrize("bright,dark", [((10, 10), (36, 38)), ((38, 12), (12, 36)), ((24, 30), (30, 8))])
def test_heat_peaks_on_the_region_of_the_target_class(bright, dark):
    model = BlobNet()
    x = _image(bright, dark)
    assert int(model(x).argmax()) in (0, 1)
    for cls, (cy, cx) in ((0, bright), (1, dark)):
        cam = grad_cam(model, x, target_class=cls, layer=model.conv2)
        py, px = np.unravel_index(cam.argmax(), cam.shape)
        assert abs(py - cy) <= 4 and abs(px - cx) <= 4, (cls, (py, px), (cy, cx))
        oy, ox = dark if cls == 0 else bright
        assert cam[oy - 2:oy + 2, ox - 2:ox + 2].max() < 0.1  # the other class's blob stays cold


def test_auto_layer_choice():
    model = SmallCNN()
    assert find_target_layer(model) is [m for m in model.features if isinstance(m, nn.Conv2d)][-1]
    assert find_target_layer(BlobNet()) is not None and isinstance(find_target_layer(BlobNet()), nn.Conv2d)

    class WithHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_stem, self.conv_head, self.extra = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)

    m = WithHead()
    assert find_target_layer(m) is m.conv_head


@pytest.mark.parametrize("name, layer", [("monai:densenet121", "class_layers.relu"), ("monai:resnet18", "layer4"),
                                         ("monai:efficientnet-b0", "_conv_head"), ("timm:resnet18", "layer4")])
def test_the_hooked_layer_is_what_the_head_reads(name, layer):
    from pipeline.classify.models import create_model

    torch.manual_seed(0)
    model = create_model(name, pretrained=False).eval()
    assert find_target_layer(model) is model.get_submodule(layer)
    if name == "monai:densenet121":  # the last conv of its dense block gave an all-zero map here
        cam = grad_cam(model, torch.randn(1, 1, 96, 96))
        assert cam.shape == (96, 96) and cam.max() > 0
    with pytest.raises(ValueError):
        find_target_layer(nn.Linear(2, 2))


def test_pick_examples_mixes_right_and_wrong():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    preds = np.array([0, 1, 2, 3, 0, 1, 2, 3, 1, 0])  # two wrong
    idx = pick_examples(labels, preds, n=8)
    assert len(idx) == 8 and len(set(idx)) == 8 and set(idx) >= {8, 9}
    assert pick_examples(labels, labels, n=4) and all(labels[i] == labels[i] for i in pick_examples(labels, labels, 4))


def test_gradcam_panel_writes_png(tmp_path):
    class Wrapped:
        model = SmallCNN().eval()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 32, 32), dtype=np.uint8)
    labels, preds = np.array([0, 1, 2, 3, 0, 1]), np.array([0, 1, 2, 0, 1, 1])
    shown = gradcam_panel(Wrapped(), images, labels, preds, tmp_path / "g.png", n=4)
    assert (tmp_path / "g.png").stat().st_size > 1000 and len(shown) == 4
    assert sum(labels[i] != preds[i] for i in shown) == 2
