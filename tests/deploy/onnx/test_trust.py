"""Model integrity and provenance: the digest verified on every load, Ed25519 signatures, what trained the model,
and the demo-model rule of DICOM inference."""

import base64
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pydicom
import pytest
import torch

from robustmri import CLASS_NAMES, INTENDED_USE
from robustmri.bench.dicom_fixtures import write_mr_series
from robustmri.data.protocol import build_protocol
from robustmri.deploy.dicom.study import infer_dicom
from robustmri.deploy.onnx.export import checkpoint_provenance, export_onnx
from robustmri.deploy.onnx.runtime import OnnxClassifier
from robustmri.deploy.onnx.trust import (
    DEMO_MODEL_NOTICE,
    INTEGRITY_SCHEME,
    TRUST_KEYS,
    DemoModelError,
    ModelIntegrityError,
    UnsignedModelError,
    key_fingerprint,
    load_public_key,
    verify_model,
    write_key_pair,
)
from robustmri.engine.model_metadata import FINGERPRINT_RULE, METADATA_FILE, ModelMetadataWriter, file_sha256
from robustmri.outputs import write_json

from conftest import BUNDLE, ROOT
from deploy_helpers import (
    TINY_SIZE,
    export_tiny,
    gradient_detector_data,
    gradient_series,
    rewrite_metadata,
    tiny_network,
)
from helpers import write_png

# nearly every test needs an exported, signed ONNX model (module fixtures) or a bundle run
pytestmark = pytest.mark.slow


def _props(onnx_file) -> dict:
    return {p.key: p.value for p in onnx.load(onnx_file).metadata_props}


def _one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    fingerprint = write_key_pair(folder / "a.pem", folder / "a.pub.pem")
    write_key_pair(folder / "b.pem", folder / "b.pub.pem")
    return folder, fingerprint


@pytest.fixture(scope="module")
def models(tmp_path_factory, keys):
    """A tiny network exported, and the same model signed with key a (as export signs: tested below)."""
    tmp = tmp_path_factory.mktemp("trust")
    # a detector that accepts the gradient series these tests classify (their subject is the model's integrity)
    network, _, onnx_file, _ = export_tiny(tmp, ood=gradient_detector_data(), target_acceptance=1.0)
    signed = rewrite_metadata(onnx_file, tmp / "signed.onnx", reseal=True, signing_key=keys[0] / "a.pem")
    return network, onnx_file, signed


# -- the digest --------------------------------------------------------------------------------------------------


def test_the_digest_is_what_the_docstring_says(models):
    """Recomputed here from its definition, independently of model_trust."""
    _, onnx_file, _ = models
    model = onnx.load(onnx_file)
    props = {p.key: p.value for p in model.metadata_props}
    del model.metadata_props[:]
    graph = hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()
    assert props["graph_sha256"] == graph
    covered = {k: v for k, v in props.items() if k not in TRUST_KEYS}
    assert json.loads(props["integrity_covers"]) == sorted(covered)
    assert {"class_names", "spatial_size", "preprocess", "intensity_normalisation", "provenance",
            "demo_model"} <= set(covered)
    text = json.dumps({"scheme": INTEGRITY_SCHEME, "graph_sha256": graph, "metadata": covered}, sort_keys=True,
                      separators=(",", ":"))
    assert props["integrity_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert "signature" not in props


def test_an_untouched_model_loads_and_reports_its_verified_digest(models):
    _, onnx_file, _ = models
    classifier = OnnxClassifier(onnx_file, device="cpu")
    described = classifier.describe()
    assert described["integrity"] == "verified"
    assert described["integrity_sha256"] == _props(onnx_file)["integrity_sha256"]
    assert described["signature"] == "unsigned (no public key given)"
    assert described["demo_model"] is False and described["trained_on"] == "training data not recorded"
    assert "notice" not in described


def _swap_class_names(onnx_file, tmp_path):
    names = list(CLASS_NAMES)
    names[0], names[1] = names[1], names[0]
    return rewrite_metadata(onnx_file, tmp_path / "swapped.onnx", class_names=json.dumps(names))


def test_swapped_class_names_are_refused(models, tmp_path):
    """The attack of the finding: meningioma read as glioma after editing the metadata."""
    _, onnx_file, _ = models
    swapped = _swap_class_names(onnx_file, tmp_path)
    with pytest.raises(ModelIntegrityError) as error:
        OnnxClassifier(swapped, device="cpu")
    assert _one_line(error).startswith(f"{swapped}: integrity check failed: metadata changed after export")


def test_a_changed_spatial_size_is_refused(models, tmp_path):
    _, onnx_file, _ = models
    changed = rewrite_metadata(onnx_file, tmp_path / "size.onnx", spatial_size="64")
    with pytest.raises(ModelIntegrityError, match="metadata changed after export"):
        OnnxClassifier(changed, device="cpu")


def test_a_changed_weight_is_refused(models, tmp_path):
    _, onnx_file, _ = models
    model = onnx.load(onnx_file)
    initializer = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = onnx.numpy_helper.to_array(initializer).copy()
    weights.flat[0] += 0.5
    initializer.CopyFrom(onnx.numpy_helper.from_array(weights, initializer.name))
    changed = tmp_path / "weights.onnx"
    onnx.save(model, changed)
    with pytest.raises(ModelIntegrityError) as error:
        OnnxClassifier(changed, device="cpu")
    assert "the weights or graph changed after export" in _one_line(error) and str(changed) in str(error.value)


def test_added_or_removed_metadata_is_refused(models, tmp_path):
    _, onnx_file, _ = models
    added = rewrite_metadata(onnx_file, tmp_path / "added.onnx", added_setting="99")
    with pytest.raises(ModelIntegrityError, match=r"metadata keys changed after export \(added \['added_setting'\]"):
        OnnxClassifier(added, device="cpu")
    removed = rewrite_metadata(onnx_file, tmp_path / "removed.onnx", network=None)
    with pytest.raises(ModelIntegrityError, match=r"removed \['network'\]"):
        OnnxClassifier(removed, device="cpu")


def test_a_model_without_a_digest_is_refused_with_how_to_re_export(models, tmp_path):
    """A model exported before this check (no integrity fields at all)."""
    _, onnx_file, _ = models
    old = rewrite_metadata(onnx_file, tmp_path / "old.onnx", integrity_sha256=None, graph_sha256=None,
                           integrity_covers=None)
    with pytest.raises(ModelIntegrityError) as error:
        OnnxClassifier(old, device="cpu")
    assert "no integrity digest" in _one_line(error) and "scripts/export_onnx.py --checkpoint" in str(error.value)


def test_weights_stored_outside_the_file_are_refused(models, tmp_path):
    """External data would leave the weights out of the digest (export never writes it)."""
    _, onnx_file, _ = models
    model = onnx.load(onnx_file)
    onnx.save(model, tmp_path / "external.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    with pytest.raises(ModelIntegrityError, match="weights stored outside the model file"):
        OnnxClassifier(tmp_path / "external.onnx", device="cpu")


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01not a model")
    with pytest.raises(ModelIntegrityError, match="not a readable ONNX model"):
        OnnxClassifier(bad, device="cpu")


# -- signatures --------------------------------------------------------------------------------------------------


def test_a_signed_model_verifies_with_its_public_key(models, keys):
    folder, fingerprint = keys
    _, _, signed = models
    props = _props(signed)
    assert props["signature_algorithm"] == "ed25519" and props["signing_key_fingerprint"] == fingerprint
    classifier = OnnxClassifier(signed, device="cpu", public_key=folder / "a.pub.pem")
    assert classifier.describe()["signature"] == "verified"
    assert classifier.describe()["signing_key_fingerprint"] == fingerprint
    # independently: the raw signature over the documented message, with cryptography directly
    load_public_key(folder / "a.pub.pem").verify(base64.b64decode(props["signature"]),
                                                 b"robustmri-model-signature-1:" + props["integrity_sha256"].encode())
    # without a key the signature is reported as not checked
    assert OnnxClassifier(signed, device="cpu").describe()["signature"] == "not checked (no public key given)"


def test_unsigned_or_otherwise_signed_models_are_refused_given_a_key(models, keys):
    folder, _ = keys
    _, unsigned, signed = models
    with pytest.raises(ModelIntegrityError) as error:
        OnnxClassifier(unsigned, device="cpu", public_key=folder / "a.pub.pem")
    assert "unsigned model, but a public key was given" in _one_line(error)
    with pytest.raises(ModelIntegrityError, match="signed by another key"):
        OnnxClassifier(signed, device="cpu", public_key=folder / "b.pub.pem")


def test_a_resealed_model_fails_the_signature(models, keys, tmp_path):
    """Someone who edits the class names and recomputes the digest cannot re-sign it without the private key."""
    folder, _ = keys
    _, _, signed = models
    props = _props(signed)
    names = json.loads(props["class_names"])[::-1]
    forged = rewrite_metadata(signed, tmp_path / "forged.onnx", reseal=True, class_names=json.dumps(names))
    forged_props = _props(forged)
    assert forged_props["integrity_sha256"] != props["integrity_sha256"]
    OnnxClassifier(forged, device="cpu")  # the digest alone cannot tell
    # the forger keeps the original signature and fingerprint: the signature no longer matches the digest
    model = onnx.load(forged)
    for key in ("signature", "signature_algorithm", "signing_key_fingerprint"):
        model.metadata_props.add(key=key, value=props[key])
    onnx.save(model, forged)
    with pytest.raises(ModelIntegrityError, match="signature check failed"):
        OnnxClassifier(forged, device="cpu", public_key=folder / "a.pub.pem")


def test_export_signs_with_a_pem_key_made_by_openssl(models, tmp_path):
    """``openssl genpkey -algorithm ed25519`` keys, as the docs give them (the library's own without openssl)."""
    network, _, _ = models
    private, public = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    if shutil.which("openssl"):
        run = {"check": True, "capture_output": True, "timeout": 30}
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)], **run)
        subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], **run)
    else:
        write_key_pair(private, public)
    signed = tmp_path / "m.onnx"
    export_onnx(network, signed, CLASS_NAMES, TINY_SIZE, signing_key=private)
    classifier = OnnxClassifier(signed, device="cpu", public_key=public)
    assert classifier.describe()["signature"] == "verified"
    assert classifier.describe()["signing_key_fingerprint"] == key_fingerprint(load_public_key(public))


def test_key_script_makes_a_pair_and_never_overwrites(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "model_keys.py")]
    private, public = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    made = subprocess.run([*script, "generate", "--private", str(private), "--public", str(public)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr[-2000:]
    assert (private.stat().st_mode & 0o777) == 0o600
    shown = subprocess.run([*script, "fingerprint", str(public)], capture_output=True, text=True, timeout=60)
    assert shown.stdout.strip() == key_fingerprint(load_public_key(public)) and shown.stdout.strip() in made.stdout
    with pytest.raises(FileExistsError):
        write_key_pair(private, tmp_path / "other.pub.pem")


# -- provenance --------------------------------------------------------------------------------------------------


class _Engine:
    """What ModelMetadataWriter reads of a trainer or evaluator."""

    def __init__(self, epoch=2, max_epochs=2, metrics=None):
        from types import SimpleNamespace

        self.state = SimpleNamespace(epoch=epoch, max_epochs=max_epochs, metrics=metrics or {}, best_metric=0.75,
                                     best_metric_epoch=1)
        self.data_loader = SimpleNamespace(batch_size=8, dataset=list(range(5)))


def _train_record(folder, data, network, final=True):
    """model.pt and the model_metadata.json a completed (or interrupted) training run writes."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=5e-4)
    writer = ModelMetadataWriter(str(folder), TINY_SIZE, 2, network, CLASS_NAMES, data=data, ema_decay=0.99,
                                 preprocess="head", optimizer=optimizer, recipe={"lr_schedule": "cosine"},
                                 evaluator=_Engine(metrics={"val_accuracy": 0.8}))
    trainer = _Engine(epoch=2 if final else 1)
    writer(trainer)
    torch.save(network.state_dict(), folder / "model.pt")
    writer.completed(trainer)
    return folder / "model.pt"


def test_training_records_what_trained_the_model_and_export_copies_it(tmp_path):
    data = build_protocol(None, spatial_size=TINY_SIZE, synthetic_patients=20, seed=3, preprocess="head")
    network = tiny_network()
    checkpoint = _train_record(tmp_path, data, network)
    record = json.loads((tmp_path / METADATA_FILE).read_text())["provenance"]
    assert record["data"]["kind"] == "synthetic" and record["data"]["name"] == "embedded synthetic set"
    assert record["demo_model"] is True and record["data"]["synthetic_patients"] == 20
    assert record["protocol"]["seed"] == 3 and record["protocol"]["split_fractions"] == [0.75, 0.05, 0.2]
    assert record["protocol"]["noise"] == "gaussian" and record["protocol"]["preprocess"] == "head"
    assert record["recipe"]["method"] == "naive" and record["recipe"]["optimizer"]["name"] == "torch.optim.adamw.AdamW"
    assert record["recipe"]["optimizer"]["lr"] == 2e-3 and record["recipe"]["optimizer"]["weight_decay"] == 5e-4
    assert record["recipe"]["epochs"] == 2 and record["recipe"]["batch_size"] == 8
    assert record["recipe"]["ema_decay"] == 0.99 and record["recipe"]["lr_schedule"] == "cosine"
    assert record["code"]["robustmri_version"] and len(record["code"]["git_commit"] or "x" * 40) == 40
    assert record["training"]["completed"] and record["training"]["final_checkpoint"] == {
        "file": "model.pt", "sha256": file_sha256(checkpoint)}
    assert record["metrics"]["validation"]["last_epoch"] == {"val_accuracy": 0.8}
    # the fingerprint as documented, recomputed here from the protocol's items
    rows = sorted(([split, item["file"], None, CLASS_NAMES[item["label"]]] for split in ("train", "val", "test")
                   for item in data.split(split)), key=json.dumps)
    assert record["data"]["fingerprint_sha256"] == hashlib.sha256(
        json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
    assert record["data"]["fingerprint_rule"] == FINGERPRINT_RULE

    # the bundle's evaluation of this very checkpoint is credited, another one's is not
    write_json(tmp_path / "eval" / "test" / "summary.json", {
        "best": {"checkpoint": "x", "checkpoint_sha256": "0" * 64, "n": 9, "accuracy": 0.1, "macro_f1": 0.1,
                 "roc_auc_macro": 0.5},
        "last": {"checkpoint": "y", "checkpoint_sha256": file_sha256(checkpoint), "n": 9, "accuracy": 0.667,
                 "macro_f1": 0.6, "roc_auc_macro": 0.8}})
    provenance = checkpoint_provenance(checkpoint, tmp_path / "eval")
    assert provenance["metrics"]["test"] == {"checkpoint_tag": "last", "n": 9, "accuracy": 0.667, "macro_f1": 0.6,
                                             "roc_auc_macro": 0.8}
    assert provenance["checkpoint"]["bound"] and "moving average" in provenance["checkpoint"]["selection"]
    onnx_file = tmp_path / "model.onnx"
    export_onnx(network, onnx_file, CLASS_NAMES, TINY_SIZE, checkpoint=checkpoint, model_version="0.4.0",
                preprocess="head", provenance=provenance)
    props = _props(onnx_file)
    assert props["demo_model"] == "true" and props["model_version"] == "0.4.0+demo"
    assert json.loads(props["provenance"]) == provenance
    described = OnnxClassifier(onnx_file, device="cpu").describe()
    assert described["demo_model"] and described["notice"] == DEMO_MODEL_NOTICE
    assert described["trained_on"].startswith("data: embedded synthetic set; data fingerprint ")
    assert "test accuracy 0.667 (n=9)" in described["trained_on"]


def test_export_refuses_a_record_of_another_run_and_marks_other_checkpoints_unbound(tmp_path):
    data = build_protocol(None, spatial_size=TINY_SIZE, synthetic_patients=20, seed=0, preprocess="minmax")
    checkpoint = _train_record(tmp_path, data, tiny_network())
    torch.save(tiny_network(seed=4).state_dict(), checkpoint)  # model.pt of another run beside this record
    with pytest.raises(ValueError, match="describes another training run"):
        checkpoint_provenance(checkpoint)
    best = tmp_path / "model_best_val.pt"
    torch.save(tiny_network(seed=5).state_dict(), best)
    provenance = checkpoint_provenance(best)
    assert provenance["checkpoint"]["bound"] is False and "validation" not in provenance["metrics"]
    assert checkpoint_provenance(tmp_path / "elsewhere" / "model.pt") is None  # no record: not recorded


def _folder_dataset(root, sizes=None):
    rng = np.random.default_rng(0)
    for k, name in enumerate(CLASS_NAMES):
        for i in range(8):
            write_png(root / name / f"{name}_{i}.png", rng.integers(0, 255, ((sizes or {}).get(name, 24),) * 2))
    return root


def test_a_data_set_folder_is_recorded_by_name_and_fingerprint_only(tmp_path):
    root = _folder_dataset(tmp_path / "site-A data")
    data = build_protocol(root, spatial_size=TINY_SIZE, seed=0, num_workers=1, preprocess="minmax")
    checkpoint = _train_record(tmp_path / "models", data, tiny_network())
    text = (tmp_path / "models" / METADATA_FILE).read_text()
    assert str(tmp_path) not in text  # no absolute path anywhere in the record
    record = json.loads(text)["provenance"]
    assert record["data"]["kind"] == "folder" and record["data"]["name"] == "site-A data"
    assert record["demo_model"] is False and "synthetic_patients" not in record["protocol"]
    rows = sorted(([split, str(item["file"]).removeprefix(str(root) + "/"), (root / item["file"]).stat().st_size,
                    CLASS_NAMES[item["label"]]] for split in ("train", "val", "test") for item in data.split(split)),
                  key=json.dumps)
    assert record["data"]["fingerprint_sha256"] == hashlib.sha256(
        json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
    # the same files give the same fingerprint; one file of another size gives another
    again = build_protocol(root, spatial_size=TINY_SIZE, seed=0, num_workers=1, preprocess="minmax")
    from robustmri.engine.model_metadata import data_provenance

    assert data_provenance(again)["fingerprint_sha256"] == record["data"]["fingerprint_sha256"]
    write_png(root / "glioma" / "glioma_0.png", np.random.default_rng(9).integers(0, 255, (30, 30)))
    changed = build_protocol(root, spatial_size=TINY_SIZE, seed=0, num_workers=1, preprocess="minmax")
    assert data_provenance(changed)["fingerprint_sha256"] != record["data"]["fingerprint_sha256"]
    provenance = checkpoint_provenance(checkpoint)
    onnx_file = tmp_path / "real.onnx"
    export_onnx(tiny_network(), onnx_file, CLASS_NAMES, TINY_SIZE, provenance=provenance)
    assert _props(onnx_file)["demo_model"] == "false"
    assert str(tmp_path) not in _props(onnx_file)["provenance"]


# -- the demo-model rule in DICOM inference ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory, models):
    """The tiny model as export writes a demo model (export's own marking is tested above)."""
    _, onnx_file, _ = models
    provenance = {"schema": "robustmri-provenance-1", "demo_model": True,
                  "data": {"kind": "synthetic", "name": "embedded synthetic set"}}
    demo = rewrite_metadata(onnx_file, tmp_path_factory.mktemp("demo") / "demo.onnx", reseal=True, demo_model="true",
                            model_version="0.4.0+demo", provenance=json.dumps(provenance))
    return OnnxClassifier(demo, device="cpu")


def test_dicom_inference_refuses_a_demo_model(tmp_path, demo_model):
    write_mr_series(tmp_path / "in", gradient_series(3))
    with pytest.raises(DemoModelError) as error:
        infer_dicom([tmp_path / "in"], demo_model, tmp_path / "out", progress=False)
    assert "allow_demo_model" in _one_line(error) and not (tmp_path / "out").exists()


def test_an_allowed_demo_model_says_so_in_every_output(tmp_path, demo_model):
    write_mr_series(tmp_path / "in", gradient_series(3))
    summary = infer_dicom([tmp_path / "in"], demo_model, tmp_path / "out", progress=False, allow_demo_model="true")
    (entry,) = summary["series"]
    assert "DEMO MODEL" in (tmp_path / "out" / "summary.json").read_text()
    report = json.loads((tmp_path / "out" / entry["report_file"]).read_text())
    assert report["model"]["notice"] == DEMO_MODEL_NOTICE and report["model"]["version"] == "0.4.0+demo"
    sr = pydicom.dcmread(tmp_path / "out" / entry["sr_file"])
    assert sr.ContentSequence[0].TextValue.startswith(DEMO_MODEL_NOTICE)
    method = sr.ContentSequence[1].TextValue
    assert f"integrity sha256 {demo_model.describe()['integrity_sha256']} (verified on load)" in method
    assert "checkpoint sha256" not in method


def test_a_real_model_cites_its_verified_digest_in_the_sr(tmp_path, models):
    _, onnx_file, _ = models
    classifier = OnnxClassifier(onnx_file, device="cpu")
    write_mr_series(tmp_path / "in", gradient_series(3))
    summary = infer_dicom([tmp_path / "in"], classifier, tmp_path / "out", progress=False, allow_unsigned=True)
    sr = pydicom.dcmread(tmp_path / "out" / summary["series"][0]["sr_file"])
    assert "DEMO MODEL" not in sr.ContentSequence[0].TextValue + sr.ContentSequence[1].TextValue
    assert f"integrity sha256 {_props(onnx_file)['integrity_sha256']} (verified on load), signature unsigned" in \
        sr.ContentSequence[1].TextValue


def test_script_refuses_a_tampered_or_demo_model_in_one_line(tmp_path, models, demo_model, keys):
    _, onnx_file, signed = models
    write_mr_series(tmp_path / "in", gradient_series(3))
    swapped = _swap_class_names(onnx_file, tmp_path)
    script = [sys.executable, str(ROOT / "scripts" / "infer_dicom.py"), str(tmp_path / "in"), "--device", "cpu",
              "--quiet", "--output_dir", str(tmp_path / "out")]

    def run(*args):
        return subprocess.run([*script, *args], capture_output=True, text=True, timeout=120)

    for model, extra, expected in [(swapped, [], "integrity check failed"),
                                   (demo_model.model_file, [], "a demo model")]:
        result = run("--model", str(model), *extra)
        assert result.returncode == 2, (model, result.stderr[-2000:])
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("infer_dicom: model refused: ") and expected in last
    result = run("--model", str(signed), "--public_key", str(keys[0] / "a.pub.pem"), "--allow_demo_model")
    assert result.returncode == 0, result.stderr[-2000:]


def test_verify_model_reads_the_file_when_given_no_bytes(models):
    _, onnx_file, _ = models
    assert verify_model(onnx_file)["integrity_sha256"] == _props(onnx_file)["integrity_sha256"]


def test_export_script_signs_and_copies_the_provenance(tmp_path, monkeypatch, keys):
    """Export of a bundle checkpoint (scripts/export_onnx.py) after training on the embedded set.

    The result is a signed demo model with its test metrics credited."""
    from robustmri.deploy.onnx.export_checkpoint import export_checkpoint
    from robustmri.networks import PaperCNN

    monkeypatch.setenv("BRAIN_TUMOR_DATA", "")
    data = build_protocol(None, spatial_size=TINY_SIZE, synthetic_patients=20, seed=0, preprocess="minmax")
    network = PaperCNN(in_channels=1, num_classes=3, spatial_size=TINY_SIZE, padding=2).eval()
    checkpoint = _train_record(tmp_path / "models", data, network)
    write_json(tmp_path / "eval" / "test" / "summary.json", {"last": {
        "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint), "n": 12, "accuracy": 0.5,
        "macro_f1": 0.4, "roc_auc_macro": 0.7}, "intended_use": INTENDED_USE})  # as evaluation writes it
    onnx_file = tmp_path / "models" / "model.onnx"
    export_checkpoint(BUNDLE, checkpoint=str(checkpoint), output=str(onnx_file), parity_split="none",
                signing_key=str(keys[0] / "a.pem"), eval_dir=str(tmp_path / "eval"))
    classifier = OnnxClassifier(onnx_file, device="cpu", public_key=keys[0] / "a.pub.pem")
    described = classifier.describe()
    assert described["signature"] == "verified" and described["demo_model"]
    assert described["version"].endswith("+demo") and described["provenance"]["metrics"]["test"]["accuracy"] == 0.5
    assert described["provenance"]["checkpoint"]["bound"] and described["provenance"]["recipe"]["method"] == "naive"


def test_bundle_trains_evaluates_exports_signed_and_refuses_the_demo_model(tmp_path, keys):
    """The bundle's commands as users run them: train on the embedded set, evaluate, export signed, DICOM inference."""
    from helpers import TINY, bundle, output_dirs

    dirs = output_dirs(tmp_path)
    bundle("run", "training", "--config_file", "configs/train.json", "--epochs", "1", *TINY, *dirs)
    bundle("run", "evaluating", "--config_file", "['configs/train.json','configs/evaluate.json']", *TINY, *dirs)
    bundle("run", "exporting", "--config_file", "['configs/train.json','configs/export.json']", *TINY, *dirs,
           "--signing_key", str(keys[0] / "a.pem"), "--parity_split", "none")
    props = _props(tmp_path / "models" / "model.onnx")
    provenance = json.loads(props["provenance"])
    assert props["demo_model"] == "true" and provenance["checkpoint"]["bound"] and provenance["training"]["completed"]
    assert provenance["metrics"]["test"]["checkpoint_tag"] == "last" and "validation" in provenance["metrics"]
    assert provenance["protocol"]["synthetic_patients"] == 30 and provenance["recipe"]["batch_size"] == 8
    from robustmri.data.synthetic import generate_slices  # heads: what the demo model's detector was fitted on

    heads = generate_slices(n_patients=1, size=96, seed=11, slices_per_patient=(3, 3))["images"]
    write_mr_series(tmp_path / "dicom", list(np.rint(heads * 400)))
    infer = ["run", "dicom_inference", "--config_file", "['configs/train.json','configs/infer_dicom.json']",
             "--spatial_size", "32", "--network_padding", "2", *dirs, "--dicom_inputs", str(tmp_path / "dicom"),
             "--model_public_key", str(keys[0] / "a.pub.pem")]
    refused = bundle(*infer, check=False)
    assert refused.returncode != 0 and "a demo model" in refused.stdout + refused.stderr
    assert not (tmp_path / "eval" / "dicom" / "summary.json").exists()
    bundle(*infer, "--allow_demo_model", "true")
    summary = json.loads((tmp_path / "eval" / "dicom" / "summary.json").read_text())
    assert summary["n_series_classified"] + summary["n_series_abstained"] == 1  # an answer, with the notice
    assert summary["model"]["notice"] == DEMO_MODEL_NOTICE
    assert summary["model"]["signature"] == "verified"


# -- signed by default -------------------------------------------------------------------------------------------


def test_dicom_inference_refuses_an_unsigned_model_unless_allowed(tmp_path, models, keys):
    _, onnx_file, signed = models
    write_mr_series(tmp_path / "in", gradient_series(3))
    for model, public_key in [(onnx_file, None), (signed, None)]:  # unsigned; signed but no key to check it
        with pytest.raises(UnsignedModelError) as error:
            infer_dicom([tmp_path / "in"], OnnxClassifier(model, device="cpu", public_key=public_key),
                        tmp_path / "out", progress=False)
        assert "--allow_unsigned" in _one_line(error) and "model_keys.py" in _one_line(error)
        assert not (tmp_path / "out").exists()  # refused before any work
    summary = infer_dicom([tmp_path / "in"], OnnxClassifier(onnx_file, device="cpu"), tmp_path / "unsigned",
                          progress=False, allow_unsigned="true")
    assert summary["model"]["signature"] == "unsigned (no public key given)" and summary["series"]
    summary = infer_dicom([tmp_path / "in"], OnnxClassifier(signed, device="cpu", public_key=keys[0] / "a.pub.pem"),
                          tmp_path / "signed", progress=False)
    assert summary["model"]["signature"] == "verified" and summary["series"]


def test_script_is_signed_by_default(tmp_path, models, keys):
    """The finding: a model re-digested after its class names were swapped and its demo flag cleared was accepted
    when no key was given. Now: refused without a verified signature (status 2, one line), accepted with the right key
    or --allow_unsigned, refused with another key."""
    _, onnx_file, signed = models
    write_mr_series(tmp_path / "in", gradient_series(3))
    names = list(CLASS_NAMES)
    names[0], names[1] = names[1], names[0]
    resealed = rewrite_metadata(onnx_file, tmp_path / "resealed.onnx", reseal=True, class_names=json.dumps(names),
                                demo_model="false")
    script = [sys.executable, str(ROOT / "scripts" / "infer_dicom.py"), str(tmp_path / "in"), "--device", "cpu",
              "--quiet"]

    def run(name, *args):
        return subprocess.run([*script, "--output_dir", str(tmp_path / name), *args], capture_output=True, text=True,
                              timeout=120)

    for name, args in [("resealed", ["--model", resealed]), ("unsigned", ["--model", onnx_file]),
                       ("nokey", ["--model", signed]),
                       ("wrongkey", ["--model", signed, "--public_key", keys[0] / "b.pub.pem"])]:
        result = run(name, *map(str, args))
        assert result.returncode == 2, (name, result.stderr[-2000:])
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("infer_dicom: ")]
        assert line.startswith("infer_dicom: model refused: ") and "Traceback" not in result.stderr
        assert ("signed by another key" if name == "wrongkey" else "--allow_unsigned") in line
        assert not (tmp_path / name / "summary.json").exists()
    assert run("allowed", "--model", str(onnx_file), "--allow_unsigned").returncode == 0
    result = run("signed", "--model", str(signed), "--public_key", str(keys[0] / "a.pub.pem"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "signed" / "summary.json").read_text())["model"]["signature"] == "verified"
