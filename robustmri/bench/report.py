"""Tables and pictures of a benchmark: mean +- std over seeds, in the shape of the paper's Table 1.

A run record (one line of ``runs.jsonl``) has ``method``, ``noise``, ``test_noise_fraction``,
``val_fraction``, ``seed``, ``test`` (``{"best": report, "last": report}``), ``history``
(per-epoch validation accuracy) and ``timings``. Rows are methods, columns noise type
(x p when several are given); ``best`` is the checkpoint with the highest validation
accuracy, ``last`` the last epoch's. Nothing here looks at test accuracy to choose anything.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from robustmri.evaluation.metrics import balanced_accuracy
from robustmri.methods import registry
from robustmri.outputs import plt, save_figure, write_json

CHECKPOINTS = ("best", "last")


def read_runs(path: str) -> list[dict]:
    """Records of ``runs.jsonl``; a torn last line (interrupted write) is ignored."""
    if not os.path.isfile(path):
        return []
    runs = []
    with open(path) as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return runs


def column_of(run: dict, several_p: bool) -> str:
    """``noise`` (training image noise), with p when several test-noise fractions were run and the
    label-flip rate when labels were flipped."""
    column = f"{run['noise']}, p={run['test_noise_fraction']:g}" if several_p else run["noise"]
    rate = run.get("label_noise_rate") or 0.0
    return f"{column}, labels r={rate:g}" if rate else column


def _metric(report: dict, metric: str) -> float | None:
    """A test report's metric; records written before 0.3.1 lack balanced accuracy: from their per-class recalls."""
    if metric == "balanced_accuracy" and metric not in report:
        return balanced_accuracy(report["per_class"])
    return report[metric]


def audit_rows(run: dict) -> list[dict]:
    """The label audit's precision-at-k rows of a run (empty when the audit did not run)."""
    audit = run.get("method_outputs", {}).get(registry()["audit"].summary) or {}
    return audit.get("precision_at_k") or []


def _ordered(values, preferred):
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def validation_swing(history: list[dict]) -> dict:
    """How much validation accuracy moves over the second half of training: the range and the
    mean absolute change from one epoch to the next (model selection rides on this)."""
    acc = np.array([h["val_accuracy"] for h in history if h.get("val_accuracy") is not None])
    if len(acc) < 2:
        return {"range": None, "mean_step": None}
    tail = acc[len(acc) // 2:]
    return {"range": float(tail.max() - tail.min()), "mean_step": float(np.abs(np.diff(acc[len(acc) // 2 - 1:])).mean())}


def _mean_std(values) -> dict | None:
    values = np.array([v for v in values if v is not None], dtype=float)
    if not len(values):
        return None
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def group_runs(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs by (method, table column): the seeds of one cell."""
    several_p = len({r["test_noise_fraction"] for r in runs}) > 1
    cells = defaultdict(list)
    for run in runs:
        cells[(run["method"], column_of(run, several_p))].append(run)
    return dict(cells)


def aggregate(runs: list[dict], method_order=()) -> dict:
    """Per (method, column): n seeds, mean/std of accuracy and macro-F1 per checkpoint, timings, swing."""
    cells = group_runs(runs)
    table = {}
    for (method, column), group in cells.items():
        entry = {"n": len(group), "seeds": sorted(r["seed"] for r in group)}
        for tag in CHECKPOINTS:
            for metric in ("accuracy", "macro_f1", "balanced_accuracy"):
                values = [_metric(r["test"][tag], metric) for r in group]
                entry[f"{tag}_{metric}"] = _mean_std(values)
        audits = [audit_rows(r) for r in group if audit_rows(r)]
        if audits:  # precision at the last k (the number of flipped labels), influence vs loss vs random
            entry["audit"] = {ranking: _mean_std([rows[-1][ranking] for rows in audits])
                              for ranking in ("influence", "loss", "random")}
        for key in sorted({k for r in group for k in r.get("timings", {})}):
            values = [r["timings"][key] for r in group if r["timings"].get(key) is not None]
            entry[f"time_{key}"] = float(np.mean(values)) if values else None
        swings = [validation_swing(r["history"]) for r in group]
        ranges = [s["range"] for s in swings if s["range"] is not None]
        steps = [s["mean_step"] for s in swings if s["mean_step"] is not None]
        entry["val_swing_range"] = float(np.mean(ranges)) if ranges else None
        entry["val_swing_step"] = float(np.mean(steps)) if steps else None
        table.setdefault(method, {})[column] = entry
    methods = _ordered(table, method_order)
    columns = _ordered({c for row in table.values() for c in row}, ("none", "gaussian", "rician"))
    return {"methods": methods, "columns": columns, "cells": table}


def _cell(entry: dict | None, key: str, scale: float = 100.0) -> str:
    if entry is None or entry.get(key) is None:
        return "-"
    value = entry[key]
    return f"{scale * value['mean']:.2f} +- {scale * value['std']:.2f} (n={entry['n']})"


def markdown_tables(summary: dict) -> str:
    """Accuracy (best-validation and last checkpoints), macro-F1, times and validation swing."""
    methods, columns, cells = summary["methods"], summary["columns"], summary["cells"]

    def table(title, render):
        lines = [f"#### {title}", "", "| method | " + " | ".join(columns) + " |",
                 "| --- |" + " --- |" * len(columns)]
        for method in methods:
            lines.append(f"| {method} | " + " | ".join(render(cells[method].get(c)) for c in columns) + " |")
        return "\n".join(lines) + "\n"

    def seconds(key):
        return lambda e: "-" if e is None or e.get(key) is None else f"{e[key]:.0f}"

    def swing(e):
        if e is None or e["val_swing_range"] is None:
            return "-"
        return f"{100 * e['val_swing_range']:.1f} / {100 * e['val_swing_step']:.1f}"

    parts = [
        table("Test accuracy %, best-validation checkpoint (mean +- std over seeds)", lambda e: _cell(e, "best_accuracy")),
        table("Test accuracy %, last-epoch checkpoint", lambda e: _cell(e, "last_accuracy")),
        table("Test macro-F1 %, best-validation checkpoint", lambda e: _cell(e, "best_macro_f1")),
        table("Test balanced accuracy % (mean per-class recall), best-validation checkpoint",
              lambda e: _cell(e, "best_balanced_accuracy")),
        table("Training wall time per run, s (mean)", seconds("time_train_s")),
        table("Influence step wall time, s (mean; ISR / ISP only)", seconds("time_influence_s")),
        table("Validation accuracy swing over the second half of training, points: range / mean epoch-to-epoch "
              "change (mean over seeds)", swing),
    ]
    audited = [(m, c) for m in methods for c in columns if (cells[m].get(c) or {}).get("audit")]
    if audited:
        lines = ["#### Label audit: precision % at k = number of flipped labels (mean +- std over seeds)", "",
                 "| method | column | influence ranking | loss ranking | random |", "| --- | --- | --- | --- | --- |"]
        for method, column in audited:
            audit = cells[method][column]["audit"]
            lines.append(f"| {method} | {column} | " + " | ".join(
                f"{100 * audit[r]['mean']:.1f} +- {100 * audit[r]['std']:.1f}" for r in ("influence", "loss", "random"))
                + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot_accuracy_bars(summary: dict, path: str, checkpoint: str = "best") -> None:
    """Grouped bars: one group per method, one bar per column, error bars = std over seeds."""
    methods, columns, cells = summary["methods"], summary["columns"], summary["cells"]
    width = 0.8 / max(1, len(columns))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods) + 2), 4))
    x = np.arange(len(methods))
    for k, column in enumerate(columns):
        means = [100 * cells[m][column][f"{checkpoint}_accuracy"]["mean"] if column in cells[m] else np.nan
                 for m in methods]
        stds = [100 * cells[m][column][f"{checkpoint}_accuracy"]["std"] if column in cells[m] else 0 for m in methods]
        ax.bar(x + (k - (len(columns) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=column)
    stats = [e[f"{checkpoint}_accuracy"] for row in cells.values() for e in row.values() if e[f"{checkpoint}_accuracy"]]
    low = min(100 * (e["mean"] - (e["std"] or 0)) for e in stats)  # whole error bars stay in view
    high = max(100 * (e["mean"] + (e["std"] or 0)) for e in stats)
    ax.set_ylim(max(0, low - 5), min(100, high + 2))
    ax.set_xticks(x, methods, rotation=30, ha="right")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"Test accuracy ({'best-validation' if checkpoint == 'best' else 'last-epoch'} checkpoint), "
                 "mean +- std over seeds")
    ax.legend(title="training noise", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, not on them
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path, dpi=120)


def plot_validation_curves(runs: list[dict], summary: dict, path: str) -> None:
    """Validation accuracy per epoch, mean over seeds (shaded: min to max), one panel per column."""
    cells = group_runs(runs)
    columns = summary["columns"]
    fig, axes = plt.subplots(1, len(columns), figsize=(6 * len(columns), 4.5), squeeze=False, sharey=True)
    colours = plt.get_cmap("tab10" if len(summary["methods"]) <= 10 else "tab20")
    for ax, column in zip(axes[0], columns):
        for method in summary["methods"]:
            curves = [[h["val_accuracy"] for h in r["history"]] for r in cells.get((method, column), [])
                      if r["history"]]
            if not curves:
                continue
            length = min(map(len, curves))
            values = 100 * np.array([c[:length] for c in curves])
            epochs = np.arange(1, length + 1)
            colour = colours(summary["methods"].index(method) % colours.N)
            line, = ax.plot(epochs, values.mean(axis=0), label=method, color=colour)
            ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.08)
        ax.set_title(f"{column} training noise")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    axes[0][0].set_ylabel("validation accuracy % (clean; band: min to max over seeds)")
    save_figure(fig, path, dpi=120)


def write_report(runs: list[dict], output_dir: str, method_order=(), header: str = "") -> tuple[dict, str]:
    """``results.json``, ``results.md``, ``accuracy_best.png``, ``accuracy_last.png``, ``validation_curves.png``.

    Returns the summary and the markdown written to ``results.md``."""
    summary = aggregate(runs, method_order)
    os.makedirs(output_dir, exist_ok=True)
    write_json(os.path.join(output_dir, "results.json"), {"summary": summary, "runs": runs})
    markdown = header + markdown_tables(summary)
    with open(os.path.join(output_dir, "results.md"), "w") as handle:
        handle.write(markdown)
    if runs:
        for tag in CHECKPOINTS:
            plot_accuracy_bars(summary, os.path.join(output_dir, f"accuracy_{tag}.png"), tag)
        plot_validation_curves(runs, summary, os.path.join(output_dir, "validation_curves.png"))
    return summary, markdown
