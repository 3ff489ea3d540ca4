"""The site-shift test bench: the test split re-rendered under controlled site shifts, and its tables.

Each test slice is read again from its file (raw intensities, before any preprocessing),
re-rendered under every shift of a catalogue (:data:`CATALOGS`: ``site``, the first bench's
:data:`robustmri.data.site_shift.SHIFTS`; ``families``, the honest bench's
:func:`robustmri.data.shift_families.family_shifts`, tagged by family and severity) and prepared by
each preprocessing asked for, exactly as deployment would prepare a slice from another site.
A shift's realisation depends only on the slice's id and the shift (seeded with
``[id, index of the shift in SHIFTS]``, or ``[id, the shift's stream]`` in ``families``), so a slice looks
the same in every seed's test split and for every preprocessing. The shifted slices are clean (no
training noise): the bench measures the change of site, the noise protocol is measured elsewhere.

A slice that a shift or a preprocessing cannot render (e.g. no head found) is left out of
every shifted set, for every preprocessing, and counted: all accuracies of one seed are then
on the same slices, so the differences between shifts and between preprocessings are paired.

Items without a file to read (the embedded synthetic set) need their raw slices given
(``raw_images``, by item id): their stored image is already prepared, and preparing it twice
would not be what deployment does.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import zipfile

import numpy as np

from robustmri.bench.stats import _detectable, _signed, _table, mde_cell, paired_difference, reports_by_p
from robustmri.data.preprocessing import preprocessing_by_name
from robustmri.data.readers import ImageReadError, read_image
from robustmri.data.shift_families import SEVERITIES, family_shifts, render_family_shift
from robustmri.data.site_shift import SHIFTS, render_shift
from robustmri.progress import map_in_processes

logger = logging.getLogger(__name__)

#: The unshifted reference, against which every shift's drop is measured.
REFERENCE = "none"
#: The shift catalogues a bench renders: the first bench's shifts and the honest bench's tagged families.
CATALOGS = ("site", "families")


def _raw(item: dict, raw_image: np.ndarray | None) -> np.ndarray:
    if raw_image is not None:
        return np.asarray(raw_image, dtype=np.float32)
    path = str(item.get("file", ""))
    if not os.path.isfile(path):
        raise ImageReadError(path, "no file to read the raw slice from, and no raw image given")
    return read_image(path)


def _shift_seed(item_id: int, shift: str) -> list[int]:
    return [int(item_id), list(SHIFTS).index(shift)]


def catalog_shifts(catalog: str, size: int) -> list[str]:
    """The names of the shifts of ``catalog`` (one of :data:`CATALOGS`) at the training size ``size``."""
    if catalog == "site":
        return list(SHIFTS)
    if catalog == "families":
        return list(family_shifts(size))
    raise ValueError(f"unknown shift catalogue {catalog!r}; valid: {', '.join(CATALOGS)}")


def _render(raw: np.ndarray, shift: str, item_id: int, catalog: str, size: int, preprocess: str) -> np.ndarray:
    """One rendering; in ``families`` the sizes are those of ``preprocess``'s training pixel, in ``site`` the
    rendering is the same for every preprocessing."""
    if catalog == "site":
        return render_shift(raw, shift, seed=_shift_seed(item_id, shift))
    return render_family_shift(raw, shift, size, seed=[int(item_id), family_shifts(size)[shift].stream],
                               preprocess=preprocess)


def _render_item(args) -> tuple[int, dict | None, str | None]:
    """Every (preprocessing, shift) of one item: ``(index, {(preprocess, shift): [S, S]}, None)`` or a reason.

    With a cache folder, an item's renderings are kept there (one ``.npz`` per slice, named by its id
    and a digest of its raw pixels) and read back by later seeds whose splits hold the same slice."""
    index, item, size, preprocesses, shifts, cache_dir, raw_image, catalog, render_size = args
    try:
        raw = _raw(item, raw_image)
    except ImageReadError as err:
        return index, None, f"read: {err.reason}"
    # the cache is keyed by the slice's id and its pixels: an id names another slice in another data set
    # (the embedded synthetic set is generated anew for every seed)
    digest = hashlib.sha256(np.ascontiguousarray(raw, dtype=np.float32).tobytes()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"{int(item['id'])}_{digest}.npz") if cache_dir else None
    keys = [f"{name}|{shift}" for name in preprocesses for shift in shifts]
    if cache and os.path.isfile(cache):
        try:
            with np.load(cache) as stored:
                if "error" in stored:
                    return index, None, str(stored["error"])
                if all(key in stored for key in keys):
                    return index, {tuple(key.split("|")): stored[key] for key in keys}, None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:  # an unreadable cache file: render again
            logger.warning("%s: unreadable (%s); rendering again", cache, err)
    stage = "read"
    try:
        out = {}
        for shift in shifts:
            shifted = None
            for name in preprocesses:
                if shifted is None or catalog != "site":
                    stage = shift
                    shifted = _render(raw, shift, item["id"], catalog, render_size, name)
                stage = f"{shift}, then {name}"
                out[(name, shift)] = preprocessing_by_name(name)(shifted, size)
        result = (index, out, None)
    except (ImageReadError, ValueError) as err:
        reason = err.reason if isinstance(err, ImageReadError) else str(err)
        result = (index, None, f"{stage}: {reason}")
    if cache:
        payload = ({"error": np.array(result[2])} if result[1] is None
                   else {f"{name}|{shift}": image for (name, shift), image in result[1].items()})
        partial = f"{cache}.{os.getpid()}.tmp.npz"
        np.savez(partial, **payload)
        os.replace(partial, cache)  # whole or absent: an interrupted bench leaves no torn file
    return result


def shifted_test_sets(items: list[dict], size: int, preprocesses, shifts=None, workers: int = 1,
                      progress: bool = True, cache_dir: str | None = None, raw_images=None, catalog: str = "site",
                      render_size: int | None = None) -> tuple[dict[str, dict[str, list[dict]]], list[tuple[int, str]]]:
    """``({preprocess: {shift: items}}, excluded)``: ``items`` (protocol test items) re-rendered.

    Each returned item is the original with its ``image`` ([1, S, S], clean) replaced and
    ``noisy`` False. ``excluded``: ``(id, reason)`` of the items left out of every set.
    ``cache_dir``: keep each slice's renderings there (for one data set and input size only).
    ``raw_images``: the raw slice of each item id (a mapping or an array indexed by id), for items
    without a file; by default each item's ``file`` is read. ``catalog``: where the ``shifts`` (default:
    all of it) come from, one of :data:`CATALOGS` (a cache folder holds one catalogue's renderings).
    ``render_size``: the training size whose pixel states the ``families`` shifts' sizes and noise levels
    (default ``size``); a fixed one renders the same physical shift for models of every input size, which
    then prepare it to their own ``size`` (the input-size lever compares models on identical renderings).
    """
    render_size = int(size if render_size is None else render_size)
    known = catalog_shifts(catalog, render_size)
    shifts = known if shifts is None else list(shifts)
    unknown = [shift for shift in shifts if shift not in known]
    if unknown:
        raise ValueError(f"unknown shift(s) {unknown} in catalogue {catalog!r}; valid: {', '.join(known)}")
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
    preprocesses = list(preprocesses)
    if REFERENCE not in shifts:
        shifts = [REFERENCE] + shifts
    jobs = [(i, item, int(size), preprocesses, shifts, cache_dir,
             None if raw_images is None else raw_images[int(item["id"])], catalog, render_size)
            for i, item in enumerate(items)]
    results = map_in_processes(_render_item, jobs, workers, desc="site shifts", show=progress)
    sets = {name: {shift: [] for shift in shifts} for name in preprocesses}
    excluded = []
    for index, rendered, reason in results:
        item = items[index]
        if rendered is None:
            excluded.append((int(item["id"]), reason))
            continue
        for (name, shift), image in rendered.items():
            sets[name][shift].append({**item, "image": image[None].astype(np.float32), "noisy": False})
    return sets, excluded


def synthetic_raw_images(data, synthetic_patients: int, spatial_size: int, seed: int):
    """The raw embedded synthetic slices by item id (the protocol's generator, same arguments), or None for data
    read from files: the ``raw_images`` of :func:`shifted_test_sets`."""
    if not str(data.source).startswith("embedded synthetic"):
        return None
    from robustmri.data.synthetic import generate_slices

    return generate_slices(n_patients=int(synthetic_patients), size=int(spatial_size), seed=int(seed))["images"]


# --- tables -------------------------------------------------------------------------------


def _accuracy_by_seed(runs: list[dict], method: str, noise: str, shift: str,
                      key: str = "test_by_shift") -> dict[int, float]:
    return {int(r["seed"]): 100.0 * r[key][shift]["accuracy"] for r in runs
            if r["method"] == method and r["noise"] == noise and shift in r.get(key, {})}


def _cell(diff: dict) -> str:
    if diff["mean"] is None:
        return "–"
    ci = "" if diff["ci"] is None else f" [{_signed(diff['ci'][0])}, {_signed(diff['ci'][1])}]"
    return f"{_signed(diff['mean'])}{ci} {diff['positive']}/{diff['n']}"


def shift_tables(runs: list[dict], comparisons: list[tuple[str, str]] = (), key: str = "test_by_shift") -> str:
    """Markdown tables of the runs' accuracy under each shift (records with ``test_by_shift``).

    1. Per method and shift: mean ± std over seeds, and the paired drop against the unshifted
       test split of the same runs (shift − none, 95 % t interval over seeds, k/n seeds where the
       shift scored higher).
    2. For each ``(method, baseline)`` in ``comparisons``: per shift, the paired difference
       method − baseline over seeds and the design's minimum detectable effect.

    ``key``: the records' field to tabulate (``test_by_shift``, or ``val_by_shift`` for the validation split).
    """
    runs = [r for r in runs if r.get(key)]
    if not runs:
        return "No run has site-shift results."
    methods = list(dict.fromkeys(r["method"] for r in runs))
    noises = list(dict.fromkeys(r["noise"] for r in runs))
    shifts = list(dict.fromkeys(s for r in runs for s in r[key]))
    split = "validation" if key.startswith("val") else "test"
    parts = []
    for noise in noises:
        header = ["shift"] + [f"{m}" for m in methods]
        rows = []
        for shift in shifts:
            row = [shift]
            for method in methods:
                values = _accuracy_by_seed(runs, method, noise, shift, key)
                if not values:
                    row.append("–")
                    continue
                arr = np.array(list(values.values()))
                text = f"{arr.mean():.1f} ± {arr.std(ddof=1):.1f}" if len(arr) > 1 else f"{arr.mean():.1f}"
                if shift != REFERENCE:
                    text += " (" + _cell(paired_difference(values, _accuracy_by_seed(runs, method, noise, REFERENCE,
                                                                                      key))) + ")"
                row.append(text)
            rows.append(row)
        parts.append(f"Training noise {noise}. Accuracy % on the shifted {split} split (mean ± std over seeds), "
                     f"and in brackets the paired change against the unshifted split ({REFERENCE}) of the same "
                     "models: mean, 95 % CI, seeds where the shifted split scored higher.\n\n"
                     + _table(header, rows))
        for method, baseline in comparisons:
            if method not in methods or baseline not in methods:
                continue
            differences = [(shift, paired_difference(_accuracy_by_seed(runs, method, noise, shift, key),
                                                     _accuracy_by_seed(runs, baseline, noise, shift, key)))
                           for shift in shifts]
            rows = [[shift, _cell(difference), mde_cell(difference)] for shift, difference in differences]
            parts.append(f"`{method}` − `{baseline}` on the {split} split (training noise {noise}), points: mean "
                         f"[95 % CI] k/n seeds where {method} scored higher, and the design's minimum detectable "
                         "effect (80 % power).\n\n" + _table(["shift", f"{method} − {baseline}", "MDE"], rows))
    return "\n\n".join(parts)


def mean_over_shifts(runs: list[dict], method: str, noise: str, key: str = "val_by_shift") -> float | None:
    """Mean over seeds of the accuracy (%) averaged over every rendered shift, the reference included.

    The site-shift bench chooses its configuration with this on the validation split (``val_by_shift``)."""
    per_seed = [np.mean([100.0 * v["accuracy"] for v in r[key].values()]) for r in runs
                if r["method"] == method and r["noise"] == noise and r.get(key)]
    return float(np.mean(per_seed)) if per_seed else None


def summary_table(runs: list[dict], key: str = "test_by_shift") -> str:
    """Markdown, one row per (training noise, method): accuracy % on the unshifted split, averaged over
    every shift, and the shift that costs most (paired change against the unshifted split, 95 % CI,
    k/n seeds where the shifted split scored higher); means and std over seeds."""
    runs = [r for r in runs if r.get(key)]
    rows = []
    for noise in dict.fromkeys(r["noise"] for r in runs):
        for method in dict.fromkeys(r["method"] for r in runs if r["noise"] == noise):
            reference = np.array(list(_accuracy_by_seed(runs, method, noise, REFERENCE, key).values()))
            worst = worst_drop(runs, method, noise, key)
            drop = "–" if worst is None else f"{worst[0]}: " + _cell(paired_difference(
                _accuracy_by_seed(runs, method, noise, worst[0], key),
                _accuracy_by_seed(runs, method, noise, REFERENCE, key)))
            mean = mean_over_shifts(runs, method, noise, key)
            std = "" if len(reference) < 2 else f" ± {reference.std(ddof=1):.1f}"
            rows.append([noise, method, f"{reference.mean():.1f}{std}", f"{mean:.1f}", drop, str(len(reference))])
    return _table(["noise", "configuration", "unshifted", "mean over shifts", "worst shift: change [95 % CI] k/n",
                   "seeds"], rows)


def worst_drop(runs: list[dict], method: str, noise: str, key: str = "test_by_shift") -> tuple[str, float] | None:
    """The shift with the largest mean drop against the unshifted split for ``method``: ``(shift, drop in points)``."""
    worst = None
    for shift in dict.fromkeys(s for r in runs for s in r.get(key, {})):
        if shift == REFERENCE:
            continue
        diff = paired_difference(_accuracy_by_seed(runs, method, noise, shift, key),
                                 _accuracy_by_seed(runs, method, noise, REFERENCE, key))
        if diff["mean"] is not None and (worst is None or diff["mean"] < worst[1]):
            worst = (shift, diff["mean"])
    return worst


def shift_figure(runs: list[dict], path: str, noise: str | None = None) -> str | None:
    """A PNG: mean test accuracy per shift (x) for each method (one line each), error bars = std over seeds."""
    runs = [r for r in runs if r.get("test_by_shift")]
    if not runs:
        return None
    from robustmri.outputs import plt, save_figure

    noise = noise or runs[0]["noise"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    shifts = list(dict.fromkeys(s for r in runs for s in r["test_by_shift"]))
    figure, axis = plt.subplots(figsize=(max(8.0, 0.7 * len(shifts) + 3) + 2.5, 4.8))
    x = np.arange(len(shifts))
    for k, method in enumerate(methods):
        means, stds = [], []
        for shift in shifts:
            values = np.array(list(_accuracy_by_seed(runs, method, noise, shift).values()))
            means.append(values.mean() if values.size else math.nan)
            stds.append(values.std(ddof=1) if values.size > 1 else 0.0)
        axis.errorbar(x + (k - (len(methods) - 1) / 2) * 0.08, means, yerr=stds, marker="o", capsize=2,
                      label=method, linewidth=1)
    axis.axhline(100 / 3, color="grey", linestyle=":", linewidth=1, label="chance")
    axis.set_xticks(x)
    axis.set_xticklabels(shifts, rotation=40, ha="right", fontsize=8)
    axis.set_ylabel("test accuracy % (mean ± std over seeds)")
    axis.set_title(f"accuracy under site shifts (training noise {noise})")
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(figure, path)
    return path


# --- the honest bench's tables: by severity, and leave-one-family-out ---------------------------


def _mean_accuracy_by_seed(runs: list[dict], method: str, noise: str, shifts: list[str],
                           key: str = "test_by_shift") -> dict[int, float]:
    """Per seed, the accuracy (%) averaged over ``shifts``; only seeds that have every one of them."""
    by_shift = [_accuracy_by_seed(runs, method, noise, shift, key) for shift in shifts]
    seeds = set.intersection(*(set(values) for values in by_shift)) if by_shift else set()
    return {seed: float(np.mean([values[seed] for values in by_shift])) for seed in sorted(seeds)}


def _change_cell(runs: list[dict], method: str, noise: str, shifts: list[str], key: str) -> str:
    """Accuracy under ``shifts`` (averaged per seed), and in brackets its paired change against the unshifted split."""
    values = _mean_accuracy_by_seed(runs, method, noise, shifts, key)
    if not values:
        return "–"
    arr = np.array(list(values.values()))
    reference = _accuracy_by_seed(runs, method, noise, REFERENCE, key)
    return f"{arr.mean():.1f} ({_cell(paired_difference(values, reference))})"


def family_tables(runs: list[dict], shifts: dict, leave_out: dict[str, tuple[str, str]],
                  key: str = "test_by_shift") -> str:
    """Markdown: the honest bench's results by severity, and leave-one-family-out.

    ``shifts``: the catalogue (:func:`robustmri.data.shift_families.family_shifts`), for each shift's family and
    severity; ``leave_out``: ``{configuration: (the full configuration, the family it trains without)}``.

    1. One table per severity (in-range, out-of-range, new family), rows the shifts of that severity and a last
       row averaging them per seed, columns the configurations that leave nothing out: accuracy %, mean over
       seeds, and in brackets the paired change against the unshifted split of the same models (mean, 95 % t
       interval over seeds, k/n seeds where the shifted split scored higher).
    2. Left out: for each configuration trained without a family, each shift of that family (to this model a
       family it never saw) and their average: the full configuration's change, the left-out configuration's
       change, and the paired difference left-out − full on the shifted split and on the unshifted one.
    """
    runs = [r for r in runs if r.get(key)]
    if not runs:
        return "No run has site-shift results."
    split = "validation" if key.startswith("val") else "test"
    rendered = set.intersection(*(set(r[key]) for r in runs))
    parts = []
    for noise in dict.fromkeys(r["noise"] for r in runs):
        mine = [r for r in runs if r["noise"] == noise]
        methods = [m for m in dict.fromkeys(r["method"] for r in mine) if m not in leave_out]
        for severity in SEVERITIES:
            names = [name for name, shift in shifts.items() if shift.severity == severity and name in rendered]
            if not names:
                continue
            rows = [[f"`{name}`", shifts[name].family, shifts[name].description]
                    + [_change_cell(mine, method, noise, [name], key) for method in methods] for name in names]
            rows.append([f"**mean of {len(names)}**", "", ""]
                        + [_change_cell(mine, method, noise, names, key) for method in methods])
            parts.append(f"**{severity.capitalize()}** shifts, {split} split (training noise {noise}): accuracy % "
                         "(mean over seeds) and, in brackets, the paired change against the unshifted split of the "
                         "same models: mean [95 % CI] k/n seeds where the shifted split scored higher.\n\n"
                         + _table(["shift", "family", "rendering", *methods], rows))
        rows = []
        for method, (full, family) in leave_out.items():
            if not any(r["method"] == method for r in mine) or not any(r["method"] == full for r in mine):
                continue
            names = [name for name, shift in shifts.items() if shift.family == family and name in rendered]
            for label, group in [*((f"`{name}` ({shifts[name].severity})", [name]) for name in names),
                                 (f"**mean of {len(names)}**", names)]:
                difference = paired_difference(_mean_accuracy_by_seed(mine, method, noise, group, key),
                                               _mean_accuracy_by_seed(mine, full, noise, group, key))
                rows.append([f"`{method}`", family, label, _change_cell(mine, full, noise, group, key),
                             _change_cell(mine, method, noise, group, key), _cell(difference)])
            reference = paired_difference(_accuracy_by_seed(mine, method, noise, REFERENCE, key),
                                          _accuracy_by_seed(mine, full, noise, REFERENCE, key))
            rows.append([f"`{method}`", family, f"`{REFERENCE}` (unshifted)", "", "", _cell(reference)])
        if rows:
            parts.append(f"**Left out**, {split} split (training noise {noise}): each configuration trained with the "
                         "augmentation minus one family, on that family's shifts; accuracy % and the paired change "
                         "against the unshifted split for the full configuration and the one without the family, and "
                         "the paired difference without − full, points: mean [95 % CI] k/n seeds where the one "
                         "without the family scored higher.\n\n"
                         + _table(["configuration", "family left out", "shift", "full: accuracy (change)",
                                   "without the family: accuracy (change)", "without − full"], rows))
    return "\n\n".join(parts)


def _home_noisy_by_seed(runs: list[dict], method: str, noise: str) -> dict[int, float]:
    """Per seed, the accuracy (%) of ``model.pt`` on the noisy home test split (p = 1, the training condition)."""
    return {int(r["seed"]): 100.0 * report["accuracy"] for r in runs
            if r["method"] == method and r["noise"] == noise and (report := reports_by_p(r, "last").get("1"))}


def lever_table(runs: list[dict], shifts: dict, levers: dict[str, str], key: str = "test_by_shift") -> str:
    """Markdown: each lever against the configuration it changes, on the home split and by severity.

    ``levers``: ``{configuration: the configuration it is compared with}`` (e.g. a preprocessing or a broader
    augmentation against the product's). Columns: the unshifted rendering (clean), the noisy home test split
    (p = 1; test records only), the mean over the shifts of each severity and over every shift; each cell the paired difference
    lever − base in points, mean [95 % t interval over seeds] k/n seeds where the lever scored higher, and below
    each column the design's minimum detectable effect (80 % power, two-sided 5 %) from the root mean square of
    its paired standard deviations."""
    runs = [r for r in runs if r.get(key)]
    if not runs:
        return "No run has site-shift results."
    split = "validation" if key.startswith("val") else "test"
    rendered = set.intersection(*(set(r[key]) for r in runs))
    groups = [(f"`{REFERENCE}` (clean)", lambda m, n, mine: _accuracy_by_seed(mine, m, n, REFERENCE, key))]
    if key == "test_by_shift":
        groups.append(("home, noisy (p = 1)", lambda m, n, mine: _home_noisy_by_seed(mine, m, n)))
    for severity in SEVERITIES:
        names = [name for name, shift in shifts.items() if shift.severity == severity and name in rendered]
        if names:
            groups.append((f"{severity} (mean of {len(names)})",
                           lambda m, n, mine, names=names: _mean_accuracy_by_seed(mine, m, n, names, key)))
    # every shift together: what a choice over the whole catalogue reads (each shift weighs the same)
    every = [name for name in shifts if name != REFERENCE and name in rendered]
    if every:
        groups.append((f"every shift (mean of {len(every)})",
                       lambda m, n, mine: _mean_accuracy_by_seed(mine, m, n, every, key)))
    parts = []
    for noise in dict.fromkeys(r["noise"] for r in runs):
        mine = [r for r in runs if r["noise"] == noise]
        present = {r["method"] for r in mine}
        rows, stds = [], [[] for _ in groups]
        for lever, base in levers.items():
            if lever not in present or base not in present:
                continue
            cells = []
            for index, (_, values) in enumerate(groups):
                difference = paired_difference(values(lever, noise, mine), values(base, noise, mine))
                cells.append(_cell(difference))
                if difference["std"] is not None:
                    stds[index].append((difference["std"], difference["n"]))
            rows.append([f"`{lever}` − `{base}`", *cells])
        if not rows:
            continue
        rows.append(["minimum detectable effect", *(_detectable(col, scale=1.0) for col in stds)])
        parts.append(f"**Levers**, {split} split (training noise {noise}): accuracy of each lever minus the "
                     "configuration it changes, paired by seed (same patient split and initialisation), points: mean "
                     "[95 % CI] k/n seeds where the lever scored higher; a severity's column averages its shifts per "
                     "seed first.\n\n" + _table(["lever", *(label for label, _ in groups)], rows))
    return "\n\n".join(parts)
