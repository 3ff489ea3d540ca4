"""Does a site-calibrated abstention threshold accept what it promises? Every site refit on the honest shift bench.

    python scripts/bench_site_threshold.py --checkpoints RUN0/models/model.pt,RUN1/models/model.pt --out OUT \
        [--selection_seeds 0,1,2,3,4] [--confirmation_seeds 5,6,7,8,9] [--cache_dir BENCH/shifted/families]

Each checkpoint (trained by the benchmark's ``shift2_cpu`` profile, with its abstention state beside it) is
calibrated under every refit of ``robustmri.deploy.calibration.SITE_REFITS`` on each shift's validation
renderings, as :mod:`robustmri.bench.site_threshold` describes: split by patient into halves (selection) and
whole against the test renderings (confirmation). Writes ``site_threshold.json`` and ``site_threshold.md`` into
``--out``: per refit, the share accepted, its mean absolute deviation from the target (per shift, then
averaged), the error among the accepted, the accepted and right, and the share of another contrast accepted;
and each refit's deviation paired against ``full`` over the confirmation seeds (95 % t interval, seeds where
the refit deviated less, minimum detectable effect). ``--cache_dir``: the bench's renderings (``<dir>/<size>px``);
``--shifts``: a comma-separated subset of the bench's shifts (default: all of them; ``none`` is always rendered).
"""

from __future__ import annotations

import logging
import os
import sys

import fire
import numpy as np

from robustmri.abstention.fit import ensure_state
from robustmri.abstention.mahalanobis import TARGET_ACCEPTANCE
from robustmri.bench.machine import write_measurement
from robustmri.bench.runs import as_list
from robustmri.bench.shifts import REFERENCE, _cell, shifted_test_sets, synthetic_raw_images
from robustmri.bench.site_threshold import site_threshold_checks, summary
from robustmri.bench.stats import _table, mde_cell, paired_difference
from robustmri.bench.tumour_free import NIBABEL_VOLUMES, nibabel_volume_slices, prepare_set
from robustmri.data.preprocessing import preprocessing_by_name
from robustmri.data.shift_families import SEVERITIES, family_shifts
from robustmri.deploy.calibration import SITE_REFITS
from robustmri.engine.trained_model import trained_model

BUNDLE = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bundle"))


def _measure(checkpoint: str, bundle_dir: str, dataset_dir: str | None, cache_dir: str | None, refits,
             shifts: list[str] | None) -> dict:
    config, network, data = trained_model(bundle_dir, checkpoint, dataset_dir=dataset_dir)
    size, preprocess = int(config.get_parsed_content("spatial_size")), config.get_parsed_content("preprocess")
    seed = int(config.get_parsed_content("seed"))
    home = ensure_state(checkpoint, bundle_dir, network=network, dataset_dir=dataset_dir)
    raw = synthetic_raw_images(data, config.get_parsed_content("synthetic_patients"), size, seed)
    rendered = {}
    for split in ("val", "test"):
        sets, _ = shifted_test_sets(data.split(split), size, [preprocess], shifts, workers=2, catalog="families",
                                    cache_dir=os.path.join(cache_dir, f"{size}px") if cache_dir else None,
                                    raw_images=raw)
        rendered[split] = sets[preprocess]
    prepare = preprocessing_by_name(preprocess)
    other = [image for name in NIBABEL_VOLUMES if (found := nibabel_volume_slices(name)) is not None
             for image in prepare_set(lambda raw_slice: prepare(np.asarray(raw_slice, np.float32), size), found)[0]]
    if not other:
        raise SystemExit("the installed nibabel ships no test volumes: the other-contrast check needs them")
    checks = site_threshold_checks(network, checkpoint, home, rendered["val"], rendered["test"],
                                   np.stack(other)[:, None].astype(np.float32), len(data.class_names), refits,
                                   seed=seed)
    return {"checkpoint": checkpoint, "seed": seed, "spatial_size": size, "preprocess": preprocess,
            "other_contrast_slices": len(other), **checks}


def _deviation(entry: dict, shifts: list[str], checks, refit: str, target: float) -> float | None:
    values = [abs(entry["shifts"][s][c][refit]["accepted"] - target) for s in shifts if s in entry["shifts"]
              for c in checks if refit in entry["shifts"][s].get(c, {})]
    return 100 * float(np.mean(values)) if values else None


def _rows(runs: list[dict], groups: list[tuple[str, list[str]]], checks, refits, target: float) -> list[list[str]]:
    rows = []
    for refit in refits:
        for label, shifts in groups:
            def pct(field):
                values = [summary([run], shifts, field, checks, refit) for run in runs]
                values = [v for v in values if v is not None]
                return f"{100 * np.mean(values):.1f}" if values else "–"
            deviation = [d for run in runs if (d := _deviation(run, shifts, checks, refit, target)) is not None]
            rows.append([f"`{refit}`", label, pct("accepted"), f"{np.mean(deviation):.1f}" if deviation else "–",
                         pct("selective_risk"), pct("right_and_accepted"), pct("other_contrast_accepted")])
    return rows


def main(checkpoints: str, out: str, selection_seeds: str = "0,1,2,3,4", confirmation_seeds: str = "5,6,7,8,9",
         refits: str = ",".join(SITE_REFITS), shifts: str = "", cache_dir: str | None = None,
         dataset_dir: str | None = None,
         bundle_dir: str = BUNDLE, target_acceptance: float = TARGET_ACCEPTANCE) -> dict:
    """Measure every refit on ``--checkpoints``; write the report into ``--out``."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    paths, refits = as_list(checkpoints), as_list(refits)
    missing = [c for c in paths if not os.path.isfile(c)]
    if missing:
        raise SystemExit(f"no checkpoint at {', '.join(missing)}")
    unknown = [r for r in refits if r not in SITE_REFITS]
    if unknown:
        raise SystemExit(f"unknown refit(s) {unknown}; valid: {', '.join(SITE_REFITS)}")
    runs = [_measure(c, bundle_dir, dataset_dir, cache_dir, refits, as_list(shifts) or None) for c in paths]
    report = {"refits": {r: SITE_REFITS[r] for r in refits}, "target_acceptance": target_acceptance, "runs": runs}
    selection = [run for run in runs if run["seed"] in {int(s) for s in as_list(selection_seeds)}]
    confirmation = [run for run in runs if run["seed"] in {int(s) for s in as_list(confirmation_seeds)}]
    catalog = family_shifts(runs[0]["spatial_size"])
    shifted = [name for name in catalog if name != REFERENCE and name in runs[0]["shifts"]]
    groups = [(f"`{REFERENCE}` (home)", [REFERENCE])] + [
        (f"{severity} ({len(names)})", names) for severity in SEVERITIES
        if (names := [n for n in shifted if catalog[n].severity == severity])] + [
        (f"all shifted ({len(shifted)})", shifted)]
    header = ["refit", "shifts", "accepted %", "mean |accepted − target|, points", "error among accepted %",
              "right and accepted %", "other contrast accepted %"]
    parts = [f"Site calibration under each refit (target acceptance {100 * target_acceptance:g} %); means over "
             "shifts, checks and seeds.\n"]
    for title, subset, checks in (("Selection: calibrated on one half of a shift's validation renderings (by "
                                   "patient), checked on the other half, both ways", selection, ("half_a", "half_b")),
                                  ("Confirmation: calibrated on a shift's validation renderings, checked on its test "
                                   "renderings", confirmation, ("test",))):
        if not subset:
            continue
        parts.append(f"**{title}** (seeds {', '.join(str(r['seed']) for r in subset)}):\n\n"
                     + _table(header, _rows(subset, groups, checks, refits, target_acceptance)))
        if "full" in refits and len(subset) > 1:
            rows = []
            full = {run["seed"]: _deviation(run, shifted, checks, "full", target_acceptance) for run in subset}
            for refit in [r for r in refits if r != "full"]:
                other = {run["seed"]: _deviation(run, shifted, checks, refit, target_acceptance) for run in subset}
                difference = paired_difference(full, other)  # full − refit: positive where the refit is closer
                rows.append([f"`{refit}`", _cell(difference), mde_cell(difference)])
            parts.append("Mean |accepted − target| over the shifted renderings, `full` − refit (points; positive: "
                         "the refit is closer to the target): mean [95 % CI] k/n seeds where the refit was closer; "
                         "MDE at 80 % power.\n\n" + _table(["refit", "full − refit, points", "MDE"], rows))
    table = "\n".join(parts)
    write_measurement(out, "site_threshold", report, table, "bench_site_threshold.py", sys.argv[1:])
    return report


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
