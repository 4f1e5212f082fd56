import numpy as np
import yaml

from pipeline.phantoms import make_phantom, write_phantom_dataset
from pipeline.segment.yolo_data import build_yolo_dataset, mask_to_polygons, polygons_to_label, polygons_to_mask


def iou(a, b):
    a, b = a > 0, b > 0
    return (a & b).sum() / max(1, (a | b).sum())


def test_mask_polygons_roundtrip_on_phantom_lesions():
    for label in ("glioma", "meningioma", "pituitary"):
        _, mask = make_phantom(label, 256, 4)
        polys = mask_to_polygons(mask)
        assert polys and all(p.shape[1] == 2 and (p >= 0).all() and (p <= 1).all() for p in polys)
        assert iou(polygons_to_mask(polys, mask.shape), mask) > 0.85


def test_label_text_is_yolo_segment_format():
    mask = np.zeros((100, 200), np.uint8)
    mask[20:60, 50:150] = 255
    text = polygons_to_label(mask_to_polygons(mask))
    fields = text.split()
    assert text.count("\n") == 1 and fields[0] == "0" and len(fields[1:]) % 2 == 0 and len(fields) >= 7
    xs, ys = np.array(fields[1::2], float), np.array(fields[2::2], float)
    assert abs(xs.min() - 0.25) < 0.01 and abs(xs.max() - 0.745) < 0.01
    assert abs(ys.min() - 0.2) < 0.01 and abs(ys.max() - 0.59) < 0.01


def test_empty_gives_no_polygon_and_specks_beside_a_lesion_are_dropped():
    mask = np.zeros((64, 64), np.uint8)
    assert mask_to_polygons(mask) == [] and polygons_to_label([]) == ""
    mask[30:50, 30:50] = 255
    mask[10:12, 10:12] = 255  # 4 px: below min_area, a labelling speck beside the lesion
    assert len(mask_to_polygons(mask)) == 1


def test_a_slice_whose_only_lesion_is_tiny_keeps_it():
    # a slice with a lesion must never become a background image, however small the lesion
    for h, w in ((1, 1), (1, 2), (2, 2), (3, 3)):
        mask = np.zeros((512, 512), np.uint8)
        mask[100:100 + h, 200:200 + w] = 255
        mask[300, 300] = 255  # and a one-pixel speck elsewhere: the larger one is kept (ties: either)
        polygons = mask_to_polygons(mask)
        assert len(polygons) == 1 and len(polygons[0]) >= 3, (h, w)
        assert polygons_to_mask(polygons, mask.shape)[100:100 + h, 200:200 + w].all() or (h, w) == (1, 1)


def test_two_regions_give_two_lines():
    mask = np.zeros((64, 64), np.uint8)
    mask[5:20, 5:20] = 255
    mask[40:60, 40:60] = 255
    assert polygons_to_label(mask_to_polygons(mask)).count("\n") == 2


def test_dataset_folder_from_phantoms(tmp_path):
    from pipeline.datasets import make_split

    root = write_phantom_dataset(tmp_path / "ph", n_per_class=12, size=96, seed=1)
    make_split(root / "Training", tmp_path / "split.csv", 0.25, seed=0)
    data_yaml = build_yolo_dataset(tmp_path / "yolo", root / "seg", cls_split=tmp_path / "split.csv",
                                   cls_root=root / "Training", n_background=4, val_fraction=0.2, test_fraction=0.2)
    cfg = yaml.safe_load(data_yaml.read_text())
    assert cfg["names"] == {0: "tumor"}
    for part in ("train", "val", "test"):
        images = sorted((tmp_path / "yolo" / "images" / part).iterdir())
        labels = {p.stem for p in (tmp_path / "yolo" / "labels" / part).iterdir()}
        assert images and {p.stem for p in images} == labels
    backgrounds = list((tmp_path / "yolo" / "labels" / "train").glob("background_*.txt"))
    assert backgrounds and all(p.read_text() == "" for p in backgrounds)


def test_a_label_mask_is_refused_not_read_as_no_lesion(tmp_path):
    import cv2
    import pytest

    root = write_phantom_dataset(tmp_path / "ph", n_per_class=2, size=64, seed=1)
    masks = sorted((root / "seg" / "masks").iterdir())
    lesion = next(m for m in masks if cv2.imread(str(m), cv2.IMREAD_GRAYSCALE).any())
    cv2.imwrite(str(lesion), (cv2.imread(str(lesion), cv2.IMREAD_GRAYSCALE) > 127).astype(np.uint8))  # 0/1
    with pytest.raises(ValueError, match=rf"{lesion.name}: a mask with values \(up to 1\) but none above 127"):
        build_yolo_dataset(tmp_path / "yolo", root / "seg", val_fraction=0.2, test_fraction=0.2)


def test_small_and_thin_lesions_still_get_a_polygon():
    """A slice with a lesion must not become a YOLO background image: contour area (through the boundary
    pixels' centres) and simplification at 512 px once dropped 4x4, 5x5 and 3x20 pixel lesions."""
    for h, w in ((4, 4), (5, 5), (3, 20), (1, 30)):
        mask = np.zeros((512, 512), np.uint8)
        mask[200:200 + h, 100:100 + w] = 255
        polygons = mask_to_polygons(mask)
        assert len(polygons) == 1 and len(polygons[0]) >= 3, (h, w)
        assert polygons_to_mask(polygons, mask.shape)[200:200 + h, 100:100 + w].any()


def test_a_rerun_after_yolo_trained_and_a_bad_mask_on_rerun_keeps_the_build(tmp_path):
    import cv2
    import pytest

    root = write_phantom_dataset(tmp_path / "ph", n_per_class=4, size=64, seed=1)
    out = tmp_path / "yolo"
    build_yolo_dataset(out, root / "seg", val_fraction=0.2, test_fraction=0.2)
    (out / "labels" / "train.cache").write_bytes(b"ultralytics label cache")  # written by training on it
    build_yolo_dataset(out, root / "seg", val_fraction=0.2, test_fraction=0.2, seed=1)
    before = sorted(p.name for p in (out / "images").rglob("*") if p.is_symlink())
    lesion = next(m for m in sorted((root / "seg" / "masks").iterdir()) if cv2.imread(str(m), 0).any())
    cv2.imwrite(str(lesion), (cv2.imread(str(lesion), 0) > 127).astype(np.uint8))  # a 0/1 label mask
    with pytest.raises(ValueError, match="none above 127"):
        build_yolo_dataset(out, root / "seg", val_fraction=0.2, test_fraction=0.2, seed=2)
    assert sorted(p.name for p in (out / "images").rglob("*") if p.is_symlink()) == before


def test_backgrounds_copied_into_testing_are_left_out_with_exclude_copies_of(tmp_path):
    import shutil

    from pipeline.datasets import make_split

    root = write_phantom_dataset(tmp_path / "ph", n_per_class=6, size=96, seed=1)
    make_split(root / "Training", tmp_path / "split.csv", 0.25, seed=0)
    train_notumor = [line.split(",")[0] for line in (tmp_path / "split.csv").read_text().splitlines()[1:]
                     if line.endswith(",notumor,train")]
    copied = root / "Training" / train_notumor[0]
    shutil.copy(copied, root / "Testing" / "notumor" / "te-copy.png")
    build_yolo_dataset(tmp_path / "yolo", root / "seg", cls_split=tmp_path / "split.csv", cls_root=root / "Training",
                       n_background=20, val_fraction=0.2, test_fraction=0.2, exclude_copies_of=root / "Testing")
    names = (tmp_path / "yolo" / "split.csv").read_text()
    assert f"background_{copied.stem}," not in names and "background_" in names
    assert str(copied) in (tmp_path / "yolo" / "excluded.txt").read_text()
