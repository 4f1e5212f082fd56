import json

import numpy as np
import pytest

from pipeline.classify.predict import Classifier
from pipeline.classify.search import build_index, embed
from pipeline.cli import main
from pipeline.phantoms import make_phantom


def test_embeddings_are_unit_vectors(tiny_classifier):
    clf = Classifier(tiny_classifier)
    images = np.stack([make_phantom("glioma", 32, i)[0] for i in range(3)])
    e = embed(clf, images)
    assert e.shape[0] == 3 and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)


def test_index_then_query_finds_itself_first(phantom_root, tiny_classifier, tmp_path, capsys):
    out = tmp_path / "index.npz"
    info = build_index(phantom_root / "Training", out, Classifier(tiny_classifier))
    assert info["indexed"] == 24 and info["errors"] == 0
    data = np.load(out)
    assert set(data["labels"]) == {"glioma", "meningioma", "notumor", "pituitary"}
    query = phantom_root / "Training" / "meningioma" / sorted((phantom_root / "Training" / "meningioma").iterdir())[0].name
    assert main(["similar", "--index", str(out), "--query", str(query), "-k", "3", "--cls", str(tiny_classifier),
                 "--device", "cpu"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 3
    assert hits[0]["key"] == f"meningioma/{query.name}" and hits[0]["label"] == "meningioma"
    assert hits[0]["distance"] == pytest.approx(0, abs=1e-5)
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)


def test_index_refuses_a_crop_mode_classifier(tmp_path, phantom_root):
    import torch

    from pipeline import CLASSES
    from pipeline.classify.models import create_model

    path = tmp_path / "crop.pt"
    torch.save({"state_dict": create_model("smallcnn").state_dict(),
                "meta": {"model": "smallcnn", "mode": "crop", "size": 32, "classes": list(CLASSES)}}, path)
    with pytest.raises(ValueError, match="full-slice"):
        build_index(phantom_root / "Testing", tmp_path / "i.npz", Classifier(path))


def test_a_volume_finds_itself_and_the_index_file_is_what_was_named(tmp_path, tiny_classifier, capsys):
    from tests.scan_fixtures import write_nifti

    scans = tmp_path / "scans" / "glioma"
    scans.mkdir(parents=True)
    vol = np.zeros((64, 64, 20), np.float32)
    for z in range(2, 12):  # content only in slices 2-11: the volume's geometric middle (10) is one of them,
        vol[:, :, z] = make_phantom("glioma", 64, z)[0]  # but not the middle of its non-empty ones (7)
    write_nifti(scans / "vol.nii.gz", vol)
    from PIL import Image

    for i in range(3):
        Image.fromarray(make_phantom("notumor", 64, 100 + i)[0]).save(tmp_path / "scans" / f"n{i}.png")
    out = tmp_path / "idx2"  # no .npz suffix: the file is still called what was asked
    info = build_index(tmp_path / "scans", out, Classifier(tiny_classifier))
    assert info["out"] == str(out) and out.is_file() and info["indexed"] == 4
    assert main(["similar", "--index", str(out), "--query", str(scans / "vol.nii.gz"), "-k", "1",
                 "--cls", str(tiny_classifier), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    hit = json.loads(captured.out.splitlines()[0])
    assert hit["key"].startswith("glioma/vol.nii.gz#z=") and hit["distance"] == pytest.approx(0, abs=1e-5)
    assert f"query: {scans / 'vol.nii.gz'}#z=" in captured.err  # which slice of the volume was read
    # a slice named as predict names it: another slice than the middle one, its own distance
    assert main(["similar", "--index", str(out), "--query", f"{scans / 'vol.nii.gz'}#z=03", "-k", "4",
                 "--cls", str(tiny_classifier), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert f"query: {scans / 'vol.nii.gz'}#z=03" in captured.err and len(captured.out.splitlines()) == 4
    out.write_bytes(out.read_bytes()[:200])  # a write cut short
    assert main(["similar", "--index", str(out), "--query", str(scans / "vol.nii.gz"), "--cls", str(tiny_classifier),
                 "--device", "cpu"]) != 0
    assert f"{out}: not an index written by `index`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["similar", "--index", str(out), "--query", str(scans / "vol.nii.gz"), "-k", "0"])


def test_a_scan_is_labelled_by_its_outermost_class_folder():
    from pipeline.classify.search import _label_of

    assert _label_of("glioma/normal/x.jpg") == "glioma"  # as list_class_folder reads it
    assert _label_of("study/notumor/x.jpg") == "notumor" and _label_of("x.jpg") == ""
