import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
FIGSHARE = Path(os.environ.get("BRAIN_TUMOR_DATA", ROOT.parent / "shared" / "data" / "figshare-brain-tumor"))
#: An offline copy of the metadata schema MONAI publishes, the one ``bundle/configs/metadata.json`` names (so a
#: newer ``schema`` there is not checked against an older copy): ``verify_metadata --filepath`` reads it instead
#: of downloading. MONAI's file, not kept in the repository.
MONAI_SCHEMA = Path(os.environ.get("ROBUSTMRI_MONAI_SCHEMA", ROOT.parent / "shared" / "reference" / "monai" / (
    json.loads((BUNDLE / "configs" / "metadata.json").read_text())["schema"].rsplit("/", 1)[-1])))
#: Its sha256, which ``verify_metadata`` checks (``hash_val``) before trusting the copy.
MONAI_SCHEMA_SHA256 = "cd64aa8a5904426f6fc6855dabe46af8c742d5bad644b4e9cfb78ebad09ad678"


@pytest.fixture
def figshare_dir() -> Path:
    """The real figshare slices; tests that need them skip when they are absent."""
    if not (FIGSHARE / "labels.csv").is_file():
        pytest.skip(f"figshare brain-tumour data not found at {FIGSHARE}")
    return FIGSHARE


@pytest.fixture
def monai_schema() -> Path:
    """MONAI's published bundle metadata schema; tests that need it skip when the copy is absent."""
    if not MONAI_SCHEMA.is_file():
        pytest.skip(f"MONAI's metadata schema not found at {MONAI_SCHEMA} (set ROBUSTMRI_MONAI_SCHEMA to a copy)")
    return MONAI_SCHEMA


def pytest_configure(config):
    # The in-process tests use tiny tensors: thread start-up dominates and two threads
    # fighting over two cores (or a background job) make them many times slower.
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``forks_training`` run first (the others keep their order). Their forked child trains, and some
    earlier tests (exporting a signed model with its detector, then running the DICOM node against Orthanc) leave
    the test process in a state where a forked child's backward pass fails with "Unable to handle autograd's
    threading in combination with fork-based multiprocessing" (the cause is not found yet)."""
    items.sort(key=lambda item: item.get_closest_marker("forks_training") is None)
