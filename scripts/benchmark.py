"""The paper's Table 1 on one protocol: methods x training noise x seeds, mean +- std test accuracy.

    python scripts/benchmark.py run --profile cpu --dataset_dir /data/figshare-brain-tumor --out bench/cpu
    python scripts/benchmark.py run --profile paper --dataset_dir /data/figshare-brain-tumor --out bench/paper  # GPU
    python scripts/benchmark.py report --out bench/cpu                                            # tables again
    python scripts/benchmark.py methods                                                             # what can run
    python scripts/benchmark.py select --dataset_dir /data/figshare-brain-tumor --out bench/selection  # tuning seeds
    python scripts/benchmark.py run --profile shift_cpu --dataset_dir /data/figshare-brain-tumor --out bench/shift
    python scripts/benchmark.py run --profile shift2_cpu --dataset_dir /data/figshare-brain-tumor --out bench/shift2

The command line of :class:`robustmri.bench.benchmark.Benchmark` over this repository's ``bundle/``
(methods, variants and profiles: :mod:`robustmri.bench.profiles`). Running the same command again
skips finished runs and resumes an interrupted one. A command that cannot run as given says why in
one line (exit status 2) before it starts.
"""

import os
import sys

import fire

from robustmri.bench.benchmark import Benchmark, RunsFailed, UsageError
from robustmri.bench.runs import run_key

BUNDLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")

if __name__ == "__main__":
    try:
        fire.Fire(Benchmark(BUNDLE))
    except UsageError as err:
        print(f"benchmark.py: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except RunsFailed as err:
        for run in err.failed:
            print(f"FAILED {run_key(run)}: {run['error']}", file=sys.stderr)
        raise SystemExit(str(err)) from None
