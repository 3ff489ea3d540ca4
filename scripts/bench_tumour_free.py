"""Measure what a model does with tumour-free brain MR slices: the share given a tumour type, the share refused.

    python scripts/bench_tumour_free.py --checkpoint bundle/models/model.pt --out docs/benchmarks/tumour_free
    python scripts/bench_tumour_free.py --model model.onnx --out docs/benchmarks/tumour_free_onnx
    python scripts/bench_tumour_free.py --checkpoint bundle/models/model.pt --scores true --out OUT

``--checkpoint``: the model as file inference and MONAI Label apply it (its preprocessing from
``model_metadata.json``; refusals only where an abstention state lies beside it); ``--model``: an exported
ONNX model as DICOM inference applies it (refusals by its detector). The sets and their licences:
:mod:`robustmri.bench.tumour_free` (the synthetic generator's tumour-free heads, ``--n_synthetic`` of them,
and the brain volumes nibabel ships as test data; ``--public false`` leaves those out). Writes
``tumour_free.json`` and ``tumour_free.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import logging
import os
import sys

import fire

from robustmri.bench.machine import write_measurement
from robustmri.bench.tumour_free import (
    CheckpointModel,
    OnnxModel,
    markdown,
    measure_tumour_free,
    refusal_by_score,
    refusal_markdown,
    tumour_free_sets,
)
from robustmri.options import as_flag

BUNDLE = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bundle"))


def main(checkpoint: str = "", model: str = "", out: str = "docs/benchmarks/tumour_free", n_synthetic: int = 200,
         public: bool = True, bundle_dir: str = BUNDLE, scores: bool = False, dataset_dir: str | None = None) -> dict:
    """Classify the tumour-free sets with one model; write the JSON and the table. ``--scores true`` (a checkpoint
    only) adds what every abstention score would refuse at the product's rule, fitted on the data the checkpoint
    was trained on (``--dataset_dir`` when it moved)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if bool(checkpoint) == bool(model):
        raise SystemExit("give exactly one of --checkpoint (a .pt, as file inference applies it) and --model "
                         "(an exported .onnx, as DICOM inference applies it)")
    if as_flag(scores, "scores") and not checkpoint:
        raise SystemExit("--scores needs --checkpoint: the scores are fitted on the checkpoint's training data")
    measured = CheckpointModel(checkpoint, bundle_dir) if checkpoint else OnnxModel(model)
    sets = tumour_free_sets(n_synthetic, public=as_flag(public, "public"))
    report = measure_tumour_free(measured, sets)
    if as_flag(scores, "scores"):
        report["by_score"] = refusal_by_score(checkpoint, bundle_dir, sets, dataset_dir=dataset_dir)
    table = markdown(report) + ("\n" + refusal_markdown(report["by_score"]) if "by_score" in report else "")
    write_measurement(out, "tumour_free", report, table, "bench_tumour_free.py", sys.argv[1:])
    return report


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
