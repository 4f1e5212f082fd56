import numpy as np
import pytest

from pipeline.phantoms import make_phantom
from pipeline.preprocess import crop_to_head, head_box, square_crop
from pipeline.roi import make_input, mask_roi


def test_head_box_finds_the_head_inside_margins():
    image, _ = make_phantom("notumor", 128, 0)
    framed = np.zeros((300, 400), np.uint8)
    framed[100:228, 50:178] = image
    ys, xs = np.nonzero(framed)
    x0, y0, x1, y1 = head_box(framed)
    assert 0 <= xs.min() - x0 <= 4 and 0 <= x1 - xs.max() - 1 <= 4
    assert 0 <= ys.min() - y0 <= 4 and 0 <= y1 - ys.max() - 1 <= 4


def test_crop_to_head_removes_framing():
    # The same head with and without a wide black margin gives nearly the same crop.
    image, _ = make_phantom("glioma", 128, 1)
    framed = np.pad(image, 60)
    a, _ = crop_to_head(image, 96)
    b, _ = crop_to_head(framed, 96)
    assert a.shape == b.shape == (96, 96)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 3


def test_square_crop_pads_outside_the_image():
    image = np.full((10, 10), 7, np.uint8)
    out = square_crop(image, (6, 6, 10, 10), margin=0.5)
    assert out.shape == (8, 8)
    assert out[0, 0] == 7 and out[-1, -1] == 0


def test_mask_roi_box_is_exclusive():
    mask = np.zeros((20, 30), np.uint8)
    mask[5:9, 10:20] = 255
    roi = mask_roi(mask)
    assert roi.found and roi.box == (10, 5, 20, 9) and roi.area_px == 40


@pytest.fixture
def glioma():
    return make_phantom("glioma", 128, 2)


def test_full_mode_ignores_the_mask(glioma):
    image, mask = glioma
    a, roi = make_input(image, "full", 64, mask)
    b, _ = make_input(image, "full", 64, None)
    assert np.array_equal(a, b) and roi.found


def test_crop_mode_zooms_on_the_tumor(glioma):
    image, mask = glioma
    x, roi = make_input(image, "crop", 64, mask, margin=0.25)
    assert x.shape == (64, 64) and roi.found
    # With a 25% margin the tumor fills roughly the middle half of the crop.
    full, _ = make_input(image, "full", 64, None)
    assert x.std() > 0 and not np.array_equal(x, full)
    centre = x[24:40, 24:40]
    assert centre.mean() > 0


def test_masked_mode_zeroes_outside_the_dilated_mask(glioma):
    image, mask = glioma
    x, _ = make_input(image, "masked", 64, mask, margin=0.5, dilate_px=2)
    crop, _ = make_input(image, "crop", 64, mask, margin=0.5)
    assert (x == 0).mean() > (crop == 0).mean() + 0.2
    assert x[32, 32] > 0  # the tumor itself is kept


@pytest.mark.parametrize("mode", ["crop", "masked"])
def test_no_tumor_falls_back_to_full(mode):
    image, mask = make_phantom("notumor", 128, 3)
    x, roi = make_input(image, mode, 64, mask)
    full, _ = make_input(image, "full", 64, None)
    assert not roi.found and roi.box is None
    assert np.array_equal(x, full)


def test_bad_mode_and_mismatched_mask():
    image, mask = make_phantom("glioma", 64, 0)
    with pytest.raises(ValueError, match="mode"):
        make_input(image, "zoom", 32, mask)
    with pytest.raises(ValueError, match="mask shape"):
        make_input(image, "crop", 32, mask[:10])


@pytest.mark.parametrize("margin", [-0.5, float("nan"), float("inf"), 1e7])
def test_a_margin_out_of_range_is_refused_by_name_not_by_opencv_or_memory(margin, tmp_path, capsys):
    from pipeline.cli import main

    image = np.zeros((64, 64), np.uint8)
    with pytest.raises(ValueError, match="margin"):
        square_crop(image, (10, 10, 30, 30), margin)
    with pytest.raises(SystemExit):
        main(["crop", "--input", str(tmp_path), "--out", str(tmp_path / "o"), "--mode", "crop",
              "--masks", str(tmp_path), "--margin", str(margin)])
    assert "--margin" in capsys.readouterr().err
