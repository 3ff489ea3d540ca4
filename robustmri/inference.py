"""Classify image files (PNG/JPEG/NIfTI/single DICOM/.mat) and write the results as JSON."""

from __future__ import annotations

import glob
import json
import logging
import os

import numpy as np
import torch

from .preprocessing import read_preprocessed
from .readers import as_path_list, has_image_suffix

logger = logging.getLogger(__name__)


def list_inputs(inputs) -> list[str]:
    """Expand folders (recursively, image suffixes only) and glob patterns into sorted files."""
    files: list[str] = []
    for entry in as_path_list(inputs):
        if os.path.isdir(entry):
            found = sorted(p for p in glob.glob(os.path.join(entry, "**", "*"), recursive=True)
                           if os.path.isfile(p) and has_image_suffix(p))
            if not found:
                raise FileNotFoundError(f"{entry}: folder holds no image files")
            files += found
        elif any(ch in entry for ch in "*?["):
            files += sorted(glob.glob(entry, recursive=True))
        else:
            files.append(entry)
    if not files:
        raise FileNotFoundError(f"no input files in {list(inputs)}")
    return files


@torch.no_grad()
def predict_files(network: torch.nn.Module, inputs, output_file: str, class_names, spatial_size: int,
                  device="cpu", batch_size: int = 32) -> dict:
    """Per-image class and probabilities; unreadable files are listed with their reason, not fatal."""
    files = list_inputs(inputs)
    network = network.to(device).eval()
    results, errors, batch, batch_files = [], [], [], []

    def flush():
        if not batch:
            return
        x = torch.from_numpy(np.stack(batch)[:, None]).to(device)
        probabilities = torch.softmax(network(x), dim=1).cpu().numpy()
        for path, p in zip(batch_files, probabilities):
            results.append({"file": path, "class": class_names[int(p.argmax())],
                            "probabilities": {name: float(v) for name, v in zip(class_names, p)}})
        batch.clear()
        batch_files.clear()

    for path in files:
        image, reason = read_preprocessed(path, spatial_size)
        if image is None:
            errors.append({"file": path, "error": reason})
        else:
            batch.append(image)
            batch_files.append(path)
        if len(batch) == batch_size:
            flush()
    flush()
    summary = {"n_classified": len(results), "n_failed": len(errors), "predictions": results, "errors": errors}
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(output_file, "w") as handle:
        json.dump(summary, handle, indent=2)
    for error in errors:
        logger.warning("not classified: %s (%s)", error["file"], error["error"])
    logger.info("classified %d image(s), %d failed -> %s", len(results), len(errors), output_file)
    return summary
