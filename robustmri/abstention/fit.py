"""Fit a checkpoint's abstention state, score images with it, and make sure every checkpoint has one.

- :func:`fit_state`: an abstention score by name (:mod:`robustmri.abstention.scores`; the product's is the
  Mahalanobis score, :mod:`robustmri.abstention.mahalanobis`) fitted on the network's features and logits of
  the training split, its threshold the validation score quantile that
  accepts ``target_acceptance`` of the validation slices (:func:`~robustmri.abstention.mahalanobis.calibrate_threshold`);
- :func:`scores_of`: the state's score of images (higher = less assessable; assessable iff
  ``score <= state.threshold``);
- :func:`ensure_state`: the state beside a checkpoint, or, for a checkpoint trained before states
  were written (or by a config without the training handler, :class:`robustmri.abstention.handler.FitAbstention`),
  fitted from the training data the checkpoint records and saved beside it, under a lock so that
  two runs do not both fit it; a one-line error when those data are not on this machine.

Every fit also records the state in ``model_metadata.json`` (``abstention``: the score, threshold,
acceptance, counts and the state file's sha256), when that record describes this checkpoint.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import logging
import os

import numpy as np
import torch
from torch import nn

from robustmri.abstention.mahalanobis import (
    DETECTOR_NAME,
    RIDGE,
    TARGET_ACCEPTANCE,
    MahalanobisDetector,
    calibrate_threshold,
    describe_detector,
    network_outputs,
)
from robustmri.abstention.scores import AbstentionScore, CdfGate, CdfMean, build_score
from robustmri.abstention.state import AbstentionState, abstention_path, load_state, save_state
from robustmri.engine.checkpoint import load_weights
from robustmri.engine.model_metadata import file_sha256, metadata_path, recorded_dataset_dir
from robustmri.engine.trained_model import trained_model
from robustmri.influence.adapter import unwrap
from robustmri.outputs import locked, read_json, write_json

logger = logging.getLogger(__name__)

#: The state's score name for the Mahalanobis detector (``AbstentionState.score``).
MAHALANOBIS = "mahalanobis"
#: Above this many images the feature pass shows a progress bar.
PROGRESS_FROM = 512
#: The rule, in words, as every output states it beside the threshold.
RULE = "assessable when abstention_score <= threshold (higher = less assessable); a not-assessable image gets no class"


def item_arrays(items: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 1, H, W] float32, labels [N] int64)`` of prepared items (``image``, ``label``)."""
    return (np.stack([item["image"] for item in items]).astype(np.float32),
            np.asarray([int(item["label"]) for item in items], dtype=np.int64))


def protocol_arrays(data, split: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`item_arrays` of one split of a :class:`robustmri.data.protocol.ProtocolData`."""
    items = data.split(split)
    if not items:
        raise ValueError(f"the protocol's {split!r} split is empty: the abstention score needs its images")
    return item_arrays(items)


def inputs_sha256(*arrays: np.ndarray) -> str:
    """sha256 (hex) over the arrays' dtypes, shapes and bytes, in order: names the inputs without holding them."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def inputs_record(kind: str, *arrays: np.ndarray) -> dict:
    """``{"kind", "n", "sha256", "date"}``: what a state's parameters or threshold were computed from."""
    return {"kind": kind, "n": int(len(arrays[0])), "sha256": inputs_sha256(*arrays),
            "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat()}


def fit_outputs(strategy: AbstentionScore, train: tuple[np.ndarray, np.ndarray], train_labels: np.ndarray,
                validation: tuple[np.ndarray, np.ndarray],
                target_acceptance: float = TARGET_ACCEPTANCE) -> tuple[dict[str, np.ndarray], float, float]:
    """The product's rule on network outputs already computed: ``strategy`` fitted on the training
    ``(features, logits)`` with their labels (the validation outputs its reference, for a score that ranks on
    held-out data), its threshold the validation score quantile accepting ``target_acceptance``.
    Returns ``(arrays, threshold, acceptance)``; :func:`fit_state` and the benchmarks that compare scores on one
    model's outputs share it, so a bench measures exactly what the product would fit."""
    arrays = strategy.fit(*train, train_labels, reference=validation)
    threshold, acceptance = calibrate_threshold(strategy.score(arrays, *validation), target_acceptance)
    return arrays, float(threshold), float(acceptance)


def fit_state(network: nn.Module, train_images: np.ndarray, train_labels: np.ndarray, validation_images: np.ndarray,
              checkpoint: str | os.PathLike | None, target_acceptance: float = TARGET_ACCEPTANCE,
              ridge: float = RIDGE, progress: bool | None = None, score: str = MAHALANOBIS) -> AbstentionState:
    """The state of the abstention score called ``score`` (:data:`robustmri.abstention.scores.SCORES`) for
    ``network`` (whose weights are ``checkpoint``'s): one no-grad pass over the training images [N, 1, H, W]
    (with their labels) fits it, one over the validation images sets its threshold (and is the reference of a
    score that ranks on held-out data, :class:`~robustmri.abstention.scores.CdfMean`).

    ``checkpoint``: the file the weights are saved in (its sha256 ties the state to them; None: not saved,
    an empty sha256). ``progress``: a progress bar (default: more than :data:`PROGRESS_FROM` images).
    """
    strategy = build_score(score, ridge)
    train_images = np.asarray(train_images, dtype=np.float32)
    train_labels = np.asarray(train_labels).astype(np.int64).reshape(-1)
    validation_images = np.asarray(validation_images, dtype=np.float32)
    if progress is None:
        progress = len(train_images) + len(validation_images) > PROGRESS_FROM
    was_training = network.training
    try:
        train_features, train_logits = network_outputs(network, train_images, progress=progress)
        validation_features, validation_logits = network_outputs(network, validation_images, progress=progress)
    finally:
        network.train(was_training)
    arrays, threshold, acceptance = fit_outputs(strategy, (train_features, train_logits), train_labels,
                                                (validation_features, validation_logits), target_acceptance)
    return AbstentionState(
        score=strategy.name, arrays=arrays,
        threshold=threshold, target_acceptance=float(target_acceptance), acceptance=acceptance,
        checkpoint_sha256=file_sha256(checkpoint) if checkpoint else "",
        fitted_on=inputs_record("training split", train_images, train_labels),
        calibrated_on=inputs_record("validation split", validation_images), settings={"ridge": float(ridge)})


def detector_of(state: AbstentionState) -> MahalanobisDetector:
    """The :class:`MahalanobisDetector` a state holds (float64, as fitted): the whole state of the Mahalanobis score,
    or the Mahalanobis part of a combination (:class:`~robustmri.abstention.scores.CdfMean`)."""
    prefix = "" if state.score == MAHALANOBIS else f"{MAHALANOBIS}."
    if f"{prefix}means" not in state.arrays:
        raise ValueError(f"the abstention score {state.score!r} has no Mahalanobis part")
    return MahalanobisDetector(means=np.asarray(state.arrays[f"{prefix}means"], dtype=np.float64),
                               precision_factor=np.asarray(state.arrays[f"{prefix}precision_factor"], dtype=np.float64),
                               ridge=float(state.settings.get("ridge", RIDGE)),
                               n_train=int(state.fitted_on.get("n", 0)))


def scores_of(state: AbstentionState, network: nn.Module, images, batch_size: int = 64,
              progress: bool = False) -> np.ndarray:
    """The abstention scores [N] (float64) of ``images`` [N, 1, H, W] prepared as the network was trained."""
    images = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    was_training = network.training
    try:
        features, logits = network_outputs(network, images, batch_size=batch_size, progress=progress)
    finally:
        network.train(was_training)
    return strategy_of(state).score(state.arrays, features, logits)


def strategy_of(state: AbstentionState) -> AbstentionScore:
    """The strategy a state was fitted with (its name and ridge), which scores with ``state.arrays``."""
    return build_score(state.score, float(state.settings.get("ridge", RIDGE)))


#: What each score is, for the model's metadata (the Mahalanobis score's own sentence is
#: :func:`robustmri.abstention.mahalanobis.describe_detector`).
SCORE_DESCRIPTIONS = {
    "max_softmax": "1 minus the largest softmax probability (Hendrycks and Gimpel, ICLR 2017)",
    "energy": "minus the log-sum-exp of the logits, the free energy at temperature 1 (Liu et al., NeurIPS 2020)",
}


def describe_score(state: AbstentionState) -> tuple[str, str]:
    """``(name, one sentence)`` of a state's score for the model's metadata; the sign is stated in both."""
    if state.score == MAHALANOBIS:  # the name exported models have carried since the detector was added
        return DETECTOR_NAME, describe_detector(float(state.settings.get("ridge", RIDGE)))
    strategy = strategy_of(state)
    if isinstance(strategy, CdfMean):
        parts = "; ".join(describe_detector(float(state.settings.get("ridge", RIDGE))) if c.name == MAHALANOBIS
                          else f"{c.name}: {SCORE_DESCRIPTIONS[c.name]}" for c in strategy.components)
        if isinstance(strategy, CdfGate):
            gate, rank = strategy.components
            what = (f"the empirical CDF of {rank.name}, except that a slice whose {gate.name} score lies above "
                    f"{strategy.level:g} of the validation split's (midway between the two reference scores around "
                    f"that share) scores 1 plus that score's CDF (refused at any threshold below 1), each CDF the "
                    f"share of the validation split's scores at or below the slice's ({parts})")
        else:
            what = (f"mean of the empirical CDFs of {', '.join(c.name for c in strategy.components)}, each CDF the "
                    f"share of the validation split's scores at or below the slice's ({parts})")
    else:
        what = SCORE_DESCRIPTIONS[state.score]
    return state.score, (f"{what}; fitted on the training split; higher = less assessable; a slice scoring above "
                         "ood_threshold is not assessable")


def tie_step(state: AbstentionState) -> float:
    """How far a score may move when one of its values ties with a reference value in one float precision and not
    the other: one reference step per component of a rank score (:class:`CdfMean`), nothing for the others."""
    strategy = strategy_of(state)
    if not isinstance(strategy, CdfMean):
        return 0.0
    sizes = [len(state.arrays[f"{c.name}.cdf_reference"]) for c in strategy.components]
    return float(sum(1.0 / n for n in sizes) / len(sizes))


def describe_state(state: AbstentionState) -> dict:
    """The state in outputs (file inference's JSON, MONAI Label): score name, threshold and where both came from."""
    return {"score": state.score, "threshold": float(state.threshold),
            "target_acceptance": float(state.target_acceptance), "acceptance": float(state.acceptance),
            "fitted_on": dict(state.fitted_on), "calibrated_on": dict(state.calibrated_on), "rule": RULE}


def record_in_metadata(checkpoint: str | os.PathLike, state: AbstentionState, state_file: str) -> bool:
    """Add ``abstention`` (:func:`describe_state`, the state file's name and sha256) to ``model_metadata.json``
    beside ``checkpoint`` when that record describes it (its final checkpoint is this file, or none is recorded
    yet); whether it was written."""
    path = metadata_path(checkpoint)
    if not os.path.isfile(path):
        return False
    content = read_json(path)
    name = os.path.basename(os.fspath(checkpoint))
    final = ((content.get("provenance") or {}).get("training") or {}).get("final_checkpoint") or {}
    if final.get("file", name) != name:  # the record describes another checkpoint of the folder
        return False
    content["abstention"] = {**describe_state(state), "file": os.path.basename(state_file),
                             "sha256": file_sha256(state_file), "checkpoint_sha256": state.checkpoint_sha256}
    write_json(path, content)
    return True


def save_and_record(state: AbstentionState, checkpoint: str | os.PathLike) -> str:
    """Save ``state`` beside ``checkpoint`` (atomically) and record it in the model metadata; the state file."""
    state_file = save_state(state, checkpoint)
    record_in_metadata(checkpoint, state, state_file)
    logger.info("abstention state: %s, threshold %.4g accepts %.1f %% of %d validation slice(s) -> %s", state.score,
                state.threshold, 100 * state.acceptance, state.calibrated_on.get("n", 0), state_file)
    return state_file


def _current(checkpoint: str, sha256: str) -> AbstentionState | None:
    """The state beside ``checkpoint`` when it was fitted for these weights; None when missing or stale."""
    try:
        return load_state(checkpoint, checkpoint_sha256=sha256)
    except ValueError as error:
        logger.warning("%s: fitting it again", error)
        return None


def _check_training_data(checkpoint: str, dataset_dir: str | None) -> None:
    """Refuse, in one line that says what to do, when the training data the state needs are not here."""
    name, state_name = os.path.basename(checkpoint), os.path.basename(abstention_path(checkpoint))
    if dataset_dir is not None:
        folder = dataset_dir
    else:
        found, folder = recorded_dataset_dir(checkpoint)
        if not found:
            raise FileNotFoundError(
                f"{name} has no abstention state ({state_name}) and no record of the data it was trained on "
                "(training_data.json): copy its state from where it was trained, or fit it by giving dataset_dir "
                "(the training data; \"\" for the embedded synthetic set)")
    if folder and not os.path.isdir(folder):
        raise FileNotFoundError(
            f"{name} has no abstention state ({state_name}) and its training data ({os.path.basename(folder)}) are "
            "not on this machine: copy its state from where it was trained, or give dataset_dir (the training data)")


def ensure_state(checkpoint: str | os.PathLike, bundle_dir: str | os.PathLike | None = None, network=None, data=None,
                 dataset_dir: str | None = None, target_acceptance: float = TARGET_ACCEPTANCE,
                 train_split: str = "train", validation_split: str = "val", **protocol) -> AbstentionState:
    """The abstention state of ``checkpoint``: loaded from beside it, or fitted and saved there.

    Fitting needs the training data: ``data`` (a protocol already built, e.g. a config's ``@data``, with
    ``network``) or, without it, the data the checkpoint records, rebuilt from the bundle in ``bundle_dir``
    as export rebuilds them (:func:`robustmri.engine.trained_model.trained_model`; ``dataset_dir`` and
    ``protocol``, i.e. ``seed``, ``noise``, ``synthetic_patients``, override the record). ``network``: the
    network to load the weights into (default: the bundle's ``network_def``). A state fitted for other
    weights is fitted again. ``FileNotFoundError`` (one line) when the training data are not at hand.
    """
    checkpoint = os.fspath(checkpoint)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found; train first")
    sha256 = file_sha256(checkpoint)
    state = _current(checkpoint, sha256)
    if state is not None:
        return state
    with locked(abstention_path(checkpoint)):  # a second run waits, then loads the first one's state
        state = _current(checkpoint, sha256)
        if state is not None:
            return state
        if data is None:
            if bundle_dir is None:
                raise ValueError(f"{os.path.basename(checkpoint)} has no abstention state: give bundle_dir (to "
                                 "rebuild its training data) or data")
            _check_training_data(checkpoint, dataset_dir)
            _, network, data = trained_model(bundle_dir, checkpoint, dataset_dir=dataset_dir, network=network,
                                             **protocol)
        else:
            if network is None:
                raise ValueError("ensure_state: give the network with the data")
            network = load_weights(copy.deepcopy(unwrap(network)).cpu(), checkpoint).eval()
        logger.info("%s has no abstention state: fitting it on its %s split, calibrating on %s",
                    os.path.basename(checkpoint), train_split, validation_split)
        train_images, train_labels = protocol_arrays(data, train_split)
        state = fit_state(network, train_images, train_labels, protocol_arrays(data, validation_split)[0],
                          checkpoint, target_acceptance)
        save_and_record(state, checkpoint)
    return state
