"""How accuracy depends on framing: the test split zoomed, moved and cut, for one or two configurations.

    python scripts/bench_framing.py --checkpoints RUN0/models/model.pt,RUN1/models/model.pt --out OUT
    python scripts/bench_framing.py --checkpoints A0,A1 --baseline B0,B1 --names lever,product --out OUT

Each checkpoint is evaluated on its own test split (rebuilt from the data and seed it was trained on,
``robustmri.engine.trained_model``) under the variants of :mod:`robustmri.bench.framing`. ``--baseline``:
checkpoints of another configuration, paired with ``--checkpoints`` by position (the same seeds): the table
adds the paired difference per variant (95 % t interval over the pairs, pairs where the first scored higher).
Writes ``framing.json``, ``framing.md`` and ``framing.png`` (accuracy against zoom and against shift) into ``--out``.
``--guard true``: also what a framing check (refuse a head covering more than ``MAX_HEAD_BORDER_SHARE`` of the
image border, ``robustmri.bench.framing.guard_by_shift``) would refuse under every shift of the honest bench, and
how accurate the refused and the kept slices are.
"""

from __future__ import annotations

import logging
import os
import sys

import fire
import numpy as np

from robustmri.bench.framing import (
    MAX_HEAD_BORDER_SHARE,
    MOVES,
    SKULL_CUT,
    ZOOMS,
    accuracy_by_variant,
    border_shares,
    framing_variants,
    guard_by_shift,
    variant_names,
)
from robustmri.bench.machine import write_measurement
from robustmri.bench.runs import as_list
from robustmri.bench.shifts import REFERENCE, _cell, synthetic_raw_images
from robustmri.bench.stats import _table, paired_difference
from robustmri.data.shift_families import SEVERITIES, family_shifts
from robustmri.engine.trained_model import trained_model
from robustmri.options import as_flag

BUNDLE = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bundle"))


def _measure(checkpoint: str, bundle_dir: str, dataset_dir: str | None, guard: bool = False) -> dict:
    config, network, data = trained_model(bundle_dir, checkpoint, dataset_dir=dataset_dir)
    size, preprocess = int(config.get_parsed_content("spatial_size")), config.get_parsed_content("preprocess")
    seed = int(config.get_parsed_content("seed"))
    raw = synthetic_raw_images(data, config.get_parsed_content("synthetic_patients"), size, seed)
    sets, skipped = framing_variants(data.split("test"), size, preprocess, raw_images=raw)
    if not any(sets.values()):
        raise SystemExit(f"{checkpoint}: no test slice could be prepared ({len(skipped)} skipped, e.g. "
                         f"{skipped[0][1] if skipped else 'an empty test split'})")
    measured = {"checkpoint": checkpoint, "seed": seed, "spatial_size": size, "preprocess": preprocess,
                "skipped": skipped, "variants": accuracy_by_variant(network, sets, data.class_names)}
    if guard:
        measured["training_border_shares"] = border_shares(data.split("train"), raw_images=raw)
        measured["guard"] = guard_by_shift(network, data.split("test"), size, preprocess,
                                           list(family_shifts(size, preprocess)), raw_images=raw)
    return measured


def _guard_mean(runs: list[dict], names: list[str], field: str) -> str:
    """``field`` of the framing check in %, each run's mean over the shifts ``names`` (where measured), then over runs."""
    per_run = [np.mean(values) for run in runs
               if (values := [run["guard"][n][field] for n in names if run["guard"][n][field] is not None])]
    return f"{100 * np.mean(per_run):.1f}" if per_run else "–"


def _guard_table(runs: list[dict], size: int) -> str:
    """Markdown: what the framing check refuses, by group of shifts (mean over checkpoints of each group's mean)."""
    catalog = family_shifts(size)
    groups = [(f"`{REFERENCE}` (home)", [REFERENCE]), (f"`{SKULL_CUT}`", [SKULL_CUT])] + [
        (f"{severity}, without `{SKULL_CUT}` ({len(names)})", names) for severity in SEVERITIES
        if (names := [n for n, shift in catalog.items() if shift.severity == severity and n != SKULL_CUT])]
    fields = ("refused", "accuracy", "kept_accuracy", "refused_accuracy")
    rows = [[label, *(_guard_mean(runs, names, field) for field in fields)] for label, names in groups]
    shares = [run["training_border_shares"] for run in runs]
    training = ("Training splits (as read, before augmentation): the head's largest share of the border "
                + ", ".join(f"{share['max']:.2f}" for share in shares) + "; slices above the limit: "
                + ", ".join(str(share["above_limit"]) for share in shares) + " (one value per checkpoint).\n")
    return (training + f"\nA framing check (a head covering more than {100 * MAX_HEAD_BORDER_SHARE:.0f} % of "
            "the image border is not classified) on the honest bench's test renderings, mean over checkpoints "
            f"({len(runs)}): the share refused, and the accuracy of every prepared slice, of those kept and of those "
            "refused (classified without the check).\n\n"
            + _table(["shifts", "refused %", "accuracy, all %", "accuracy, kept %", "accuracy, refused %"], rows))


def _figure(report: dict, path: str) -> None:
    import matplotlib.pyplot as plt

    from robustmri.outputs import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for name, runs in report["configurations"].items():
        for axis, (xs, label) in zip(axes, ((ZOOMS, "zoom {:g}"), ((0.0, *MOVES), "move {:g}"))):
            keys = ["zoom 1" if x == 0 else label.format(x) for x in xs]
            values = np.array([[100 * run["variants"][k]["accuracy"] for k in keys] for run in runs])
            axis.errorbar(xs, values.mean(0), yerr=values.std(0, ddof=1) if len(values) > 1 else None, marker="o",
                          capsize=3, label=f"{name} ({len(runs)} seed{'s' if len(runs) > 1 else ''})")
            cut = np.mean([100 * run["variants"][SKULL_CUT]["accuracy"] for run in runs])
            axis.axhline(cut, linestyle=":", linewidth=1, color=axis.lines[-1].get_color())
    axes[0].set_xlabel("zoom of the prepared slice about its centre")
    axes[1].set_xlabel("shift of the prepared slice, share of its side")
    axes[0].set_ylabel("test accuracy % (dotted: skull_cut)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Accuracy against framing (mean ± std over seeds)")
    save_figure(fig, path)


def main(checkpoints: str, out: str, baseline: str = "", names: str = "", dataset_dir: str | None = None,
         bundle_dir: str = BUNDLE, guard: bool = False) -> dict:
    """Measure ``--checkpoints`` (and ``--baseline``) under the framing variants; write the report into ``--out``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    groups = [as_list(checkpoints)] + ([as_list(baseline)] if baseline else [])
    guard = as_flag(guard, "guard")
    labels = as_list(names) or (["checkpoints", "baseline"][:len(groups)])
    if len(labels) != len(groups):
        raise SystemExit(f"--names needs {len(groups)} name(s), got {len(labels)}")
    if baseline and len(groups[0]) != len(groups[1]):
        raise SystemExit("--baseline needs as many checkpoints as --checkpoints (paired by position)")
    missing = [c for group in groups for c in group if not os.path.isfile(c)]
    if missing:
        raise SystemExit(f"no checkpoint at {', '.join(missing)}")
    report = {"configurations": {label: [_measure(c, bundle_dir, dataset_dir, guard) for c in group]
                                 for label, group in zip(labels, groups)}}
    rows = []
    for variant in variant_names():
        row = [variant]
        for label in labels:
            values = [100 * run["variants"][variant]["accuracy"] for run in report["configurations"][label]]
            row.append(f"{np.mean(values):.1f}" + (f" ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else ""))
        if baseline:
            first, second = (report["configurations"][label] for label in labels)
            difference = paired_difference(
                {k: 100 * run["variants"][variant]["accuracy"] for k, run in enumerate(first)},
                {k: 100 * run["variants"][variant]["accuracy"] for k, run in enumerate(second)})
            row.append(_cell(difference))
        rows.append(row)
    header = ["variant", *(f"{label}: accuracy %" for label in labels)] + (
        [f"{labels[0]} − {labels[1]}, points"] if baseline else [])
    table = ("Test accuracy under framing variants (robustmri.bench.framing): zoom and move act on the prepared "
             "input; skull_cut is the shift bench's window of 0.6 of the raw frame, then the model's "
             "preprocessing.\n\n" + _table(header, rows) + "\n")
    if guard:
        for label in labels:
            runs = report["configurations"][label]
            table += f"\n**{label}**:\n" + _guard_table(runs, runs[0]["spatial_size"])
    os.makedirs(out, exist_ok=True)
    _figure(report, os.path.join(out, "framing.png"))
    write_measurement(out, "framing", report, table, "bench_framing.py", sys.argv[1:])
    return report


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
