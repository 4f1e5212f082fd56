import numpy as np
import pytest

from pipeline import CLASSES
from pipeline.datasets import list_class_folder
from pipeline.phantoms import make_phantom


@pytest.mark.parametrize("label", CLASSES)
def test_phantom_shapes_and_masks(label):
    image, mask = make_phantom(label, 128, 0)
    assert image.shape == mask.shape == (128, 128) and image.dtype == mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    if label == "notumor":
        assert not mask.any()
    else:
        assert mask.any()
        # The lesion differs from the tissue around it, so a segmenter has something to find.
        ring = np.zeros_like(mask, bool)
        ys, xs = np.nonzero(mask)
        ring[max(0, ys.min() - 6):ys.max() + 7, max(0, xs.min() - 6):xs.max() + 7] = True
        ring &= mask == 0
        ring &= image > 40
        assert abs(float(image[mask > 0].mean()) - float(image[ring].mean())) > 10


def test_phantoms_are_seeded():
    a, _ = make_phantom("glioma", 64, 5)
    b, _ = make_phantom("glioma", 64, 5)
    c, _ = make_phantom("glioma", 64, 6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_lesion_size_depends_on_class():
    areas = {c: np.mean([(make_phantom(c, 128, s)[1] > 0).sum() for s in range(10)]) for c in CLASSES}
    assert areas["notumor"] == 0 < areas["pituitary"] < areas["meningioma"] < areas["glioma"]


def test_phantom_dataset_layout(phantom_root):
    samples = list_class_folder(phantom_root / "Training")
    assert {s.label for s in samples} == set(CLASSES)
    for s in samples[:5]:
        assert (phantom_root / "masks" / "Training" / s.label / s.path.name).is_file()


def test_a_rerun_with_fewer_slices_leaves_no_stale_file(tmp_path):
    from pipeline.datasets import list_mask_dataset
    from pipeline.phantoms import write_phantom_dataset

    root = write_phantom_dataset(tmp_path / "ph", n_per_class=8, size=48, seed=0)
    (root / ".ready").touch()  # Make's stamp, and anything else beside the phantoms, is left alone
    write_phantom_dataset(root, n_per_class=4, size=48, seed=1)
    assert len(list_class_folder(root / "Training")) == 4 * 3  # 3 of 4 per class (0.75 share)
    seg = list_mask_dataset(root / "seg")
    assert len(seg) == 3 * 3 and all(s.label in CLASSES for s in seg)
    assert (root / ".ready").exists()


def test_a_folder_it_did_not_write_is_refused_not_cleared(tmp_path):
    from pipeline.phantoms import write_phantom_dataset

    (tmp_path / "Training" / "glioma").mkdir(parents=True)
    (tmp_path / "Training" / "glioma" / "mine.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="Training"):
        write_phantom_dataset(tmp_path, n_per_class=4, size=48)
    assert (tmp_path / "Training" / "glioma" / "mine.png").exists()


def test_a_folder_from_before_the_record_is_adopted_and_the_record_cannot_reach_outside(tmp_path):
    import json

    from pipeline.phantoms import PHANTOM_RECORD, write_phantom_dataset

    root = write_phantom_dataset(tmp_path / "ph", n_per_class=8, size=48, seed=0)
    (root / PHANTOM_RECORD).unlink()  # as written before the record existed
    (tmp_path / "victim").mkdir()
    (root / PHANTOM_RECORD).write_text(json.dumps(["../victim", "/", "Training"]))
    write_phantom_dataset(root, n_per_class=4, size=48, seed=1)
    assert len(list_class_folder(root / "Training")) == 4 * 3
    assert (tmp_path / "victim").is_dir()
    assert sorted(json.loads((root / PHANTOM_RECORD).read_text())) == ["Testing", "Training", "masks", "seg"]
