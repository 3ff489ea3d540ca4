"""Tiny exported models and DICOM folders for the deployment tests."""

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from robustmri import CLASS_NAMES
from robustmri.networks import PaperCNN

TINY_SIZE = 32


def tiny_network(seed: int = 0) -> PaperCNN:
    """A PaperCNN at 32 x 32 with random weights and non-trivial BatchNorm statistics (eval mode)."""
    torch.manual_seed(seed)
    network = PaperCNN(spatial_size=TINY_SIZE, padding=2, channels=(4, 4, 8, 8, 8))
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return network.eval()


def synthetic_detector_data(patients: int = 40, seed: int = 1):
    """``(ood_train, ood_validation)`` for :func:`export_onnx`: the embedded synthetic set's train and val splits."""
    from robustmri.data.protocol import build_protocol
    from robustmri.deploy.onnx.export import split_arrays

    data = build_protocol(None, spatial_size=TINY_SIZE, synthetic_patients=patients, seed=seed, preprocess="minmax")
    return split_arrays(data, "train"), split_arrays(data, "val")[0]


def accepting_detector_data(images, copies: int = 4, seed: int = 0):
    """Detector data under which ``images`` (prepared [N, 1, S, S]) are in distribution by construction.

    Training: ``copies`` noisy copies of each image (labels cycled over the classes), so the
    covariance has every direction; validation: the images themselves, to be exported with
    ``target_acceptance=1.0``, so the threshold is their largest score. For the tests of the series
    logic (ordering, completeness, privacy), which must not depend on a random network's notion of
    out of distribution; the abstention tests use a detector fitted on a trained network.
    """
    images = np.asarray(images, dtype=np.float32)
    rng = np.random.default_rng(seed)
    train = np.concatenate([np.clip(images + rng.normal(0, 0.05, images.shape), 0, 1) for _ in range(copies)])
    labels = np.arange(len(train)) % len(CLASS_NAMES)
    return (train.astype(np.float32), labels), images


def gradient_detector_data(seeds=range(5), n: int = 5, extra=()):
    """:func:`accepting_detector_data` for the gradient series of ``seeds`` (``n`` slices each) and ``extra`` raw
    slices, prepared as a tiny model prepares them (min-max): for tests whose subject is not the detector."""
    from robustmri.data.preprocessing import preprocess_minmax

    images = [g for k in seeds for g in gradient_series(n, seed=k)] + list(extra)
    prepared = np.stack([preprocess_minmax(np.asarray(i, np.float32), TINY_SIZE) for i in images])[:, None]
    return accepting_detector_data(prepared)


@functools.lru_cache(maxsize=None)
def signing_keys() -> tuple[str, str]:
    """(private, public) PEM files of one Ed25519 key pair for the whole test session: models that DICOM inference
    accepts are signed (it refuses unsigned ones by default), with this key."""
    from robustmri.deploy.onnx.trust import write_key_pair

    folder = tempfile.mkdtemp(prefix="robustmri-test-keys-")
    private, public = os.path.join(folder, "signing.pem"), os.path.join(folder, "signing.pub.pem")
    write_key_pair(private, public)
    return private, public


def signed_classifier(onnx_file, **kwargs):
    """``OnnxClassifier`` of a model exported with ``signed=True``, its signature verified with :func:`signing_keys`."""
    from robustmri.deploy.onnx.runtime import OnnxClassifier

    return OnnxClassifier(onnx_file, device="cpu", public_key=signing_keys()[1], **kwargs)


def run_infer_dicom(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """``scripts/infer_dicom.py`` with ``args`` and the public key of :func:`signing_keys` (models from
    ``export_tiny(signed=True)`` pass its signature check), its output captured."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "infer_dicom.py"
    return subprocess.run([sys.executable, str(script), *map(str, args), "--public_key", signing_keys()[1]],
                          capture_output=True, text=True, timeout=timeout)


def export_tiny(tmp_path: Path, seed: int = 0, parity_images=None, ood=None, target_acceptance: float = 0.95,
                signed: bool = False):
    """Save a tiny checkpoint, export it (min-max preprocessing, as its detector data); return (network, checkpoint,
    onnx file, export result). ``signed``: signed with :func:`signing_keys` (load it with :func:`signed_classifier`).

    ``ood``: ``(ood_train, ood_validation)`` for the detector (default :func:`synthetic_detector_data`);
    ``False`` exports without a detector.
    """
    from robustmri.deploy.onnx.export import export_onnx

    network = tiny_network(seed)
    checkpoint = tmp_path / "model.pt"
    torch.save(network.state_dict(), checkpoint)
    onnx_file = tmp_path / "model.onnx"
    ood_train, ood_validation = (None, None) if ood is False else (ood or synthetic_detector_data())
    result = export_onnx(network, onnx_file, CLASS_NAMES, TINY_SIZE, checkpoint=checkpoint, model_version="9.9.9",
                         preprocess="minmax", parity_images=parity_images, ood_train=ood_train, ood_validation=ood_validation,
                         target_acceptance=target_acceptance, signing_key=signing_keys()[0] if signed else None)
    return network, checkpoint, onnx_file, result


def exported_apart(tmp_path: Path, **kwargs) -> Path:
    """:func:`export_tiny` (``kwargs`` as there) in a forked child (:func:`helpers.killed_in_a_child`, which says
    why); the ONNX file."""
    from helpers import killed_in_a_child

    signing_keys()  # made here, so the child signs with the very key the tests then give the node
    exit_code = killed_in_a_child(lambda: export_tiny(tmp_path, **kwargs), timeout=600)
    onnx_file = tmp_path / "model.onnx"
    assert exit_code == 0 and onnx_file.is_file(), f"the export failed in its child (exit {exit_code})"
    return onnx_file


def write_trained(folder: Path, network: torch.nn.Module, spatial_size: int, network_padding: int = 2,
                  preprocess: str = "minmax") -> Path:
    """``folder/model.pt`` and the ``model_metadata.json`` training writes beside it; the checkpoint's path."""
    from robustmri.engine.model_metadata import METADATA_FILE, model_metadata
    from robustmri.outputs import write_json

    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "model.pt"
    torch.save(network.state_dict(), checkpoint)
    write_json(folder / METADATA_FILE, model_metadata(None, spatial_size, network_padding, network, CLASS_NAMES,
                                                      preprocess=preprocess))
    return checkpoint


def pydicom_file(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert path, f"pydicom's test file {name} is not bundled with this pydicom"
    return path


def copy_pydicom_files(folder: Path, *names: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    return {name: shutil.copy(pydicom_file(name), folder / name) for name in names}


def gradient_series(n: int = 4, size: int = 40, seed: int = 0) -> list[np.ndarray]:
    """Distinct slices whose values are multiples of 0.25 (exact through slope 0.25, intercept -10)."""
    rng = np.random.default_rng(seed)
    base = np.add.outer(np.arange(size), np.arange(size)).astype(np.float64)
    return [base * (k + 1) + rng.integers(0, 40, (size, size)) * 0.25 for k in range(n)]


def rewrite_metadata(src, dst, reseal: bool = False, signing_key=None, **changes):
    """Copy an exported model with metadata entries changed (value None: removed).

    ``reseal``: recompute the integrity digest afterwards (signed with ``signing_key`` if given), as
    an exporter would: a model that is intact but says something else; without it the copy is a
    model tampered with after export.
    """
    import onnx

    from robustmri.deploy.onnx.trust import TRUST_KEYS, integrity_fields

    model = onnx.load(src)
    props = {p.key: p.value for p in model.metadata_props}
    props.update(changes)
    if reseal:
        props = {k: v for k, v in props.items() if k not in TRUST_KEYS + ("graph_sha256", "integrity_covers")}
    del model.metadata_props[:]
    if reseal:
        props.update(integrity_fields(model, {k: v for k, v in props.items() if v is not None}, signing_key))
    for key, value in props.items():
        if value is not None:
            model.metadata_props.add(key=key, value=value)
    onnx.save(model, dst)
    return dst
