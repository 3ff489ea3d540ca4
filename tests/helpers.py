"""Small writers of test files in the layouts users have, and tiny models and batches for engine tests."""

from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image
from torch import nn


def write_figshare_mat(path: Path, image: np.ndarray, label: int, pid: str, with_cjdata: bool = True) -> Path:
    """A MATLAB v7.3 file laid out like the figshare release (column-major, as MATLAB writes)."""
    with h5py.File(path, "w") as handle:
        group = handle.create_group("cjdata" if with_cjdata else "other")
        group["image"] = image.astype(np.int16).T
        group["label"] = np.array([[float(label)]])
        group["PID"] = np.array([[ord(c)] for c in pid], dtype=np.uint16)
        group["tumorMask"] = (image > image.mean()).astype(np.uint8).T
    return path


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    return path


def gradient_image(size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.add.outer(np.arange(size), np.arange(size)) * 2.0 + rng.integers(0, 20, (size, size))


def tiny_network() -> nn.Module:
    """A 16-pixel classifier with BatchNorm (so buffers matter) for trainer-level tests."""
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def tiny_batches(n_batches: int = 4, seed: int = 0) -> list[dict]:
    """Fixed batches of six 4 x 4 images with labels in {0, 1, 2}."""
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(6, 1, 4, 4, generator=g), "label": torch.randint(0, 3, (6,), generator=g)}
            for _ in range(n_batches)]
