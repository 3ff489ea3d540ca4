import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
FIGSHARE = Path(os.environ.get("BRAIN_TUMOR_DATA", ROOT.parent / "shared" / "data" / "figshare-brain-tumor"))


@pytest.fixture
def figshare_dir() -> Path:
    """The real figshare slices; tests that need them skip when they are absent."""
    if not (FIGSHARE / "labels.csv").is_file():
        pytest.skip(f"figshare brain-tumour data not found at {FIGSHARE}")
    return FIGSHARE


def pytest_configure(config):
    # The in-process tests use tiny tensors: thread start-up dominates and two threads
    # fighting over two cores (or a background job) make them many times slower.
    import torch

    torch.set_num_threads(1)
