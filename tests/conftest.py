import os
from pathlib import Path

import pytest

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
