import csv
from collections import Counter

import cv2
import numpy as np
import pytest

from pipeline import CLASSES
from pipeline.datasets import (DatasetError, canonical_class, duplicate_groups, list_class_folder,
                               list_mask_dataset, make_split, read_split, stratified_split)


@pytest.mark.parametrize("name,expected", [
    ("glioma", "glioma"), ("glioma_tumor", "glioma"), ("Glioma-Tumor", "glioma"), ("no_tumor", "notumor"),
    ("No Tumor", "notumor"), ("notumor", "notumor"), ("meningioma_tumor", "meningioma"),
    ("pituitary_tumor", "pituitary"), ("normal", "notumor"), ("Glioma Tumor", "glioma"),
    ("Meningioma  Tumor", "meningioma"), ("Pituitary Tumor", "pituitary"), ("no-tumor", "notumor"),
])
def test_canonical_class_aliases(name, expected):
    assert canonical_class(name) == expected


def test_unknown_class_folder_is_a_clear_error(tmp_path):
    (tmp_path / "glioma").mkdir()
    cv2.imwrite(str(tmp_path / "glioma" / "a.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "astrocytoma").mkdir()
    with pytest.raises(DatasetError, match="astrocytoma.*unknown class"):
        list_class_folder(tmp_path)


def test_list_class_folder_maps_aliases_and_skips_non_images(tmp_path):
    for folder in ("glioma_tumor", "no_tumor"):
        (tmp_path / folder / "nested").mkdir(parents=True)
        cv2.imwrite(str(tmp_path / folder / "nested" / "x.png"), np.zeros((8, 8), np.uint8))
        (tmp_path / folder / "notes.txt").write_text("not an image")
        (tmp_path / folder / ".hidden.png").write_bytes(b"")
        (tmp_path / folder / ".ipynb_checkpoints").mkdir()  # segment skips hidden folders: so must the lists
        cv2.imwrite(str(tmp_path / folder / ".ipynb_checkpoints" / "x-checkpoint.png"), np.zeros((8, 8), np.uint8))
    samples = list_class_folder(tmp_path)
    assert [(s.path.parent.parent.name, s.label) for s in samples] == [("glioma_tumor", "glioma"),
                                                                      ("no_tumor", "notumor")]


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        list_class_folder(tmp_path / "nope")


def _fake_samples(n_per_class):
    from pathlib import Path
    from pipeline.datasets import Sample
    return [Sample(Path(f"{c}/{i:04d}.jpg"), c) for c in CLASSES for i in range(n_per_class)]


def test_split_is_stratified_and_deterministic():
    samples = _fake_samples(100)
    a = stratified_split(samples, 0.2, seed=1)
    b = stratified_split(samples, 0.2, seed=1)
    c = stratified_split(samples, 0.2, seed=2)
    assert a == b and a != c
    val = Counter(s.label for s in samples if a[str(s.path)] == "val")
    assert all(val[c] == 20 for c in CLASSES)


def test_split_keeps_duplicate_groups_together():
    samples = _fake_samples(50)
    dup_pairs = [(f"glioma/{i:04d}.jpg", f"glioma/{i + 1:04d}.jpg") for i in range(0, 40, 2)]
    groups = duplicate_groups(dup_pairs)
    for seed in range(5):
        split = stratified_split(samples, 0.3, seed=seed, groups=groups)
        for a, b in dup_pairs:
            assert split[a] == split[b]


def test_make_split_roundtrip(phantom_root, tmp_path):
    out = tmp_path / "split.csv"
    counts = make_split(phantom_root / "Training", out, val_fraction=0.25, seed=0)
    back = read_split(out, phantom_root / "Training")
    assert counts == {"train": len(back["train"]), "val": len(back["val"])}
    assert all(s.path.is_file() for s in back["train"] + back["val"])
    paths = [s.path for s in back["train"] + back["val"]]
    assert len(paths) == len(set(paths)) == len(list_class_folder(phantom_root / "Training"))
    with out.open() as fh:
        assert next(csv.reader(fh)) == ["path", "label", "split"]


def test_mask_dataset_labels_from_csv_and_brisc_names(tmp_path):
    for name in ("7", "brisc2025_train_00001_pi_sa_t1"):
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        cv2.imwrite(str(tmp_path / "images" / f"{name}.jpg"), np.zeros((8, 8), np.uint8))
        cv2.imwrite(str(tmp_path / "masks" / f"{name}.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "labels.csv").write_text("id,label\n7,meningioma\n")
    got = {s.image.stem: s.label for s in list_mask_dataset(tmp_path)}
    assert got == {"7": "meningioma", "brisc2025_train_00001_pi_sa_t1": "pituitary"}
    (tmp_path / "masks" / "7.png").unlink()
    with pytest.raises(DatasetError, match="no mask"):
        list_mask_dataset(tmp_path)


def test_real_mask_datasets_pair_up(shared_root):
    if not all((shared_root / d).is_dir() for d in ("figshare-cheng2017", "brisc2025-seg")):
        pytest.skip(f"{shared_root} lacks figshare-cheng2017 or brisc2025-seg")
    fig = list_mask_dataset(shared_root / "figshare-cheng2017")
    assert len(fig) == 2350
    assert Counter(s.label for s in fig) == {"glioma": 1082, "meningioma": 572, "pituitary": 696}
    brisc = list_mask_dataset(shared_root / "brisc2025-seg")
    assert len(brisc) == 1260 and all(s.label in CLASSES for s in brisc)


def test_split_does_not_depend_on_how_the_folder_is_spelled(phantom_root, tmp_path, monkeypatch):
    # Duplicate groups as the audit writes them (its own spelling of the paths).
    samples = list_class_folder(phantom_root / "Training")
    dups = tmp_path / "train_duplicates.csv"
    dups.write_text("path_a,path_b,distance,same_label\n" + "".join(
        f"{samples[i].path.resolve()},{samples[i + 1].path.resolve()},0,True\n" for i in range(0, 12, 3)))
    direct = make_split(phantom_root / "Training", tmp_path / "a.csv", 0.25, seed=0, train_duplicates_csv=dups)
    monkeypatch.chdir(phantom_root)
    dotted = make_split("./Training/../Training", tmp_path / "b.csv", 0.25, seed=0, train_duplicates_csv=dups)
    assert direct == dotted
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


def test_split_refuses_a_duplicates_file_of_another_kind(tmp_path):
    for c in CLASSES:
        (tmp_path / "Training" / c).mkdir(parents=True)
        for i in range(4):
            cv2.imwrite(str(tmp_path / "Training" / c / f"{i}.png"), np.full((8, 8), i * 40 + 1, np.uint8))
    (tmp_path / "duplicates.csv").write_text("test_path,train_path\na.png,b.png\n")  # the cross-split file
    with pytest.raises(DatasetError, match="expected columns path_a,path_b"):
        make_split(tmp_path / "Training", tmp_path / "s.csv", train_duplicates_csv=tmp_path / "duplicates.csv")
