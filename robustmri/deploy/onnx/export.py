"""Export a trained classifier to ONNX with what deployment needs to reproduce training.

The exported graph takes ``image`` [N, 1, H, W] float32 in [0, 1] and returns ``pred``,
class probabilities [N, C] (softmax included, so no runtime has to know it), and, with the checkpoint's
abstention state (:mod:`robustmri.abstention`: fitted on the training split, its threshold calibrated on the
validation split or on a site's images), ``ood_score`` [N]: the out-of-distribution score of
:mod:`robustmri.deploy.onnx.ood` (higher = more out of distribution), its threshold and where it was
calibrated written with the abstention rule into the metadata (:data:`OOD_METADATA_KEYS`). The model's
metadata carries the class names, the spatial size, the preprocessing (its name, ``preprocess``, and
its exact description, ``intensity_normalisation``: the head preprocessing cannot be written as
ONNX operators, so the runtime applies it by name with the library's one implementation), the model
version and the sha256 of the source checkpoint: a runtime reads them instead of trusting a
second copy of the training config. Every export is checked with ``onnx.checker`` and, when
images are given, against PyTorch (the parity check).

Integrity and provenance (:mod:`robustmri.deploy.onnx.trust`): the metadata also carries
``provenance`` (what trained the model, copied from ``model_metadata.json`` beside the checkpoint
by :func:`checkpoint_provenance`, with the bundle's test metrics of this very checkpoint),
``demo_model`` ("true" for the embedded synthetic set, "false" for a data set folder, "unknown"
when nothing is recorded), and the integrity digest over the graph, the weights and every metadata
field (``graph_sha256``, ``integrity_covers``, ``integrity_sha256``), optionally signed with an
Ed25519 key (``signature``, ``signature_algorithm``, ``signing_key_fingerprint``). Every runtime
load verifies them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile

import numpy as np
import torch

from robustmri import INTENDED_USE, __version__
from robustmri.data.preprocessing import DESCRIPTIONS, check_preprocess
from robustmri.deploy.dicom.series_rule import METADATA_KEY as SERIES_RULE_KEY
from robustmri.deploy.dicom.series_rule import SeriesRule
from robustmri.abstention.fit import describe_score, fit_state, protocol_arrays, strategy_of, tie_step
from robustmri.abstention.mahalanobis import TARGET_ACCEPTANCE
from robustmri.abstention.state import AbstentionState
from robustmri.deploy.onnx.ood import SERIES_MAX_NOT_ASSESSABLE, ScoredClassifier, describe_abstention_rule, graph_score
from robustmri.deploy.onnx.runtime import INPUT_NAME, OUTPUT_NAME, SCORE_NAME, OnnxClassifier
from robustmri.deploy.onnx.trust import OUTPUT_AFFECTING_KEYS, canonical_json, integrity_fields
from robustmri.engine.model_metadata import file_sha256, metadata_path  # noqa: F401  (file_sha256: kept importable)
from robustmri.influence.adapter import FinalLayerError, find_final_linear, unwrap
from robustmri.networks import PaperCNN

logger = logging.getLogger(__name__)

#: Parity limits against PyTorch: max |p_onnx - p_torch| and identical argmax.
PARITY_ATOL = 1e-4
#: Parity limit of the OOD score: |s_onnx - s_torch| <= SCORE_PARITY_RTOL * max(1, |s_torch|).
SCORE_PARITY_RTOL = 1e-3
#: The detector's metadata keys (all change the output: which slices are assessable, which series abstain). Written
#: with the ``ood_score`` output only, so not among the always-required keys below; the integrity digest covers
#: every metadata key, these included.
OOD_METADATA_KEYS = ("ood_detector", "ood_detector_description", "ood_threshold", "ood_target_acceptance",
                     "ood_validation_acceptance", "ood_n_train", "ood_n_validation", "ood_series_max_not_assessable",
                     "ood_abstention_rule", "ood_fitted_on", "ood_calibrated_on")
#: Metadata keys every export must write because they change the output or how it is read (class names,
#: size, preprocessing, provenance, ...); the integrity digest covers them and every other metadata key.
#: One tuple, :data:`robustmri.deploy.onnx.trust.OUTPUT_AFFECTING_KEYS`, so that the torch-free runtime
#: checks the same list: extend it there with a new feature's keys (e.g. a detector's).
INTEGRITY_REQUIRED_KEYS = OUTPUT_AFFECTING_KEYS


class ProbabilityHead(torch.nn.Module):
    """Network followed by softmax: the exported model's output is probabilities, not logits."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(image), dim=1)


class ParityError(AssertionError):
    """The ONNX model does not reproduce PyTorch within the parity limits."""


def bundle_version(bundle_root: str | os.PathLike) -> str:
    """The bundle's version from ``configs/metadata.json`` (the model version written into exports)."""
    with open(os.path.join(bundle_root, "configs", "metadata.json")) as handle:
        return str(json.load(handle)["version"])


def parity_requested(split: str | None) -> bool:
    """Whether a parity split is named (empty or "none" asks for no parity check)."""
    return bool(split) and str(split).lower() != "none"


def split_images(data, split: str | None) -> np.ndarray | None:
    """Stack the images [N, 1, H, W] of one split of :class:`robustmri.data.protocol.ProtocolData` (None: no parity)."""
    if not parity_requested(split):
        return None
    return np.stack([item["image"] for item in data.split(split)]).astype(np.float32)


def split_arrays(data, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 1, H, W] float32, labels [N] int64)`` of one split of the protocol (the detector's data)."""
    return protocol_arrays(data, split)


def export_onnx(network: torch.nn.Module, output_file: str | os.PathLike, class_names, spatial_size: int,
                checkpoint: str | os.PathLike | None = None, model_version: str = "",
                parity_images: np.ndarray | None = None, opset_version: int | None = None,
                batch_size: int = 32, preprocess: str = "head",
                ood_train: tuple[np.ndarray, np.ndarray] | None = None, ood_validation=None,
                target_acceptance: float = TARGET_ACCEPTANCE,
                series_max_not_assessable: float = SERIES_MAX_NOT_ASSESSABLE,
                series_rule: SeriesRule | dict | None = None, provenance: dict | None = None,
                signing_key: str | os.PathLike | None = None, abstention: AbstentionState | None = None) -> dict:
    """Export ``network`` (logits out) to ``output_file`` and check it; return what was written and measured.

    ``checkpoint`` is the file the weights came from (its sha256 goes into the metadata);
    ``preprocess`` the preprocessing the network was trained with (``model_metadata.json``);
    ``series_rule`` which DICOM series match the training domain (:mod:`robustmri.deploy.dicom.series_rule`;
    None or an empty dict: the default T1-weighted post-contrast rule, a dict changes its values);
    ``provenance`` what trained it (:func:`checkpoint_provenance`; None: not recorded, ``demo_model``
    "unknown"); a demo model's version gets the suffix ``+demo``. ``signing_key``: an Ed25519
    private key (PEM) that signs the integrity digest;
    ``parity_images`` [N, 1, H, W] in [0, 1] are run through both PyTorch and ONNX Runtime, and
    a :class:`ParityError` is raised when they disagree beyond :data:`PARITY_ATOL` or on a class
    (or on the OOD score beyond :data:`SCORE_PARITY_RTOL`).

    ``abstention`` (the checkpoint's :class:`~robustmri.abstention.state.AbstentionState`, e.g. from
    :func:`robustmri.abstention.fit.ensure_state`) adds the OOD detector as the state holds it: its class means
    and precision factor in the graph (float32), its threshold, acceptance and where they were fitted and
    calibrated (``ood_fitted_on``, ``ood_calibrated_on``: a site-calibrated state travels with its threshold) in the
    metadata, with the abstention rule ``series_max_not_assessable``; the parity check also compares the graph's
    float32 score with the state's float64 score. ``ood_train`` (training images [N, 1, H, W] and labels [N],
    :func:`split_arrays`) and ``ood_validation`` (validation images, or ``(images, labels)``) instead fit such a
    state here (:func:`robustmri.abstention.fit.fit_state`, ``target_acceptance``), not saved. Without either
    the model has no ``ood_score`` output, and DICOM inference refuses it.
    """
    spatial_size = int(spatial_size)
    class_names = [str(name) for name in class_names]
    series_rule = _checked_options(preprocess, series_rule, ood_train, ood_validation, series_max_not_assessable,
                                   abstention, checkpoint)
    network = copy.deepcopy(network).cpu().eval()
    _check_output_size(network, spatial_size, class_names)
    if abstention is None and ood_train is not None:
        validation = ood_validation[0] if isinstance(ood_validation, tuple) else ood_validation
        abstention = fit_state(network, *ood_train, validation, checkpoint, target_acceptance)
    model = _exported_model(network, abstention)
    with torch.no_grad():
        model(torch.zeros(2, 1, spatial_size, spatial_size))  # FinalLayer's one-time check runs before tracing
    metadata = _metadata(network, class_names, spatial_size, preprocess, series_rule, model_version, checkpoint,
                         provenance)
    if abstention is not None:
        metadata.update(_abstention_metadata(abstention, series_max_not_assessable))
    output_file = os.fspath(output_file)
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    opset = _trace_and_save(model, abstention is not None, output_file, class_names, spatial_size, metadata,
                            opset_version, signing_key)
    result = {"onnx_file": os.path.abspath(output_file), "opset": opset, "metadata": metadata,
              "ood_detector": abstention is not None}
    logger.info("exported %s (opset %d, %d classes, %d x %d)", output_file, opset, len(class_names),
                spatial_size, spatial_size)
    if parity_images is not None:
        result["parity"] = check_parity(output_file, model, parity_images, batch_size, state=abstention)
    return result


def _checked_options(preprocess: str, series_rule, ood_train, ood_validation, series_max_not_assessable: float,
                     abstention: AbstentionState | None, checkpoint) -> SeriesRule:
    """Refuse inconsistent export options; the series rule as a :class:`SeriesRule`."""
    check_preprocess(preprocess)
    if not isinstance(series_rule, SeriesRule):
        series_rule = SeriesRule.from_dict(dict(series_rule or {}))
    if (ood_train is None) != (ood_validation is None):
        raise ValueError("give both ood_train (training images and labels) and ood_validation (validation images) "
                         "for the OOD detector, or neither")
    if abstention is not None and ood_train is not None:
        raise ValueError("give the abstention state or ood_train and ood_validation to fit one, not both")
    if abstention is not None and checkpoint and abstention.checkpoint_sha256 != file_sha256(checkpoint):
        raise ValueError(f"the abstention state was fitted for other weights than {os.path.basename(checkpoint)}: "
                         "refit it (robustmri.abstention.fit.ensure_state)")
    if not 0.0 <= float(series_max_not_assessable) < 1.0:
        raise ValueError(f"series_max_not_assessable must be in [0, 1), got {series_max_not_assessable}")
    return series_rule


def _check_output_size(network: torch.nn.Module, spatial_size: int, class_names: list[str]) -> None:
    """Refuse class names that do not match the network's output."""
    with torch.no_grad():
        probe = network(torch.zeros(2, 1, spatial_size, spatial_size))
    if probe.shape != (2, len(class_names)):
        raise ValueError(f"network gives output {tuple(probe.shape)} for 2 images, expected (2, {len(class_names)}): "
                         f"class_names {class_names} do not match it")


def _exported_model(network: torch.nn.Module, state: AbstentionState | None) -> torch.nn.Module:
    """The network with the state's OOD detector (probabilities and scores out), or, without a state, the
    network with softmax and no detector."""
    if state is None:
        logger.warning("exporting without an OOD detector (no abstention state, no training and validation images "
                       "given): DICOM inference refuses such a model")
        return ProbabilityHead(network).eval()
    return ScoredClassifier(network, graph_score(state.score, state.arrays)).eval()


def _abstention_metadata(state: AbstentionState, max_share: float) -> dict[str, str]:
    """The detector's metadata (:data:`OOD_METADATA_KEYS`) from the abstention state."""
    n_train = int(state.fitted_on.get("n", 0))
    logger.info("OOD detector %s: fitted on %d training slice(s); threshold %.4g accepts %.1f %% of %d %s slice(s) "
                "(target %.1f %%)", state.score, n_train, state.threshold, 100 * state.acceptance,
                int(state.calibrated_on.get("n", 0)), state.calibrated_on.get("kind", "calibration"),
                100 * state.target_acceptance)
    name, description = describe_score(state)
    return {"ood_detector": name, "ood_detector_description": description,
            "ood_threshold": repr(float(state.threshold)), "ood_target_acceptance": repr(float(state.target_acceptance)),
            "ood_validation_acceptance": repr(float(state.acceptance)), "ood_n_train": str(n_train),
            "ood_n_validation": str(int(state.calibrated_on.get("n", 0))),
            "ood_series_max_not_assessable": repr(float(max_share)),
            "ood_abstention_rule": describe_abstention_rule(max_share),
            "ood_fitted_on": canonical_json(state.fitted_on), "ood_calibrated_on": canonical_json(state.calibrated_on)}


def _metadata(network: torch.nn.Module, class_names: list[str], spatial_size: int, preprocess: str,
              series_rule: SeriesRule, model_version: str, checkpoint, provenance: dict | None) -> dict[str, str]:
    """The model's metadata before the detector's calibration and the integrity fields are added."""
    demo = "unknown" if not provenance else ("true" if provenance.get("demo_model") else "false")
    return {
        "class_names": json.dumps(class_names),
        "spatial_size": str(spatial_size),
        "preprocess": preprocess,
        "intensity_normalisation": DESCRIPTIONS[preprocess],
        SERIES_RULE_KEY: series_rule.to_json(),
        "model_version": f"{model_version}+demo" if demo == "true" and model_version else str(model_version),
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint else "",
        "network": _describe(network),
        "exported_by": f"robustmri {__version__}, torch {torch.__version__}",
        "intended_use": INTENDED_USE,
        "demo_model": demo,
        "provenance": canonical_json(provenance) if provenance else "null",
    }


def _trace_and_save(model: torch.nn.Module, scored: bool, output_file: str, class_names: list[str], spatial_size: int,
                    metadata: dict[str, str], opset_version: int | None, signing_key) -> int:
    """Trace ``model`` to ONNX (``scored``: with the ``ood_score`` output), add the metadata and its integrity
    fields, check and save it; the opset written."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        raw_file = os.path.join(tmp, "raw.onnx")
        batch = torch.export.Dim("batch", min=1)
        # A batch of 2 for tracing so that the batch axis is not specialised to 1.
        output_names = [OUTPUT_NAME, SCORE_NAME] if scored else [OUTPUT_NAME]
        torch.onnx.export(model, (torch.rand(2, 1, spatial_size, spatial_size),), raw_file, dynamo=True,
                          input_names=[INPUT_NAME], output_names=output_names, opset_version=opset_version,
                          dynamic_shapes={INPUT_NAME: {0: batch}}, external_data=False, verbose=False)
        proto = onnx.load(raw_file)
    del proto.metadata_props[:]
    proto.doc_string = f"robustmri classifier ({', '.join(class_names)}). {INTENDED_USE}"
    onnx.checker.check_model(proto, full_check=True)
    metadata.update(integrity_fields(proto, metadata, signing_key))  # over the graph as saved, metadata last
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, output_file)
    return max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


#: The test metrics copied from the bundle's evaluation (``<eval_dir>/test/summary.json``).
TEST_METRICS = ("n", "accuracy", "macro_f1", "roc_auc_macro")


def checkpoint_provenance(checkpoint: str | os.PathLike, eval_dir: str | os.PathLike | None = None) -> dict | None:
    """What trained ``checkpoint``: the ``provenance`` record of ``model_metadata.json`` beside it, for export.

    None when there is no record (trained before provenance was recorded). Adds ``checkpoint``
    (``file``: base name, ``sha256``, ``bound``: whether it is the final model the recorded
    training wrote, ``selection``: which weights it holds) and, when the bundle's evaluation in
    ``eval_dir`` evaluated this very file (same sha256), ``metrics.test``. A record whose final
    checkpoint has the same name but other bytes describes another training run: ``ValueError``.
    The validation metrics, which describe the final checkpoint, are dropped for any other.
    """
    checkpoint = os.fspath(checkpoint)
    path = metadata_path(checkpoint)
    if not os.path.isfile(path):
        logger.warning("no %s beside %s: the model's provenance is not recorded", os.path.basename(path), checkpoint)
        return None
    with open(path) as handle:
        content = json.load(handle)
    record = content.get("provenance")
    if not isinstance(record, dict):
        logger.warning("%s has no provenance record (trained before it was written): not recorded", path)
        return None
    record = copy.deepcopy(record)
    sha = file_sha256(checkpoint)
    name = os.path.basename(checkpoint)
    final = (record.get("training") or {}).get("final_checkpoint") or {}
    if final.get("file") == name and final.get("sha256") != sha:
        raise ValueError(f"{path} describes another training run: the {name} it wrote had sha256 {final['sha256']}, "
                         f"{checkpoint} has {sha}; export the checkpoint that run wrote, or retrain")
    bound = final.get("sha256") == sha
    selection = ((content.get("trained_with") or {}).get("model_weights") if bound else
                 f"{name}, not the final model of the recorded training run (chosen by its file name)")
    record["checkpoint"] = {"file": name, "sha256": sha, "bound": bound, "selection": selection}
    metrics = record.setdefault("metrics", {})
    if not bound:
        metrics.pop("validation", None)
        logger.warning("%s is not the final model recorded in %s: its provenance is that run's, marked unbound",
                       checkpoint, path)
    if eval_dir:
        summary_file = os.path.join(os.fspath(eval_dir), "test", "summary.json")
        summary = {}
        if os.path.isfile(summary_file):
            with open(summary_file) as handle:
                summary = json.load(handle)
        for tag, entry in summary.items():
            if isinstance(entry, dict) and entry.get("checkpoint_sha256") == sha:
                metrics["test"] = {"checkpoint_tag": tag, **{key: entry.get(key) for key in TEST_METRICS}}
                break
    return record


def check_parity(onnx_file: str | os.PathLike, model: torch.nn.Module, images: np.ndarray,
                 batch_size: int = 32, atol: float = PARITY_ATOL, score_rtol: float = SCORE_PARITY_RTOL,
                 state: AbstentionState | None = None) -> dict:
    """Compare ONNX Runtime (CPU) with PyTorch on ``images``; raise :class:`ParityError` beyond ``atol``.

    ``model`` must output probabilities (wrap a logits network in :class:`ProbabilityHead`), or
    ``(probabilities, ood_score)`` (:class:`~robustmri.deploy.onnx.ood.ScoredClassifier`): then the score
    must agree within ``score_rtol * max(1, |score|)``, and, with ``state`` (the abstention state the graph
    holds), so must the graph's float32 score and the state's float64 score of the same features
    (``ood_state_max_rel_diff``; ``ood_state_decisions_differ`` counts images on which the two fall on
    different sides of the threshold, which only an image scoring within that difference of it can).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 1 or len(images) == 0:
        raise ValueError(f"parity images must be a non-empty [N, 1, H, W] array, got shape {images.shape}")
    classifier = OnnxClassifier(onnx_file, device="cpu")
    model = model.cpu().eval()
    max_diff, mismatches, score_diff, scored = 0.0, 0, 0.0, False
    state_diff, decisions = 0.0, 0
    strategy = strategy_of(state) if state is not None else None
    # a rank score (an empirical CDF) moves by a whole reference step when a score ties with a reference score
    # in one float precision and not in the other: one such step per component is allowed
    score_rtol = score_rtol + tie_step(state) if state is not None else score_rtol
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            expected = model(torch.from_numpy(chunk))
            if isinstance(expected, tuple):
                scored = True
                expected, expected_score = expected[0].numpy(), expected[1].double().numpy()
                got, got_score = classifier.predict_with_scores(chunk)
                if got_score is None:
                    raise ParityError(f"{onnx_file}: PyTorch gives an OOD score but the ONNX model has no "
                                      f"{SCORE_NAME!r} output")
                relative = np.abs(got_score - expected_score) / np.maximum(1.0, np.abs(expected_score))
                score_diff = max(score_diff, float(relative.max()))
                if strategy is not None:  # the float64 reference: the state's own score of these features
                    features, logits = model.final_layer(torch.from_numpy(chunk))
                    reference = strategy.score(state.arrays, features.double().numpy(), logits.double().numpy())
                    relative = np.abs(got_score - reference) / np.maximum(1.0, np.abs(reference))
                    state_diff = max(state_diff, float(relative.max()))
                    decisions += int((state.accepts(got_score) != state.accepts(reference)).sum())
            else:
                expected = expected.numpy()
                got = classifier.predict(chunk)
            max_diff = max(max_diff, float(np.abs(got - expected).max()))
            mismatches += int((got.argmax(1) != expected.argmax(1)).sum())
    report = {"n": int(len(images)), "max_abs_diff": max_diff, "class_mismatches": mismatches, "atol": atol}
    passed = max_diff <= atol and mismatches == 0
    if scored:
        report.update(ood_score_max_rel_diff=score_diff, ood_score_rtol=score_rtol)
        passed = passed and score_diff <= score_rtol
        if strategy is not None:
            report.update(ood_state_max_rel_diff=state_diff, ood_state_decisions_differ=decisions)
            passed = passed and state_diff <= score_rtol
    report["passed"] = bool(passed)
    logger.info("ONNX parity on %d image(s): max |dp| = %.3g, %d class mismatch(es)%s", report["n"], max_diff,
                mismatches, f", OOD score max relative difference {score_diff:.3g}" if scored else "")
    if not report["passed"]:
        raise ParityError(f"{onnx_file}: ONNX Runtime differs from PyTorch on {report['n']} image(s): "
                          f"max |dp| = {max_diff:.3g} (limit {atol:g}), {mismatches} different class(es)"
                          + (f", OOD score relative difference {score_diff:.3g} (limit {score_rtol:g})"
                             if scored else "")
                          + (f", float64 state score relative difference {state_diff:.3g}" if strategy is not None
                             else ""))
    return report


def _describe(network: torch.nn.Module) -> str:
    """What the network is, for a reader of the model's metadata: true and cheap for any module.

    Its class, the constructor settings of the paper's CNN (that a reader needs to rebuild it),
    its number of parameters and the final linear layer influence works on (as
    :class:`robustmri.influence.FinalLayer` finds it), e.g.
    ``monai.networks.nets.densenet.DenseNet121; 6,950,659 parameters; final layer class_layers.out: Linear(1024, 3)``.
    """
    network = unwrap(network)
    name = f"{type(network).__module__}.{type(network).__qualname__}"
    if isinstance(network, PaperCNN):
        conv = network.encoder[0]
        name += f"(kernel_size={conv.kernel_size[0]}, padding={conv.padding[0]}, feature_dim={network.feature_dim})"
    parts = [name, f"{sum(p.numel() for p in network.parameters()):,} parameters"]
    try:
        layer_name, layer = find_final_linear(network)
        parts.append(f"final layer {layer_name}: Linear({layer.in_features}, {layer.out_features}"
                     f"{'' if layer.bias is not None else ', bias=False'})")
    except FinalLayerError:
        parts.append("no linear layer")
    return "; ".join(parts)
