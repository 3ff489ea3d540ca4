"""Measure the denoise method's filters on clean validation slices with synthetic noise.

    python scripts/measure_denoise.py --dataset_dir DATA --out denoise_psnr.json

Builds the protocol without noise (``noise="none"``, head preprocessing) at ``--spatial_size`` (64) with the
tuning seed ``--seed`` (100, never a benchmark seed), takes its VALIDATION split only (the test split is never
read), adds Gaussian and Rician noise at sigma = 16, 32 and 64 / 255 and prints, as a markdown table, the mean
PSNR of the noisy, NLM-denoised and blurred (control) images against the clean ones, and the error of the
per-image sigma estimate (``robustmri.methods.denoise.measure``). The control's blur width is matched to NLM's
PSNR gain at 32/255 by a 1-D search on these slices: the widths printed as ``matched_blur_width`` are the ones
``robustmri.methods.denoise.MATCHED_BLUR_WIDTH`` fixes. ``--out``: the same as JSON, with the command and date.
"""

from __future__ import annotations

import datetime
import json
import platform
import sys

import fire
import numpy as np

from robustmri.data.protocol import build_protocol
from robustmri.methods.denoise import markdown, measure
from robustmri.outputs import write_json


def main(dataset_dir: str, out: str, spatial_size: int = 64, seed: int = 100) -> None:
    data = build_protocol(dataset_dir, spatial_size=int(spatial_size), noise="none", preprocess="head", seed=int(seed))
    clean = np.stack([np.asarray(item["image"], dtype=np.float32)[0] for item in data.val])
    result = measure(clean, seed=int(seed))
    result.update({"split": "val", "spatial_size": int(spatial_size), "preprocess": "head",
                   "command": "python scripts/measure_denoise.py " + " ".join(
                       "DATA" if arg == dataset_dir else arg for arg in sys.argv[1:]),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "machine": platform.platform()})
    write_json(out, result)
    print(markdown(result))
    print("\nmatched_blur_width:", json.dumps({noise: value["width"] for noise, value in
                                               result["matched_blur_width"].items()}))


if __name__ == "__main__":
    fire.Fire(main)
