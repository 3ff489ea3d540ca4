"""Which abstention score tracks wrong answers: risk-coverage and AURC per score, at home and under site shifts.

For one checkpoint the bundle trained, the protocol is rebuilt as it was trained (network, input size
and preprocessing from ``model_metadata.json``; seed, noise and synthetic patients from its recorded
provenance unless given, as export does). The network runs once per image set; every score of
:data:`robustmri.abstention.scores.SCORES` is fitted on the *training* split (the combination's CDFs on
the home *validation* split) and scores every set:

- ``validation`` and ``test``: the protocol's splits as evaluated (their noisy share included);
- ``validation / <shift>`` and ``test / <shift>``: each split's slices read again and re-rendered under
  every site shift of :data:`robustmri.data.site_shift.SHIFTS`, prepared by the checkpoint's own
  preprocessing (:func:`robustmri.bench.shifts.shifted_test_sets`; ``none`` is the clean re-rendering).

Per set and score: the AURC (:mod:`robustmri.evaluation.risk_coverage`) of the network's own answers and
the excess AURC over the oracle ordering. A score is *chosen* by the lowest mean AURC over the shifted
validation renderings (every shift but ``none``, each weighing the same); the test numbers are reported
beside the choice and never used for it. With ``ensemble`` checkpoints (the same protocol, other training
seeds), the ensemble of the checkpoint and them is scored too (:func:`robustmri.abstention.scores.
ensemble_scores`); its answers are the mean probability's argmax, so its AURC is of other answers, and
it is reported beside the checkpoint's own scores, not chosen among them.
"""

from __future__ import annotations

import datetime
import logging
import os

import numpy as np
from scipy.special import softmax
from tqdm.auto import tqdm

from robustmri.abstention.fit import item_arrays
from robustmri.abstention.mahalanobis import network_outputs
from robustmri.abstention.scores import ensemble_scores, score_by_name
from robustmri.bench.machine import describe_machine
from robustmri.bench.shifts import REFERENCE, shifted_test_sets, synthetic_raw_images
from robustmri.bench.stats import _table
from robustmri.data.site_shift import SHIFTS
from robustmri.engine.checkpoint import load_weights
from robustmri.engine.model_metadata import file_sha256
from robustmri.engine.trained_model import (
    check_trained_network,
    recorded_protocol,
    recorded_provenance,
    trained_config,
    warn_if_other_data,
)
from robustmri.evaluation.risk_coverage import oracle_aurc, risk_coverage_curve, risk_coverage_figure
from robustmri.outputs import write_atomic, write_json

logger = logging.getLogger(__name__)

#: The home splits scored as evaluated, and re-rendered under the shifts.
SPLITS = ("validation", "test")
_PROTOCOL_SPLIT = {"validation": "val", "test": "test"}
#: The coverage at which each score's risk is also reported (the product's threshold accepts 95 % of validation).
RISK_COVERAGE = 0.95
#: Defaults of the protocol settings when the checkpoint recorded none (the bundle's own defaults).
PROTOCOL_DEFAULTS = {"noise": "gaussian", "seed": 0, "synthetic_patients": 300}


def _protocol(checkpoint: str, given: dict) -> dict:
    """The protocol settings: given ones, else what training recorded, else :data:`PROTOCOL_DEFAULTS`."""
    recorded = recorded_protocol(recorded_provenance(checkpoint))
    settings = {}
    for key, default in PROTOCOL_DEFAULTS.items():
        value = given.get(key)
        settings[key] = type(default)(value if value is not None else recorded.get(key) or default)
    return settings


def _network(bundle_dir: str, checkpoint: str, data_options: dict):
    """``(config, network in eval mode)`` of ``checkpoint`` as the bundle rebuilds it."""
    config = trained_config(bundle_dir, checkpoint, **data_options)
    network = config.get_parsed_content("network_def")
    check_trained_network(network, checkpoint)
    return config, load_weights(network, checkpoint).eval()


def image_sets(data, size: int, preprocess: str, shifts, raw_images=None, workers: int = 1,
               cache_dir: str | None = None, progress: bool = True) -> tuple[dict[str, dict], dict[str, int]]:
    """``({set name: {"split", "shift", "images", "labels"}}, {split: slices left out of its shifted sets})``."""
    sets, excluded = {}, {}
    for split in SPLITS:
        items = data.split(_PROTOCOL_SPLIT[split])
        if not items:
            raise ValueError(f"the protocol's {split} split is empty: nothing to measure abstention on")
        images, labels = item_arrays(items)
        sets[split] = {"split": split, "shift": None, "images": images, "labels": labels}
        if not shifts:
            continue
        rendered, left_out = shifted_test_sets(items, size, [preprocess], shifts=shifts, workers=workers,
                                               progress=progress, raw_images=raw_images,
                                               cache_dir=os.path.join(cache_dir, split) if cache_dir else None)
        excluded[split] = len(left_out)
        for shift, shifted in rendered[preprocess].items():
            if shifted:
                images, labels = item_arrays(shifted)
                sets[f"{split} / {shift}"] = {"split": split, "shift": shift, "images": images, "labels": labels}
    return sets, excluded


def score_sets(network, sets: dict[str, dict], train: tuple[np.ndarray, np.ndarray], scores,
               members=(), progress: bool = True) -> tuple[dict[str, dict], dict[str, dict]]:
    """Fit each score on ``train`` (images, labels), its reference on the ``validation`` set; score every set.

    Returns ``(rows, values)``: ``rows[set]`` = n, accuracy, oracle AURC and per score its AURC, excess
    AURC and risk at :data:`RISK_COVERAGE`; ``values[set]`` = ``{"correct": [N], score name: [N]}`` for the curves (the ensemble's own
    ``ensemble_correct``). ``members``: further networks of an ensemble with ``network``."""
    outputs = {name: network_outputs(network, entry["images"]) for name, entry in
               tqdm(sets.items(), desc="network outputs", unit="set", disable=not progress)}
    train_features, train_logits = network_outputs(network, train[0])
    fitted = {}
    for name in scores:
        score = score_by_name(name)
        fitted[name] = (score, score.fit(train_features, train_logits, train[1], reference=outputs["validation"]))
    member_probabilities = {name: [softmax(network_outputs(member, entry["images"])[1], axis=1) for member in members]
                            for name, entry in tqdm(sets.items(), desc="ensemble members", unit="set",
                                                    disable=not progress)} if members else {}
    rows, values = {}, {}
    for name, entry in sets.items():
        features, logits = outputs[name]
        labels = entry["labels"]
        correct = logits.argmax(1) == labels
        row = {"split": entry["split"], "shift": entry["shift"], "n": int(len(labels)),
               "accuracy": float(correct.mean()), "oracle_aurc": oracle_aurc(correct), "scores": {}}
        values[name] = {"correct": correct}
        for score_name, (score, params) in fitted.items():
            values[name][score_name] = score.score(params, features, logits)
        if members:
            probabilities = np.stack([softmax(logits, axis=1), *member_probabilities[name]])
            ensemble_correct = probabilities.mean(0).argmax(1) == labels
            row["ensemble"] = {"members": len(probabilities), "accuracy": float(ensemble_correct.mean()),
                               "oracle_aurc": oracle_aurc(ensemble_correct)}
            values[name]["ensemble_correct"] = ensemble_correct
            values[name].update(ensemble_scores(probabilities))
        for score_name, score_values in values[name].items():
            if score_name.endswith("correct"):
                continue
            answers = values[name]["ensemble_correct" if score_name.startswith("ensemble_") else "correct"]
            curve = risk_coverage_curve(score_values, answers)
            row["scores"][score_name] = {"aurc": curve.aurc, "excess_aurc": curve.aurc - oracle_aurc(answers),
                                         "risk_at_95": curve.risk_at(RISK_COVERAGE)}
        rows[name] = row
    return rows, values


def summarise(rows: dict[str, dict]) -> tuple[dict[str, dict], dict]:
    """Per score: AURC and excess AURC on the home splits and their means over the shifted renderings; the choice.

    The choice is the score of the checkpoint itself (ensemble scores are not candidates) with the lowest
    mean AURC over the shifted *validation* renderings (``none`` excluded; without shifted sets, the home
    validation AURC); of tied scores, the first in :data:`~robustmri.abstention.scores.SCORES`' order."""
    names = list(next(iter(rows.values()))["scores"])
    summary = {}
    for name in names:
        entry = {}
        for split in SPLITS:
            entry[split] = rows[split]["scores"][name]
            shifted = [row["scores"][name] for row in rows.values()
                       if row["split"] == split and row["shift"] not in (None, REFERENCE)]
            if shifted:
                entry[f"shifted {split}"] = {key: float(np.mean([s[key] for s in shifted]))
                                             for key in ("aurc", "excess_aurc")}
                entry[f"shifted {split}"]["n_shifts"] = len(shifted)
        summary[name] = entry
    key = "shifted validation" if "shifted validation" in summary[names[0]] else "validation"
    # an ensemble answers with other weights than the checkpoint's: reported beside, never chosen for it
    candidates = [name for name in names if not name.startswith("ensemble_")]
    chosen = min(candidates, key=lambda name: summary[name][key]["aurc"])  # a tie: the first in SCORES' order
    return summary, {"score": chosen, "by": f"lowest mean AURC on the {key} sets",
                     "test": summary[chosen]["test"], "shifted test": summary[chosen].get("shifted test")}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def markdown(report: dict) -> str:
    """The summary table (per score, AURC % and excess AURC % by set group), the choice, and per-set AURC."""
    summary, choice = report["summary"], report["choice"]
    groups = [g for g in ("validation", "shifted validation", "test", "shifted test") if g in next(iter(
        summary.values()))]
    header = ["score"] + [f"{g}: AURC (excess)" for g in groups]
    rows = [[f"**{name}**" if name == choice["score"] else name]
            + [f"{_pct(entry[g]['aurc'])} ({_pct(entry[g]['excess_aurc'])})" for g in groups]
            for name, entry in summary.items()]
    home = report["sets"]
    lines = [f"Checkpoint sha256 {report['checkpoint_sha256'][:12]}, {report['spatial_size']} px, "
             f"`{report['preprocess']}` preprocessing; data: {report['data']}; protocol {report['protocol']}. "
             f"Scores fitted on the training split ({report['n_train']} slices; the combination's CDFs on the "
             f"validation split). AURC and excess AURC in % (lower is better), answers of the network itself; "
             f"accuracy {_pct(home['validation']['accuracy'])} % (validation), {_pct(home['test']['accuracy'])} % "
             f"(test). Shifted groups: mean over the renderings other than `{REFERENCE}`.", "",
             _table(header, rows), "",
             f"Chosen: **{choice['score']}** ({choice['by']}); its test AURC {_pct(choice['test']['aurc'])} % "
             f"(excess {_pct(choice['test']['excess_aurc'])})"
             + ("" if not choice.get("shifted test") else
                f", shifted test {_pct(choice['shifted test']['aurc'])} % "
                f"(excess {_pct(choice['shifted test']['excess_aurc'])})") + ".", ""]
    names = list(summary)
    per_set = [[name, str(row["n"]), _pct(row["accuracy"]), _pct(row["oracle_aurc"])]
               + [_pct(row["scores"][s]["aurc"]) for s in names] for name, row in report["sets"].items()]
    lines += ["Per set: AURC % per score (the oracle ordering's AURC beside it).", "",
              _table(["set", "n", "accuracy %", "oracle AURC %"] + names, per_set)]
    return "\n".join(lines) + "\n"


def pooled_curves(values: dict[str, dict], rows: dict[str, dict], split: str, shifted: bool) -> tuple[dict, float]:
    """Risk-coverage curves per score of one split's home set, or of its shifted renderings pooled; the error rate."""
    names = [n for n, row in rows.items() if row["split"] == split
             and ((row["shift"] not in (None, REFERENCE)) if shifted else row["shift"] is None)]
    pooled = {key: np.concatenate([values[n][key] for n in names]) for key in values[names[0]]}
    curves = {}
    for key, score_values in pooled.items():
        if not key.endswith("correct"):
            answers = pooled["ensemble_correct" if key.startswith("ensemble_") else "correct"]
            curves[key] = risk_coverage_curve(score_values, answers)
    return curves, float(1 - pooled["correct"].mean())


def bench_abstention(bundle_dir: str, checkpoint: str, out: str, dataset_dir: str | None = None,
                     seed: int | None = None, noise: str | None = None, synthetic_patients: int | None = None,
                     scores=None, shifts=None, ensemble=(), workers: int = 1, cache_dir: str | None = None,
                     progress: bool = True, command: str = "") -> dict:
    """Measure every score (default: all of :data:`~robustmri.abstention.scores.SCORES`) for ``checkpoint``.

    ``dataset_dir``: None reads the data set the checkpoint was trained on, "" the embedded synthetic set.
    ``shifts``: default every shift of :data:`SHIFTS`; ``()`` only the home splits. Writes
    ``abstention_bench.json``, ``abstention_bench.md`` and ``risk_coverage_test.png`` (and
    ``risk_coverage_shifted_test.png`` with shifts) into ``out``; returns the report."""
    from robustmri.abstention.scores import SCORES

    scores = list(SCORES) if scores is None else [score_by_name(name).name for name in scores]
    shifts = [s for s in SHIFTS if s != REFERENCE] if shifts is None else list(shifts)
    unknown = sorted(set(shifts) - set(SHIFTS))
    if unknown:
        raise ValueError(f"unknown site shift(s) {unknown}; valid names: {', '.join(SHIFTS)}")
    protocol = _protocol(checkpoint, {"noise": noise, "seed": seed, "synthetic_patients": synthetic_patients})
    data_options = {**protocol, **({"dataset_dir": dataset_dir} if dataset_dir is not None else {})}
    config, network = _network(bundle_dir, checkpoint, data_options)
    size, preprocess = int(config.get_parsed_content("spatial_size")), config.get_parsed_content("preprocess")
    data = config.get_parsed_content("data")
    warn_if_other_data(data, recorded_provenance(checkpoint), checkpoint)
    members = []
    for member in ensemble:
        member_config, member_network = _network(bundle_dir, member, data_options)
        if (int(member_config.get_parsed_content("spatial_size")), member_config.get_parsed_content("preprocess")) \
                != (size, preprocess):
            raise ValueError(f"ensemble member {member} was trained at another size or preprocessing than {checkpoint}")
        members.append(member_network)
    raw = synthetic_raw_images(data, protocol["synthetic_patients"], size, protocol["seed"])
    sets, excluded = image_sets(data, size, preprocess, shifts, raw_images=raw, workers=workers,
                                cache_dir=cache_dir, progress=progress)
    train = item_arrays(data.split("train"))
    rows, values = score_sets(network, sets, train, scores, members=members, progress=progress)
    summary, choice = summarise(rows)
    report = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": describe_machine(), "checkpoint_sha256": file_sha256(checkpoint),
              "ensemble_sha256": [file_sha256(m) for m in ensemble], "data": data.source, "protocol": protocol,
              "spatial_size": size, "preprocess": preprocess, "n_train": int(len(train[1])), "shifts": shifts,
              "excluded": excluded, "scores": list(summary), "summary": summary, "choice": choice, "sets": rows}
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "abstention_bench.json"), report)
    write_atomic(os.path.join(out, "abstention_bench.md"), lambda handle: handle.write(markdown(report).encode()))
    curves, error_rate = pooled_curves(values, rows, "test", shifted=False)
    risk_coverage_figure(curves, os.path.join(out, "risk_coverage_test.png"), "home test split", error_rate)
    if shifts:
        curves, error_rate = pooled_curves(values, rows, "test", shifted=True)
        risk_coverage_figure(curves, os.path.join(out, "risk_coverage_shifted_test.png"),
                             f"shifted test renderings ({len(shifts)} shifts pooled)", error_rate)
    logger.info("chosen abstention score: %s (%s)", choice["score"], choice["by"])
    return report
