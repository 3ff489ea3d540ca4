"""Which abstention score tracks wrong answers: AURC per score at home and under site shifts, and the choice.

    python scripts/bench_abstention.py --checkpoint RUN/models/model.pt --dataset_dir DATA --out OUT
    python scripts/bench_abstention.py --checkpoint RUN/models/model.pt --ensemble "['SEED1/models/model.pt']" \
        --scores "['energy','max_softmax']" --shifts "['blur','gamma_0.7']" --out OUT

Rebuilds the protocol the checkpoint was trained on (network, size and preprocessing from
``model_metadata.json``; ``--seed``, ``--noise``, ``--synthetic_patients`` and ``--dataset_dir`` default to
what training recorded), fits every abstention score (``robustmri.abstention.scores.SCORES``) on the training
split and reports the area under the risk-coverage curve (AURC) and its excess over the oracle ordering on
the home validation and test splits and on their renderings under every site shift
(``robustmri.data.site_shift.SHIFTS``). The score is chosen by the mean AURC over the shifted *validation*
renderings; the test numbers are printed beside it. ``--ensemble``: checkpoints of other training seeds,
scored with this one as a deep ensemble. Writes ``abstention_bench.json``, ``abstention_bench.md`` and the
risk-coverage figures into ``--out`` (:mod:`robustmri.bench.abstention`).
"""

from __future__ import annotations

import logging
import os
import sys

import fire

from robustmri.bench.abstention import bench_abstention, markdown
from robustmri.deploy.onnx.export_checkpoint import monai_logs_to_stderr

BUNDLE = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bundle"))


def _names(value) -> list[str] | None:
    """A list from the command line: fire gives a list for ``"['a','b']"`` and a string for ``a`` or ``a,b``."""
    if value is None:
        return None
    return [v for v in value.split(",") if v] if isinstance(value, str) else [str(v) for v in value]


def main(checkpoint: str, out: str = "docs/benchmarks/abstention", dataset_dir: str | None = None,
         seed: int | None = None, noise: str | None = None, synthetic_patients: int | None = None, scores=None,
         shifts=None, ensemble=(), workers: int = 1, cache_dir: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    monai_logs_to_stderr()
    report = bench_abstention(BUNDLE, checkpoint, out, dataset_dir=dataset_dir, seed=seed, noise=noise,
                              synthetic_patients=synthetic_patients, scores=_names(scores),
                              shifts=_names(shifts), ensemble=_names(ensemble) or [], workers=workers,
                              cache_dir=cache_dir,
                              command="python scripts/bench_abstention.py " + " ".join(sys.argv[1:]))
    print(markdown(report))


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
