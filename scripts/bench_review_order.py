"""Which review order finds the wrong labels first: tables, figure and the pre-registered decision.

    python scripts/bench_review_order.py --bench bench/review_order --out docs/benchmarks/review_order

Reads a finished (or partly finished) ``review_order_cpu`` benchmark folder (``scripts/benchmark.py run
--profile review_order_cpu``), ranks every run's label-audit record by every review order
(:mod:`robustmri.review.orders`) and writes into ``--out``: ``summary.json`` (the decision, per-run precision
and recall at k, paired comparisons), ``table.md`` and ``recall_at_k.png``. Prints the decision of the rule
in ``docs/benchmarks/review_order/PREREGISTERED.md``, and whether every planned run was there.
"""

from __future__ import annotations

import json
import os
import sys

import fire

from robustmri.bench.profiles import PROFILES
from robustmri.bench.review_orders import decide, evaluate_benchmark, markdown_table, recall_figure, summary
from robustmri.outputs import read_json, write_json


def main(bench: str, out: str) -> None:
    protocol = read_json(os.path.join(bench, "protocol.json"), missing={}).get("protocol", {})
    profile = PROFILES.get(protocol.get("profile"), {})
    expected = profile["seeds"] * len(profile["label_noise_rates"]) if profile else None
    runs = evaluate_benchmark(bench)
    if not runs:
        sys.exit(f"bench_review_order.py: {bench} holds no finished run with audit_values.json")
    decision = decide(runs)
    result = summary(runs, decision, expected)
    write_json(os.path.join(out, "summary.json"), result)
    with open(os.path.join(out, "table.md"), "w") as handle:
        handle.write(markdown_table(runs, decision))
    recall_figure(runs, os.path.join(out, "recall_at_k.png"))
    print(json.dumps({"runs_found": result["runs_found"], "runs_expected": expected, "complete": result["complete"],
                      "chosen": decision["chosen"], "reason": decision["reason"]}, indent=2))


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
