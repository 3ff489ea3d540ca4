"""The runs of a benchmark: what is planned, how a run is named, and how an interrupted one resumes.

A finished run is one line of ``<out>/runs.jsonl``; a run's folder holds :data:`RUN_MARKER`, what the
run is (its identity) and, once its training finished, what it left in memory, so that a killed
benchmark resumes each run where it stopped (:func:`resume_point`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np
import torch

from robustmri.outputs import read_json, write_json

logger = logging.getLogger("benchmark")


def as_list(value) -> list:
    """A command-line list: None, one value, a comma-separated string, or a list or tuple."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def best_val(history: list[dict]) -> float:
    """The highest validation accuracy of a history (-1 when it has none)."""
    return max((h.get("val_accuracy", -1.0) for h in history), default=-1.0)


def plan_runs(methods, noises, test_noise_fractions, seeds, label_noise_rates=(0.0,)) -> list[dict]:
    """Every (method, noise, p, label-noise rate, seed). Seed-major, so an interrupted benchmark
    has whole seeds of every method rather than all seeds of a few; within a seed and noise,
    methods in the order given (runs that branch from a shared prefix follow each other)."""
    runs = []
    for seed in seeds:
        for noise in noises:
            for p in test_noise_fractions:
                for rate in label_noise_rates:
                    for method in methods:
                        runs.append({"method": method, "noise": noise, "test_noise_fraction": float(p),
                                     "label_noise_rate": float(rate), "seed": int(seed)})
    return runs


def run_key(run: dict) -> str:
    labels = f"__labels{run['label_noise_rate']:g}" if run.get("label_noise_rate") else ""
    return f"{run['method']}__{run['noise']}__p{run['test_noise_fraction']:g}{labels}__seed{run['seed']}"


#: In a run's folder: what the run is (``identity``) and, once its training finished, what it left in memory.
RUN_MARKER = "run.json"


def jsonable(value):
    """``value`` as plain JSON types (devices and paths as strings), to compare with what a marker file holds."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def resume_point(run_dir: str, identity: dict, state_path: str, end_epoch: int) -> int | None:
    """The epoch after which the interrupted training in ``run_dir`` can resume, or None to start it afresh.

    It resumes when the folder was written for the same ``identity`` (run, options, data) and holds a training
    state saved before ``end_epoch``; anything else in the folder is removed and the identity is written, so a
    later interruption resumes this run.
    """
    marker = read_json(os.path.join(run_dir, RUN_MARKER), missing={}) if os.path.isdir(run_dir) else {}
    if marker.get("identity") == identity and os.path.isfile(state_path):
        try:
            epoch = int(torch.load(state_path, map_location="cpu", weights_only=True)["epoch"])
        except Exception as err:  # a state that cannot be read is no state: start afresh
            logger.warning("%s: unreadable training state (%s); starting the run afresh", state_path, err)
        else:
            if 0 < epoch < end_epoch:
                logger.info("%s: resuming after epoch %d of %d", os.path.basename(run_dir), epoch, end_epoch)
                return epoch
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run of something else, or before its first epoch
    write_json(os.path.join(run_dir, RUN_MARKER), {"identity": identity})
    return None


def data_fingerprint(data) -> str:
    """sha256 of the split (ids, labels) and of the pixels as built: equal for runs that saw the same data."""
    digest = hashlib.sha256()
    for name in ("train", "val", "test"):
        for item in data.split(name):
            digest.update(f"{name}:{item['id']}:{item['label']}:{int(item['noisy'])};".encode())
            digest.update(np.ascontiguousarray(item["image"], dtype=np.float32).tobytes())
    return digest.hexdigest()
