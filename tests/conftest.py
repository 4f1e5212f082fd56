import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BRAIN_MRI_SHARED", REPO.parent / "shared" / "datasets"))
KAGGLE = SHARED / "brain-tumor-mri"


@pytest.fixture(scope="session")
def kaggle_root() -> Path:
    if not (KAGGLE / "Training").is_dir():
        pytest.skip(f"{KAGGLE} not present")
    return KAGGLE


@pytest.fixture(scope="session")
def shared_root() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} not present")
    return SHARED


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory) -> Path:
    from pipeline.phantoms import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("phantoms"), n_per_class=8, size=128, seed=3)


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """A random smallcnn in the shipped weights-only format, trained on ``full`` 32 px inputs."""
    from pipeline import CLASSES
    from pipeline.classify.models import create_model

    torch.manual_seed(0)
    model = create_model("smallcnn")
    path = tmp_path_factory.mktemp("weights") / "tiny_cls.pt"
    torch.save({"state_dict": model.state_dict(),
                "meta": {"model": "smallcnn", "mode": "full", "size": 32, "classes": list(CLASSES)}}, path)
    return path
