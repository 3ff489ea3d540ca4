"""Run an exported classifier with ONNX Runtime: CUDA when it can, CPU otherwise, and say which ran.

Deployment needs neither PyTorch nor the training code: this module imports only onnxruntime and numpy.

The model's own metadata (written by :mod:`robustmri.deploy.onnx.export`) gives the class names, the
input size and the preprocessing by name; :meth:`OnnxClassifier.prepare` applies that
preprocessing with the library's one implementation. A model whose preprocessing this library
does not have, or describes differently, is refused, since it would see images prepared
differently from training.

Every load verifies the model first (:mod:`robustmri.deploy.onnx.trust`): the integrity digest
written at export over the graph, the weights and every metadata field, and, given a public key,
the exporter's Ed25519 signature. A model that fails, or that carries no digest, is refused with a
:class:`~robustmri.deploy.onnx.trust.ModelIntegrityError` naming the file; the verified bytes are
the ones the session runs.

Out-of-distribution detection: a model exported with its detector has a second output,
``ood_score`` [N] (higher = more out of distribution, :mod:`robustmri.deploy.onnx.ood`), and the
detector's metadata (threshold calibrated on validation, target acceptance, abstention rule).
:meth:`OnnxClassifier.predict_with_scores` returns both outputs and :meth:`OnnxClassifier.is_assessable`
applies the threshold (score <= threshold: assessable). A model without the detector still
predicts (``has_detector`` is False; file inference may say so), but
:meth:`OnnxClassifier.require_detector`, which DICOM inference calls, refuses it.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from robustmri.data.preprocessing import check_preprocess, preprocess_for_description, preprocessing_by_name
from robustmri.deploy.onnx.trust import (
    DEMO_MODEL_NOTICE,
    ModelIntegrityError,  # noqa: F401  (raised by OnnxClassifier; importable from here)
    ModelMetadataError,
    is_demo_model,
    provenance_summary,
    verify_model,
)

logger = logging.getLogger(__name__)

#: The exported graph's input and output names (see :mod:`robustmri.deploy.onnx.export`).
INPUT_NAME = "image"
OUTPUT_NAME = "pred"
SCORE_NAME = "ood_score"
#: Detector metadata read here (written with the ``ood_score`` output; see ``export.OOD_METADATA_KEYS``).
DETECTOR_KEYS = ("ood_detector", "ood_detector_description", "ood_threshold", "ood_target_acceptance",
                 "ood_n_train", "ood_series_max_not_assessable", "ood_abstention_rule")
#: How to get a model with the detector: the one-line advice of every refusal for want of it.
DETECTOR_REEXPORT_HINT = ("re-export it with the training and validation splits (python scripts/export_onnx.py "
                          "--checkpoint model.pt --output model.onnx --dataset_dir DATA, or the bundle's export.json)")
#: ONNX metadata keys written by :func:`robustmri.deploy.onnx.export.export_onnx` and required here.
METADATA_KEYS = ("class_names", "spatial_size", "intensity_normalisation", "model_version", "checkpoint_sha256",
                 "network", "exported_by", "intended_use")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES = ("auto", "cuda", "cpu")


def choose_providers(device: str = "auto") -> list[str]:
    """Execution providers in order of preference.

    ``auto``: CUDA when the installed onnxruntime offers it (the ``gpu`` extra), else CPU;
    ``cuda``: CUDA or an error saying what to install; ``cpu``: CPU only.
    """
    import onnxruntime

    device = str(device).lower()
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    available = onnxruntime.get_available_providers()
    if device == "cpu":
        return [CPU]
    if CUDA in available:
        _preload_cuda_libraries(onnxruntime)
        return [CUDA, CPU]
    if device == "cuda":
        raise RuntimeError(f"device 'cuda' asked for, but this onnxruntime offers only {available}; install the "
                           "gpu extra (onnxruntime-gpu) on a machine with an NVIDIA GPU and CUDA")
    return [CPU]


def _preload_cuda_libraries(onnxruntime) -> None:
    """Load the CUDA and cuDNN libraries that torch's wheels installed (``nvidia-*`` packages) for the CUDA provider.

    onnxruntime-gpu finds them on the loader path only; ``onnxruntime.preload_dlls`` (onnxruntime >= 1.21)
    loads them from the Python environment. Failures are left to the session, which then reports the
    provider it could use.
    """
    preload = getattr(onnxruntime, "preload_dlls", None)
    if preload is not None:
        try:
            preload(cuda=True, cudnn=True, msvc=False)
        except Exception as err:  # noqa: BLE001 - any failure means: the session decides
            logger.debug("onnxruntime.preload_dlls failed: %s", err)


def read_metadata(model) -> dict:
    """Parse and check the metadata of an ``onnxruntime.InferenceSession`` (or anything with ``get_modelmeta``)."""
    props = dict(model.get_modelmeta().custom_metadata_map)
    missing = [key for key in METADATA_KEYS if key not in props]
    if missing:
        raise ModelMetadataError(f"ONNX model metadata lacks {missing}: export it with robustmri.deploy.onnx.export "
                                 "(scripts/export_onnx.py or the bundle's export.json)")
    try:  # models exported before the name was written carry only the description
        name = props.get("preprocess") or preprocess_for_description(props["intensity_normalisation"], "the model")
        check_preprocess(name, props["intensity_normalisation"], source="the model")
    except ValueError as err:
        raise ModelMetadataError(str(err)) from None
    try:
        class_names = [str(name) for name in json.loads(props["class_names"])]
        spatial_size = int(props["spatial_size"])
    except (ValueError, TypeError) as err:
        raise ModelMetadataError(f"unreadable class_names / spatial_size in ONNX metadata ({err})") from err
    return {**props, "class_names": class_names, "spatial_size": spatial_size, "preprocess": name}


def read_detector(props: dict, output_names, model_file: str = "the model") -> dict | None:
    """The OOD detector's settings from the metadata, or None for a model exported without one.

    The ``ood_score`` output and the detector's metadata come together; one without the other,
    or an unreadable number, is refused.
    """
    present = [key for key in DETECTOR_KEYS if key in props]
    has_output = SCORE_NAME in output_names
    if not present and not has_output:
        return None
    missing = [key for key in DETECTOR_KEYS if key not in props]
    if not has_output or missing:
        raise ModelMetadataError(f"{model_file}: inconsistent OOD detector (output {SCORE_NAME!r} "
                                 f"{'present' if has_output else 'absent'}, metadata lacks {missing}); "
                                 f"{DETECTOR_REEXPORT_HINT}")
    try:
        detector = {"name": props["ood_detector"], "description": props["ood_detector_description"],
                    "threshold": float(props["ood_threshold"]),
                    "target_acceptance": float(props["ood_target_acceptance"]),
                    "n_train": int(props["ood_n_train"]),
                    "series_max_not_assessable": float(props["ood_series_max_not_assessable"]),
                    "abstention_rule": props["ood_abstention_rule"]}
    except ValueError as err:
        raise ModelMetadataError(f"{model_file}: unreadable OOD detector metadata ({err}); "
                                 f"{DETECTOR_REEXPORT_HINT}") from None
    if not (np.isfinite(detector["threshold"]) and 0.0 <= detector["series_max_not_assessable"] < 1.0):
        raise ModelMetadataError(f"{model_file}: invalid OOD threshold {detector['threshold']} or series share "
                                 f"{detector['series_max_not_assessable']}; {DETECTOR_REEXPORT_HINT}")
    return detector


class OnnxClassifier:
    """A loaded ONNX classifier: ``predict(images [N, 1, S, S] float32) -> probabilities [N, C]``.

    ``predict_with_scores`` adds the OOD score [N] (None without a detector); ``detector`` holds the
    detector's metadata (:func:`read_detector`) or None.
    """

    def __init__(self, model_file: str | os.PathLike, device: str = "auto", intra_op_num_threads: int = 0,
                 public_key: str | os.PathLike | None = None):
        """Load and verify ``model_file``; ``public_key``: an Ed25519 public key (PEM) whose signature it must carry."""
        import onnxruntime

        self.model_file = os.path.abspath(os.fspath(model_file))
        if not os.path.isfile(self.model_file):
            raise FileNotFoundError(f"{self.model_file}: ONNX model not found; export one first "
                                    "(python scripts/export_onnx.py or the bundle's export.json)")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(intra_op_num_threads)
        options.log_severity_level = 3  # errors only: onnxruntime warns about CPU fallbacks on stderr
        requested = choose_providers(device)
        with open(self.model_file, "rb") as handle:
            model_bytes = handle.read()
        self.trust: dict = verify_model(self.model_file, model_bytes, public_key)
        try:
            self.session = onnxruntime.InferenceSession(model_bytes, sess_options=options, providers=requested)
        except Exception as err:  # onnxruntime raises its own exception types for corrupt files
            raise ModelMetadataError(f"{self.model_file}: not a loadable ONNX model ({err})") from err
        self.metadata = read_metadata(self.session)
        try:
            self.provenance: dict | None = json.loads(self.metadata.get("provenance") or "null")
        except json.JSONDecodeError as err:
            raise ModelMetadataError(f"{self.model_file}: unreadable provenance in ONNX metadata ({err})") from None
        self.demo_model: bool = is_demo_model(self.metadata)
        self.class_names: list[str] = self.metadata["class_names"]
        self.spatial_size: int = self.metadata["spatial_size"]
        self.preprocess: str = self.metadata["preprocess"]
        self._prepare = preprocessing_by_name(self.preprocess)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
            raise ModelMetadataError(f"{self.model_file}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                                     f"got {[i.name for i in inputs]} -> {[o.name for o in outputs]}")
        self.detector: dict | None = read_detector(self.session.get_modelmeta().custom_metadata_map,
                                                   [o.name for o in outputs], self.model_file)
        if self.detector is None:
            logger.warning("%s has no out-of-distribution detector: its answers on inputs unlike its training data "
                           "cannot be flagged (DICOM inference refuses it); %s", os.path.basename(self.model_file),
                           DETECTOR_REEXPORT_HINT)
        # The session may fall back silently (CUDA provider present but no usable GPU): report what it holds.
        self.providers: list[str] = list(self.session.get_providers())
        self.provider: str = self.providers[0]
        if requested[0] == CUDA and self.provider != CUDA:
            if str(device).lower() == "cuda":  # asked for explicitly: running elsewhere would be a silent change
                raise RuntimeError(f"device 'cuda' asked for, but the CUDA execution provider is not usable here "
                                   f"(no usable GPU or CUDA libraries); the session runs on {self.provider}. Use "
                                   "--device cpu or auto to run on the CPU")
            logger.warning("CUDA execution provider present but not usable here; running on %s", self.provider)
        logger.info("ONNX model %s: version %s, %s, providers %s, integrity sha256 %s verified, signature %s",
                    os.path.basename(self.model_file), self.metadata["model_version"] or "?", self.class_names,
                    self.providers, self.trust["integrity_sha256"], self.trust["signature"])
        if self.demo_model:
            logger.warning("%s: %s", os.path.basename(self.model_file), DEMO_MODEL_NOTICE)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """One raw 2-D slice to the model's input [1, S, S], by the preprocessing the model was trained with.

        ``ValueError`` for a slice it cannot prepare (constant, or no head found).
        """
        return self._prepare(image, self.spatial_size)[None]

    def _checked(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        expected = (1, self.spatial_size, self.spatial_size)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"expected images [N, {', '.join(map(str, expected))}], got {images.shape}")
        return images

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class probabilities [N, C] of prepared images [N, 1, S, S]."""
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: self._checked(images)})[0]

    def predict_with_scores(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(probabilities [N, C], ood_score [N] float64 or None)``: one run gives both; None without a detector."""
        images = self._checked(images)
        if self.detector is None:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0], None
        probabilities, scores = self.session.run([OUTPUT_NAME, SCORE_NAME], {INPUT_NAME: images})
        return probabilities, scores.astype(np.float64)

    @property
    def has_detector(self) -> bool:
        return self.detector is not None

    @property
    def ood_threshold(self) -> float:
        """Scores above it are not assessable (:class:`ModelMetadataError` without a detector)."""
        return self.require_detector()["threshold"]

    def is_assessable(self, scores: np.ndarray) -> np.ndarray:
        """Boolean [N]: the score is at or below the model's threshold (the model can vouch for the slice)."""
        return np.asarray(scores, dtype=np.float64) <= self.ood_threshold

    def require_detector(self) -> dict:
        """The detector's settings; :class:`ModelMetadataError` (one line) for a model without one."""
        if self.detector is None:
            raise ModelMetadataError(f"{self.model_file}: the model has no out-of-distribution detector "
                                     f"({SCORE_NAME!r} output), so it cannot vouch for its inputs and DICOM inference "
                                     f"refuses it; {DETECTOR_REEXPORT_HINT}")
        return self.detector

    def describe(self) -> dict:
        """What a report should say about the model that produced it.

        ``integrity_sha256`` is the digest verified on load (the model's identity); ``signature``
        says whether a signature was checked; ``checkpoint_sha256`` is what the exporter recorded of
        its source checkpoint (covered by the digest, not checked against any file here);
        ``demo_model`` and ``notice`` mark a demo model; ``provenance`` is the training record.
        """
        description = {"file": self.model_file, "version": self.metadata["model_version"],
                       "integrity_sha256": self.trust["integrity_sha256"], "integrity": self.trust["integrity"],
                       "signature": self.trust["signature"],
                       "signing_key_fingerprint": self.trust["signing_key_fingerprint"],
                       "checkpoint_sha256": self.metadata["checkpoint_sha256"], "network": self.metadata["network"],
                       "class_names": self.class_names, "spatial_size": self.spatial_size,
                       "preprocess": self.preprocess,
                       "intensity_normalisation": self.metadata["intensity_normalisation"],
                       "demo_model": self.demo_model, "trained_on": provenance_summary(self.provenance),
                       "provenance": self.provenance, "provider": self.provider, "providers": self.providers,
                       "ood_detector": None if self.detector is None else {
                           key: self.detector[key] for key in ("name", "threshold", "target_acceptance", "n_train",
                                                               "series_max_not_assessable")}}
        if self.demo_model:
            description["notice"] = DEMO_MODEL_NOTICE
        return description
