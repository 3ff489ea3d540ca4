"""Which review order finds the wrong labels first: the analysis of a ``review_order_cpu`` benchmark.

Each finished run of the benchmark (a line of ``<out>/runs.jsonl``) left the label audit's per-sample record,
``runs/<run key>/eval/audit_values.json`` (:data:`robustmri.methods.audit.VALUES_FILE`): given and true labels,
the model's probabilities, losses, self-influence and validation influence. Every order of
:mod:`robustmri.review.orders` ranks that one record, and is scored by precision and recall at k
(:mod:`robustmri.evaluation.ranking`) for k = the number of wrong labels and k = 5 % and 10 % of the training set.

Orders are compared run by run: every order of a run ranks the same model's view of the same labels, so
the difference between two orders is paired over the seeds of a flip rate, and over all runs pooled
(:func:`robustmri.bench.stats.paired_difference`, with the minimum detectable effect of that design).

:func:`decide` applies the rule written before the run (``docs/benchmarks/review_order/PREREGISTERED.md``):
the order with the highest mean precision at k = the number of wrong labels, averaged over the flip rates,
unless the paired 95 % interval of its difference with the runner-up over all runs includes 0, in which case
the cheaper of the two (:attr:`robustmri.review.orders.ReviewOrder.cost`). Orders that need a trusted
validation set are measured for reference and never chosen.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from robustmri.bench.report import read_runs
from robustmri.bench.runs import run_key
from robustmri.bench.stats import MISSING, minimum_detectable_effect, paired_difference
from robustmri.evaluation.ranking import precision_at_k, recall_at_k
from robustmri.methods.audit import VALUES_FILE, resolve_ks
from robustmri.outputs import plt, read_json, save_figure
from robustmri.review.orders import ORDERS, ReviewValues, rank

logger = logging.getLogger(__name__)

#: The k of the decision: as many positions as there are wrong labels (precision = recall there).
FLIPPED = "flipped"
#: k values of the table: the number of wrong labels, and 5 % and 10 % of the training set.
KS = (FLIPPED, 0.05, 0.1)
#: Shares of the training set reviewed at which the figure draws recall.
CURVE_SHARES = np.round(np.arange(0.0, 0.401, 0.01), 2)


def read_values(path: str) -> tuple[ReviewValues, np.ndarray]:
    """The review values and the truly-wrong mask of one run's ``audit_values.json``."""
    record = read_json(path)
    labels = np.asarray(record["labels"], dtype=np.int64)
    optional = {name: None if record.get(key) is None else np.asarray(record[key], dtype=np.float64)
                for name, key in (("probabilities", "probabilities"), ("losses", "losses"),
                                  ("self_influence", "self_influence"), ("influence", "scores"))}
    return ReviewValues(labels, **optional), labels != np.asarray(record["true_labels"], dtype=np.int64)


def evaluate_run(values: ReviewValues, is_wrong, seed: int, ks=KS) -> dict:
    """Per order: precision and recall at each k (``{"flipped": {...}, "0.05": {...}}``) and the recall curve at
    :data:`CURVE_SHARES`; ``random`` is seeded with the run's seed. Orders whose values are absent are left out."""
    is_wrong = np.asarray(is_wrong, dtype=bool)
    n, n_wrong = len(is_wrong), int(is_wrong.sum())
    result = {"n": n, "wrong_labels": n_wrong, "k": {}, "orders": {}}
    for key in ks:
        resolved = resolve_ks([key], n, n_wrong)
        if resolved:
            result["k"][str(key)] = resolved[0]
    for name, order in ORDERS.items():
        if any(getattr(values, field) is None for field in order.needs):
            continue
        positions = rank(name, values, seed).positions
        found = np.concatenate([[0], np.cumsum(is_wrong[positions])])
        result["orders"][name] = {
            "at_k": {key: {"precision": precision_at_k(positions, is_wrong, k),
                           "recall": recall_at_k(positions, is_wrong, k)} for key, k in result["k"].items()},
            "recall_curve": (found[np.round(CURVE_SHARES * n).astype(int)] / max(n_wrong, 1)).tolist()}
    return result


def evaluate_benchmark(out: str) -> list[dict]:
    """Every finished run of the benchmark in ``out`` whose audit left per-sample values: ``rate``, ``seed``,
    ``run`` and :func:`evaluate_run`'s result. Runs without the values file are logged and skipped."""
    runs = []
    for record in read_runs(os.path.join(out, "runs.jsonl")):
        if record.get("method") != "audit" or not record.get("label_noise_rate"):
            continue
        key = run_key(record)
        path = os.path.join(out, "runs", key, "eval", VALUES_FILE)
        if not os.path.isfile(path):
            logger.warning("%s: no %s; run left out", key, VALUES_FILE)
            continue
        values, is_wrong = read_values(path)
        runs.append({"rate": float(record["label_noise_rate"]), "seed": int(record["seed"]), "run": key,
                     **evaluate_run(values, is_wrong, int(record["seed"]))})
    return sorted(runs, key=lambda r: (r["rate"], r["seed"]))


def _metric(runs: list[dict], order: str, k: str, measure: str, pooled: bool) -> dict:
    """``{pairing key: value}`` of one order over runs (key: seed, or (rate, seed) when pooled)."""
    return {((run["rate"], run["seed"]) if pooled else run["seed"]): run["orders"][order]["at_k"][k][measure]
            for run in runs if order in run["orders"] and k in run["orders"][order]["at_k"]}


def _mean_sd(values) -> dict:
    values = np.asarray(list(values), dtype=float)
    return {"n": len(values), "mean": float(values.mean()) if len(values) else None,
            "sd": float(values.std(ddof=1)) if len(values) > 1 else None}


def _with_mde(diff: dict) -> dict:
    diff = {**diff, "seeds": [list(s) if isinstance(s, tuple) else s for s in diff["seeds"]]}
    diff["mde"] = minimum_detectable_effect(diff["std"], diff["n"]) if diff["n"] >= 2 else None
    return diff


def compare(runs: list[dict], reference: str, k: str = FLIPPED, measure: str = "precision") -> dict:
    """Per flip rate and pooled (``"all"``): every order's mean and sd, and its paired difference with
    ``reference`` (mean, 95 % t interval, seeds where it is positive, minimum detectable effect)."""
    groups = {f"{rate:g}": [r for r in runs if r["rate"] == rate] for rate in sorted({r["rate"] for r in runs})}
    groups["all"] = runs
    orders = [name for name in ORDERS if any(name in run["orders"] for run in runs)]
    result = {}
    for group, members in groups.items():
        pooled = group == "all"
        base = _metric(members, reference, k, measure, pooled)
        result[group] = {name: {**_mean_sd(_metric(members, name, k, measure, pooled).values()),
                                "vs_reference": None if name == reference else
                                _with_mde(paired_difference(_metric(members, name, k, measure, pooled), base))}
                         for name in orders}
    return result


def decide(runs: list[dict], k: str = FLIPPED) -> dict:
    """The pre-registered rule on ``runs``: ``chosen``, ``best``, ``runner_up``, ``means`` (the mean over flip
    rates of each candidate's mean precision at ``k``), ``difference`` (best - runner-up, paired over all
    runs, with its 95 % interval) and ``reason`` (one sentence)."""
    rates = sorted({r["rate"] for r in runs})
    candidates = [name for name, order in ORDERS.items() if not order.needs_validation_set
                  and all(name in run["orders"] for run in runs)]
    if not runs or len(candidates) < 2:
        raise ValueError("the rule needs runs with at least two candidate orders")
    means = {name: float(np.mean([np.mean(list(_metric([r for r in runs if r["rate"] == rate], name, k, "precision",
                                                       False).values())) for rate in rates]))
             for name in candidates}
    best, runner_up = sorted(candidates, key=lambda name: (-means[name], ORDERS[name].cost))[:2]
    diff = _with_mde(paired_difference(_metric(runs, best, k, "precision", True),
                                       _metric(runs, runner_up, k, "precision", True)))
    resolved = diff["ci"] is not None and (diff["ci"][0] > 0 or diff["ci"][1] < 0)
    cheaper = min((best, runner_up), key=lambda name: ORDERS[name].cost)
    chosen = best if resolved else cheaper
    interval = "no interval" if diff["ci"] is None else \
        f"95 % interval [{100 * diff['ci'][0]:+.2f}, {100 * diff['ci'][1]:+.2f}] points"
    if resolved:
        reason = (f"{best} found the most wrong labels (precision at k = the number of wrong labels "
                  f"{100 * means[best]:.1f} % against {runner_up}'s {100 * means[runner_up]:.1f} %, {interval} over "
                  f"{diff['n']} runs)")
    else:
        reason = (f"{best} ({100 * means[best]:.1f} %) and {runner_up} ({100 * means[runner_up]:.1f} %) were not "
                  f"told apart (precision at k = the number of wrong labels, {interval} over {diff['n']} runs), "
                  f"so the cheaper, {chosen}")
    return {"chosen": chosen, "best": best, "runner_up": runner_up, "means": means, "difference": diff,
            "resolved": resolved, "rates": rates, "runs": len(runs), "reason": reason}


# --- what the script writes --------------------------------------------------------------------------------

def _pct(value) -> str:
    return MISSING if value is None else f"{100 * value:.1f}"


def _delta(diff: dict | None) -> str:
    if diff is None:
        return "(chosen)"
    if not diff["n"]:
        return MISSING
    interval = "" if diff["ci"] is None else f" [{100 * diff['ci'][0]:+.1f}, {100 * diff['ci'][1]:+.1f}]"
    mde = "" if diff["mde"] is None else f"; MDE {100 * diff['mde']:.1f}"
    return f"{100 * diff['mean']:+.1f}{interval}, {diff['positive']}/{diff['n']}{mde}"


def markdown_table(runs: list[dict], decision: dict) -> str:
    """Markdown: per order, per flip rate and pooled, precision at k = the number of wrong labels (= recall
    there) as mean ± sd and its paired difference with the chosen order; then precision and recall at 5 %
    and 10 % of the training set."""
    chosen = decision["chosen"]
    flipped = compare(runs, chosen)
    groups = list(flipped)
    names = list(flipped["all"])
    header = ["order"] + [c for g in groups for c in (f"{_group(g)}: P@k = R@k %", f"{_group(g)}: Δ vs {chosen}")]
    rows = [[name] + [c for g in groups for c in (_cell(flipped[g][name]), _delta(flipped[g][name]["vs_reference"]))]
            for name in names]
    lines = [_table(header, rows)]
    shares = [key for key in map(str, KS) if key != FLIPPED]
    at_share = {(share, measure): compare(runs, chosen, share, measure)
                for share in shares for measure in ("precision", "recall")}
    rates = [g for g in groups if g != "all"]
    header = ["order"] + [f"{_group(g)}: P / R @ {float(s):.0%} %" for g in rates for s in shares]
    rows = [[name] + [" / ".join(_pct(at_share[s, measure][g][name]["mean"]) for measure in ("precision", "recall"))
                      for g in rates for s in shares] for name in names]
    lines.append(_table(header, rows))
    return "\n".join(lines)


def _group(group: str) -> str:
    return "all runs" if group == "all" else f"r = {group}"


def _cell(entry: dict) -> str:
    if not entry["n"]:
        return MISSING
    sd = "" if entry["sd"] is None else f" ± {100 * entry['sd']:.1f}"
    return f"{_pct(entry['mean'])}{sd} ({entry['n']})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def recall_figure(runs: list[dict], path: str) -> str:
    """Recall against the share of the training set reviewed, one panel per flip rate, the mean over seeds of
    each order (the dotted line: every wrong label found as early as possible)."""
    rates = sorted({r["rate"] for r in runs})
    fig, axes = plt.subplots(1, len(rates), figsize=(4.2 * len(rates), 3.8), squeeze=False)
    for axis, rate in zip(axes[0], rates):
        members = [r for r in runs if r["rate"] == rate]
        for name in ORDERS:
            curves = [r["orders"][name]["recall_curve"] for r in members if name in r["orders"]]
            if curves:  # dashed on top: confident learning often ranks the first images as the loss does
                axis.plot(100 * CURVE_SHARES, 100 * np.mean(curves, axis=0), "--" if name == "confident_learning"
                          else "-", label=name)
        axis.plot(100 * CURVE_SHARES, 100 * np.minimum(CURVE_SHARES / rate, 1), ":", color="grey", label="ideal")
        seeds = f"{len(members)} seed" + ("" if len(members) == 1 else "s")
        axis.set(title=f"labels flipped: {rate:.0%} ({seeds})", xlabel="training set reviewed, %",
                 ylabel="wrong labels found (recall), %", ylim=(0, 101))
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path)
    return path


def summary(runs: list[dict], decision: dict, expected_runs: int | None) -> dict:
    """The JSON summary: the decision, completeness, per-run precision and recall at each k (no curves), and
    the comparisons with the chosen order."""
    return {"decision": decision, "runs_expected": expected_runs, "runs_found": len(runs),
            "complete": expected_runs is not None and len(runs) >= expected_runs,
            "comparison_vs_chosen": {key: {measure: compare(runs, decision["chosen"], key, measure)
                                           for measure in ("precision", "recall")} for key in map(str, KS)},
            "per_run": [{**{k: v for k, v in run.items() if k != "orders"},
                         "orders": {name: entry["at_k"] for name, entry in run["orders"].items()}} for run in runs]}
