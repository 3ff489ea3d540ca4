"""Statistics that tell methods apart: paired differences over seeds, patient-grouped bootstrap intervals.

Mean +- std per method (``report.py``) hides that every method of one seed sees the same patient split and
the same noisy pixels: the seed-to-seed spread is shared, so a method is compared with the baseline seed by
seed (:func:`paired_difference`, a paired t interval). Within one run, the test slices of one patient are
not independent: :func:`grouped_bootstrap_ci` resamples patients, not slices.

Records (one line of ``runs.jsonl`` per trained model) carry ``test_by_p``:
``{checkpoint: {p: report}}`` where ``p`` (a string such as ``"0"``, ``"0.5"``, ``"1"``) is the share of
noisy test images and a report holds ``accuracy`` and ``accuracy_ci95`` (the grouped bootstrap interval).
Older records with ``test`` (``{checkpoint: report}``) and ``test_noise_fraction`` are read as one p.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _scipy_stats

from robustmri.bench.report import _metric, _ordered, validation_swing

MISSING = "–"
_NOISE_ORDER = ("none", "gaussian", "rician")


def t_quantile(q: float, dof: int) -> float:
    """Student t quantile (scipy)."""
    return float(_scipy_stats.t.ppf(q, dof))


def paired_difference(values: dict[int, float], baseline: dict[int, float], level: float = 0.95) -> dict:
    """``values - baseline`` over the seeds present in both (same unit as the inputs).

    Returns ``n``, ``mean``, ``std`` (ddof=1; None for n < 2), ``ci`` ([low, high], the t interval with
    n - 1 degrees of freedom; None for n < 2), ``positive`` (seeds where the difference is > 0),
    ``seeds`` (sorted) and ``level``. With no common seed, ``mean`` is None as well."""
    seeds = sorted(set(values) & set(baseline))
    diffs = np.array([values[s] - baseline[s] for s in seeds], dtype=float)
    n = len(seeds)
    result = {"n": n, "mean": None, "std": None, "ci": None, "positive": int((diffs > 0).sum()),
              "seeds": seeds, "level": level}
    if n == 0:
        return result
    result["mean"] = float(diffs.mean())
    if n >= 2:
        std = float(diffs.std(ddof=1))
        half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
        result["std"] = std
        result["ci"] = [result["mean"] - half, result["mean"] + half]
    return result


def minimum_detectable_effect(std: float, n: int, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest true mean paired difference a design of ``n`` seeds detects with probability ``power``.

    Two-sided paired t test at ``1 - level``, the paired differences' standard deviation ``std``
    (same unit as the result): ``(t[1 - alpha/2] + t[power]) * std / sqrt(n)`` with n - 1 degrees
    of freedom, the usual approximation to the noncentral t power.
    """
    if n < 2:
        raise ValueError(f"a minimum detectable effect needs at least 2 paired seeds, got {n}")
    dof = n - 1
    return (t_quantile(0.5 + level / 2, dof) + t_quantile(power, dof)) * float(std) / math.sqrt(n)


def grouped_bootstrap_ci(correct, groups, n_boot: int = 2000, level: float = 0.95,
                         seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of accuracy that resamples patient groups with replacement.

    ``correct``: per slice, 1/True when the prediction was right; ``groups``: per slice, its patient key.
    A drawn group brings all its slices; each resample's accuracy is its correct slices over its slices."""
    correct = np.asarray(correct, dtype=float).ravel()
    groups = np.asarray(groups).ravel()
    if correct.shape != groups.shape:
        raise ValueError(f"correct and groups differ in length: {correct.shape[0]} vs {groups.shape[0]}")
    if not correct.size:
        raise ValueError("no slices to bootstrap")
    _, index = np.unique(groups, return_inverse=True)
    index = index.ravel()
    n_groups = int(index.max()) + 1
    right = np.bincount(index, weights=correct, minlength=n_groups)
    size = np.bincount(index, minlength=n_groups).astype(float)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_groups, size=(n_boot, n_groups))  # every resample draws as many groups as there are
    accuracy = right[drawn].sum(axis=1) / size[drawn].sum(axis=1)
    alpha = 1.0 - level
    low, high = np.quantile(accuracy, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# --- records -----------------------------------------------------------------------------------------------

def _p_key(p) -> str:
    return f"{float(p):g}"


def reports_by_p(run: dict, checkpoint: str) -> dict[str, dict]:
    """``{p: report}`` of one checkpoint of a record (old single-p records: their one p)."""
    if "test_by_p" in run:
        return run["test_by_p"].get(checkpoint) or {}
    if "test" in run and checkpoint in run["test"]:
        return {_p_key(run.get("test_noise_fraction", 1.0)): run["test"][checkpoint]}
    return {}


def _value(report: dict | None, metric: str) -> float | None:
    if report is None:
        return None
    try:
        return _metric(report, metric)
    except KeyError:
        return None


def _noise_label(run: dict) -> str:
    """The training noise; the label-flip rate joins it when labels were flipped (as in report.column_of)."""
    rate = run.get("label_noise_rate") or 0.0
    return f"{run['noise']}, labels r={rate:g}" if rate else run["noise"]


def _signed(points: float) -> str:
    text = f"{abs(points):.1f}"
    if text == "0.0":
        return text
    return ("+" if points > 0 else "−") + text


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _methods_in_order(runs: list[dict], first: str | None = None) -> list[str]:
    methods = [first] if first is not None else []
    for run in runs:
        if run["method"] not in methods:
            methods.append(run["method"])
    return methods


def paired_table(runs: list[dict], baseline: str = "naive", checkpoint: str = "last",
                 metric: str = "accuracy") -> str:
    """Markdown: per method, per (training noise, p), mean ± std over seeds in percent and, against the
    baseline on the same (noise, p, seed), the paired difference in points with its t interval and the
    count of seeds where the method did better. A seed run twice counts once (its last record)."""
    # values[(method, noise, p)][seed] = metric
    values: dict[tuple[str, str, str], dict[int, float]] = {}
    for run in runs:
        for p, report in reports_by_p(run, checkpoint).items():
            value = _value(report, metric)
            if value is not None:
                values.setdefault((run["method"], _noise_label(run), p), {})[run["seed"]] = float(value)
    methods = [m for m in _methods_in_order(runs, baseline) if m == baseline or any(k[0] == m for k in values)]
    noises = _ordered({k[1] for k in values}, _NOISE_ORDER)
    columns = [(noise, p) for noise in noises
               for p in sorted({k[2] for k in values if k[1] == noise}, key=float)]

    header = ["method"]
    for noise, p in columns:
        header += [f"{noise}, p={p}", f"{noise}, p={p}: Δ vs {baseline}"]
    rows, spreads = [], {}
    for method in methods:
        row = [method]
        for noise, p in columns:
            seeds = values.get((method, noise, p), {})
            if seeds:
                pct = 100 * np.array(list(seeds.values()))
                std = pct.std(ddof=1) if len(pct) > 1 else 0.0
                row.append(f"{pct.mean():.1f} ± {std:.1f} ({len(pct)})")
            else:
                row.append(MISSING)
            diff = paired_difference(seeds, values.get((baseline, noise, p), {})) if method != baseline else None
            if diff is None or diff["n"] == 0:
                row.append(MISSING)
            else:
                interval = "" if diff["ci"] is None else \
                    f" [{_signed(100 * diff['ci'][0])}, {_signed(100 * diff['ci'][1])}]"
                row.append(f"{_signed(100 * diff['mean'])}{interval}, {diff['positive']}/{diff['n']}")
                if diff["std"] is not None:
                    spreads.setdefault((noise, p), []).append((diff["std"], diff["n"]))
        rows.append(row)
    rows.append(["minimum detectable effect"] + [
        cell for noise, p in columns for cell in ("", _detectable(spreads.get((noise, p), [])))])
    checkpoint_words = "last-epoch" if checkpoint == "last" else "best-validation" if checkpoint == "best" \
        else checkpoint
    legend = (f"Test {metric.replace('_', ' ')} in %, {checkpoint_words} checkpoint. Columns are the training "
              f"noise and p, the share of noisy test images (p=1: every test image noisy as in training, p=0: "
              f"all clean). Each first column is mean ± std over seeds (n seeds). Each Δ column is the paired "
              f"difference with {baseline} trained on the same noise and seed (same patient split, same noisy "
              f"pixels), in points: the mean over seeds, its 95 % CI (paired t interval over seeds, n − 1 "
              f"degrees of freedom; none with one seed) and k/n, the seeds where the method beat {baseline}. "
              f"The last row is the design's minimum detectable effect in points: the true paired difference a "
              f"two-sided paired t test at 5 % detects with 80 % power, from the root mean square of the column's "
              f"paired SDs and its fewest seeds. {MISSING}: no runs.")
    return legend + "\n\n" + _table(header, rows)


def mde_cell(difference: dict) -> str:
    """The minimum detectable effect of one paired difference (:func:`paired_difference`, in its own unit), for a
    table cell; ``–`` where the difference has no spread (fewer than 2 seeds)."""
    if difference["std"] is None:
        return MISSING
    return f"{minimum_detectable_effect(difference['std'], difference['n']):.1f}"


def _detectable(spreads: list[tuple[float, int]], scale: float = 100.0) -> str:
    """The minimum detectable effect of one column from its methods' (paired SD, seeds), times ``scale`` (100: SDs
    of fractions shown in points; 1: SDs already in points)."""
    if not spreads:
        return MISSING
    std = math.sqrt(float(np.mean([sd ** 2 for sd, _ in spreads])))
    return f"{scale * minimum_detectable_effect(std, min(n for _, n in spreads)):.1f}"


def headroom_table(runs: list[dict], checkpoint: str = "best", metric: str = "accuracy") -> str:
    """Markdown: naive training on clean images against naive training on each noise, paired by seed. Row
    ``naive, clean-trained``: tested on the same test images as the noisy-trained runs (``test_by_noise`` of the
    clean runs, :data:`robustmri.bench.benchmark.HEADROOM_NOISES`), at each share p of noisy test images. Row
    ``naive, clean-trained, clean test images``: on clean test images in every column; its Δ at p = 1 is the
    headroom, clean-trained on clean images minus noisy-trained on noisy images. Empty without clean-trained
    naive runs."""
    clean = [r for r in runs if r["method"] == "naive" and r["noise"] == "none" and "test_by_noise" in r
             and not r.get("label_noise_rate")]
    if not clean:
        return ""
    rows = [{**r, "method": "naive, clean-trained", "noise": noise, "test_by_p": by_tag}
            for r in clean for noise, by_tag in r["test_by_noise"].items()]
    # the same model on clean test images, in every column: against naive at p = 1 it is what the noise costs, the
    # most a noise-robust method could win back (the noisy pixels cannot hold more than the clean ones)
    rows += [{**r, "method": "naive, clean-trained, clean test images", "noise": noise,
              "test_by_p": {tag: {p: by_p["0"] for p in r["test_by_noise"][noise].get(tag, {})}
                            for tag, by_p in r["test_by_p"].items() if "0" in by_p}}
             for r in clean for noise in r["test_by_noise"]]
    noisy = [r for r in runs if r["method"] == "naive" and r["noise"] in {x["noise"] for x in rows}
             and not r.get("label_noise_rate")]
    return paired_table(noisy + rows, baseline="naive", checkpoint=checkpoint, metric=metric)


def run_interval_table(runs: list[dict], checkpoint: str = "last", p: str = "1") -> str:
    """Markdown, one row per run: method, training noise, seed, test accuracy % at ``p`` and the
    patient-grouped bootstrap 95 % interval the run recorded (``accuracy_ci95``)."""
    p = _p_key(p)
    methods = _methods_in_order(runs)
    ordered = sorted(runs, key=lambda r: (methods.index(r["method"]), _noise_label(r), r["seed"]))
    rows = []
    for run in ordered:
        report = reports_by_p(run, checkpoint).get(p)
        accuracy = _value(report, "accuracy")
        interval = (report or {}).get("accuracy_ci95")
        rows.append([run["method"], _noise_label(run), str(run["seed"]),
                     MISSING if accuracy is None else f"{100 * accuracy:.1f}",
                     MISSING if not interval else f"[{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"])
    legend = (f"Test accuracy per run, {checkpoint} checkpoint, p={p} (share of noisy test images), with the "
              f"95 % percentile bootstrap interval that resamples test patients (all slices of a patient together).")
    return legend + "\n\n" + _table(["method", "noise", "seed", "accuracy %", "95 % interval (patients)"], rows)


def stability(runs: list[dict], method: str = "naive") -> dict[str, dict]:
    """Per training noise, for ``method``: ``n``, ``seeds``, ``accuracy_mean`` and ``accuracy_std`` (ddof=1;
    None for one seed) of the last-epoch test accuracy at p as trained (p=1; the record's only p for old
    records), and ``val_mean_step``: the mean over seeds of ``validation_swing(history)["mean_step"]``."""
    by_noise: dict[str, dict] = {}
    for run in runs:
        if run["method"] != method:
            continue
        entry = by_noise.setdefault(_noise_label(run), {"accuracy": {}, "steps": {}})
        reports = reports_by_p(run, "last")
        as_trained = reports.get("1") if "test_by_p" in run else next(iter(reports.values()), None)
        accuracy = _value(as_trained, "accuracy")
        if accuracy is not None:
            entry["accuracy"][run["seed"]] = float(accuracy)
        step = validation_swing(run.get("history") or [])["mean_step"]
        if step is not None:
            entry["steps"][run["seed"]] = step
    result = {}
    for noise in _ordered(by_noise, _NOISE_ORDER):
        accuracy = np.array(list(by_noise[noise]["accuracy"].values()), dtype=float)
        steps = list(by_noise[noise]["steps"].values())
        result[noise] = {
            "n": len(accuracy),
            "seeds": sorted(by_noise[noise]["accuracy"]),
            "accuracy_mean": float(accuracy.mean()) if len(accuracy) else None,
            "accuracy_std": float(accuracy.std(ddof=1)) if len(accuracy) > 1 else None,
            "val_mean_step": float(np.mean(steps)) if steps else None,
        }
    return result
