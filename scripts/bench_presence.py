"""Measure whether a tumour-presence signal can be learnt from a folder's tumour boxes (figshare's labels.csv has them).

    python scripts/bench_presence.py --dataset_dir DATA --out docs/benchmarks/presence

What is trained, thresholded and measured: :mod:`robustmri.bench.presence` (a small fully convolutional network,
one logit per cell, from scratch per seed; the threshold from the validation split; tumour-free sets from
:mod:`robustmri.bench.tumour_free`). Writes ``presence.json`` and ``presence.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import logging
import sys

import fire

from robustmri.bench.machine import write_measurement
from robustmri.bench.presence import SENSITIVITY, markdown, measure_presence
from robustmri.bench.tumour_free import tumour_free_sets
from robustmri.options import as_flag


def main(dataset_dir: str, out: str = "docs/benchmarks/presence", size: int = 64, grid: int = 4, epochs: int = 12,
         seeds: str = "0,1,2", sensitivity: float = SENSITIVITY, n_synthetic: int = 200, public: bool = True) -> dict:
    """Train one presence network per seed on the folder's training split; write the JSON and the table."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # fire reads "0,1,2" as a tuple and "0" as an int
    parts = seeds if isinstance(seeds, (list, tuple)) else str(seeds).replace(" ", "").split(",")
    seed_list = [int(s) for s in parts if str(s) != ""]
    if not seed_list:
        raise SystemExit("--seeds: give at least one seed, for example 0,1,2")
    try:
        report = measure_presence(dataset_dir, size=size, grid=grid, epochs=epochs, seeds=seed_list,
                                  sensitivity=sensitivity,
                                  tumour_free=tumour_free_sets(n_synthetic, public=as_flag(public, "public")))
    except ValueError as error:
        raise SystemExit(f"bench_presence: {error}")
    report["dataset_dir"] = "DATA"  # no local path in a committed record
    write_measurement(out, "presence", report, markdown(report), "bench_presence.py", sys.argv[1:])
    return report


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
