"""Model integrity, signatures and the demo-model rule: what an exported ONNX model must prove before use.

Imports neither PyTorch nor the training code (``onnx`` and, for signatures, ``cryptography``),
so the runtime (:mod:`robustmri.deploy.onnx.runtime`) verifies every model it loads.

**Integrity digest** (scheme :data:`INTEGRITY_SCHEME`, stated here once). Two sha256 digests,
written into the model's metadata at export (:func:`integrity_fields`):

- ``graph_sha256``: sha256 of the model (ONNX ``ModelProto``) with every ``metadata_props`` entry
  removed, serialised deterministically (``SerializeToString(deterministic=True)``): the graph's
  structure, its weights (initializers), opsets, input and output names and shapes;
- ``integrity_sha256``: sha256 of the UTF-8 canonical JSON (keys sorted, no spaces, ASCII) of
  ``{"scheme": INTEGRITY_SCHEME, "graph_sha256": <graph digest>, "metadata": {key: value}}`` where
  ``metadata`` holds **every** metadata entry except the trust fields themselves
  (:data:`TRUST_KEYS`): class names, spatial size, preprocessing name and description, selection
  rule (``series_rule``), detector and threshold keys, provenance and ``demo_model`` included. ``integrity_covers``
  lists the covered keys (JSON list, sorted); it is itself covered.

A runtime recomputes both on every load (:func:`verify_model`) and refuses a model whose digest
is missing, differs, whose covered keys differ from the keys present, or that lacks a key of
:data:`OUTPUT_AFFECTING_KEYS`. The digest detects any change made after export; it does not stop
someone who rewrites the model *and* recomputes the digest. A signature does:

**Signature** (Ed25519; required by hospital inference, below): the exporter's private key signs the bytes
``SIGNATURE_CONTEXT + integrity_sha256`` (hex, ASCII); the metadata carries ``signature`` (base64),
``signature_algorithm`` ("ed25519") and ``signing_key_fingerprint`` (sha256 of the raw 32-byte
public key, hex). Given a public key, the runtime refuses an unsigned model, one signed by another
key, and a wrong signature. Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), as
``scripts/model_keys.py`` or ``openssl genpkey -algorithm ed25519`` write them.

**Signed by default.** Hospital inference (:func:`check_signed`, called by DICOM inference) refuses
a model whose signature was not verified on load (unsigned, or no public key given) unless
``allow_unsigned`` is set; a demo model is exempt, as it is refused unless explicitly allowed and
then marked DEMO MODEL everywhere.

**Demo models.** A model trained on the embedded synthetic set carries ``demo_model: "true"``;
:func:`check_demo_model` refuses it for DICOM inference unless explicitly allowed, and
:data:`DEMO_MODEL_NOTICE` then goes into every output.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os

from robustmri.deploy.dicom.series_rule import METADATA_KEY as SERIES_RULE_KEY
from robustmri.options import as_flag

#: Version tag of the digest's definition (module docstring); part of what is hashed.
INTEGRITY_SCHEME = "robustmri-integrity-1"
#: Prefix of the signed message (domain separation: the key signs nothing else by accident).
SIGNATURE_CONTEXT = b"robustmri-model-signature-1:"
SIGNATURE_ALGORITHM = "ed25519"
#: Metadata written by integrity and signing, never covered by the digest (everything else is).
TRUST_KEYS = ("integrity_sha256", "signature", "signature_algorithm", "signing_key_fingerprint")
#: Metadata keys that change what the model outputs or how its output is read: a model must carry
#: each of them (export refuses to write one without, the runtime to load one without), and the
#: digest covers them. Extend with the keys of new output-affecting features (e.g. a detector's
#: ``OOD_METADATA_KEYS``); keys not listed are still covered when present.
MODEL_KEYS = ("class_names", "spatial_size", "preprocess", "intensity_normalisation", SERIES_RULE_KEY)
PROVENANCE_KEYS = ("demo_model", "provenance")
OUTPUT_AFFECTING_KEYS = MODEL_KEYS + PROVENANCE_KEYS + ("graph_sha256", "integrity_covers")
#: What every output of a demo model says.
DEMO_MODEL_NOTICE = ("DEMO MODEL: trained on the embedded synthetic set, not on real MRI; its classes mean nothing on "
                     "real images")
#: How to make a model that passes these checks (said by every refusal of an old or altered model).
REEXPORT_HINT = ("re-export it from its checkpoint: python scripts/export_onnx.py --checkpoint model.pt --output "
                 "model.onnx (or the bundle's export.json)")


class ModelMetadataError(ValueError):
    """The ONNX file lacks, or contradicts, what inference needs to reproduce training."""


class ModelIntegrityError(ModelMetadataError):
    """The model file is not the one exported (digest or signature), or cannot prove it."""


class DemoModelError(ValueError):
    """A demo model (trained on the embedded synthetic set) was given to clinical-style inference."""


class UnsignedModelError(ModelIntegrityError):
    """A model whose signature was not verified (unsigned, or no public key given) was given to hospital inference."""


#: How to get past :func:`check_signed` (said by its refusal).
SIGNING_HINT = ("sign the model at export (python scripts/model_keys.py generate, then scripts/export_onnx.py "
                "--signing_key model_signing.pem) and give the public key (--public_key model_signing.pub.pem; "
                "the bundle's model_public_key), or pass --allow_unsigned (allow_unsigned) to run it unsigned")


def canonical_json(value) -> str:
    """The one JSON text of ``value`` that is hashed: keys sorted, no spaces, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def graph_sha256(model) -> str:
    """sha256 of an ``onnx.ModelProto`` without its ``metadata_props``, serialised deterministically."""
    stripped = type(model)()
    stripped.CopyFrom(model)
    del stripped.metadata_props[:]
    return hashlib.sha256(stripped.SerializeToString(deterministic=True)).hexdigest()


def integrity_sha256(graph_digest: str, metadata: dict[str, str]) -> str:
    """The digest over the graph digest and the covered metadata (module docstring)."""
    covered = {str(k): str(v) for k, v in metadata.items() if k not in TRUST_KEYS}
    payload = {"scheme": INTEGRITY_SCHEME, "graph_sha256": graph_digest, "metadata": covered}
    return hashlib.sha256(canonical_json(payload).encode("ascii")).hexdigest()


def integrity_fields(model, metadata: dict[str, str], signing_key: str | os.PathLike | None = None) -> dict[str, str]:
    """The metadata entries to add to ``metadata`` for ``model`` (an ``onnx.ModelProto``): digests, maybe a signature.

    ``metadata`` holds every other entry the model will carry; a key of :data:`OUTPUT_AFFECTING_KEYS`
    missing from it (other than those added here) is an error. ``signing_key``: an Ed25519 private
    key (PEM) to sign the digest with.
    """
    clash = [key for key in TRUST_KEYS + ("graph_sha256", "integrity_covers") if key in metadata]
    if clash:
        raise ValueError(f"metadata must not set {clash}: integrity_fields writes them")
    fields = {"graph_sha256": graph_sha256(model)}
    covered = {**{str(k): str(v) for k, v in metadata.items()}, **fields}
    covered["integrity_covers"] = canonical_json(sorted(set(covered) | {"integrity_covers"}))
    missing = [key for key in OUTPUT_AFFECTING_KEYS if key not in covered]
    if missing:
        raise ValueError(f"metadata lacks {missing}, which change the model's output; the digest must cover them")
    fields["integrity_covers"] = covered["integrity_covers"]
    fields["integrity_sha256"] = integrity_sha256(fields["graph_sha256"], covered)
    if signing_key:
        private = load_private_key(signing_key)
        fields["signature"] = base64.b64encode(private.sign(SIGNATURE_CONTEXT + fields["integrity_sha256"]
                                                            .encode("ascii"))).decode("ascii")
        fields["signature_algorithm"] = SIGNATURE_ALGORITHM
        fields["signing_key_fingerprint"] = key_fingerprint(private.public_key())
    return fields


def verify_model(model_file: str | os.PathLike, model_bytes: bytes | None = None,
                 public_key: str | os.PathLike | None = None) -> dict:
    """Check the digests (and, given ``public_key``, the signature) of an exported model; return what was verified.

    ``model_bytes``: the file's content as the runtime loads it (read from ``model_file`` when
    None); verifying the very bytes that are run leaves no gap between check and use.
    Raises :class:`ModelIntegrityError` with one line naming the file when anything differs.
    Returns ``{"integrity": "verified", "integrity_sha256", "graph_sha256", "signature": <status>,
    "signing_key_fingerprint"}``; ``signature`` is "verified", "not checked (no public key given)"
    or "unsigned (no public key given)".
    """
    import onnx

    model_file = os.path.abspath(os.fspath(model_file))
    if model_bytes is None:
        with open(model_file, "rb") as handle:
            model_bytes = handle.read()
    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as err:  # protobuf's DecodeError and friends
        raise ModelIntegrityError(f"{model_file}: not a readable ONNX model ({err})") from err
    props = {p.key: p.value for p in model.metadata_props}
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:  # the digest would cover only the file names, not the weights
        raise ModelIntegrityError(f"{model_file}: weights stored outside the model file ({len(external)} tensor(s), "
                                  f"e.g. {external[0]!r}) are not covered by the integrity digest; {REEXPORT_HINT}")
    recorded = props.get("integrity_sha256")
    if not recorded:
        raise ModelIntegrityError(f"{model_file}: no integrity digest (integrity_sha256): exported before models were "
                                  f"verified, or by another tool; {REEXPORT_HINT}")
    try:
        covers = json.loads(props.get("integrity_covers", ""))
    except json.JSONDecodeError:
        covers = None
    present = sorted(set(props) - set(TRUST_KEYS))
    if not isinstance(covers, list) or sorted(covers) != present:
        extra = sorted(set(present) - set(covers or []))
        lacking = sorted(set(covers or []) - set(present))
        raise ModelIntegrityError(f"{model_file}: integrity check failed: metadata keys changed after export "
                                  f"(added {extra}, removed {lacking}); use the file as exported or {REEXPORT_HINT}")
    missing = [key for key in OUTPUT_AFFECTING_KEYS if key not in props]
    if missing:
        raise ModelIntegrityError(f"{model_file}: the digest does not cover {missing}, which change the output; "
                                  f"{REEXPORT_HINT}")
    graph = graph_sha256(model)
    if graph != props["graph_sha256"]:
        raise ModelIntegrityError(f"{model_file}: integrity check failed: the weights or graph changed after export "
                                  f"(graph sha256 {graph}, exported {props['graph_sha256']}); use the file as "
                                  f"exported or {REEXPORT_HINT}")
    digest = integrity_sha256(graph, props)
    if digest != recorded:
        raise ModelIntegrityError(f"{model_file}: integrity check failed: metadata changed after export (class names, "
                                  f"size, preprocessing, provenance or another covered field; integrity sha256 "
                                  f"{digest}, exported {recorded}); use the file as exported or {REEXPORT_HINT}")
    result = {"integrity": "verified", "integrity_sha256": digest, "graph_sha256": graph,
              "signing_key_fingerprint": props.get("signing_key_fingerprint") or None}
    if public_key:
        result["signature"] = verify_signature(model_file, props, public_key)
    else:
        result["signature"] = ("not checked (no public key given)" if props.get("signature")
                               else "unsigned (no public key given)")
    return result


def verify_signature(model_file: str, props: dict[str, str], public_key: str | os.PathLike) -> str:
    """Check the Ed25519 signature of a model's digest with ``public_key`` (PEM); "verified" or raise."""
    from cryptography.exceptions import InvalidSignature

    key = load_public_key(public_key)
    fingerprint = key_fingerprint(key)
    if not props.get("signature"):
        raise ModelIntegrityError(f"{model_file}: unsigned model, but a public key was given ({fingerprint[:16]}...): "
                                  "only models signed with its private key are accepted; export it with "
                                  "--signing_key")
    if props.get("signature_algorithm") != SIGNATURE_ALGORITHM:
        raise ModelIntegrityError(f"{model_file}: signature algorithm {props.get('signature_algorithm')!r}, "
                                  f"expected {SIGNATURE_ALGORITHM!r}")
    if props.get("signing_key_fingerprint") != fingerprint:
        raise ModelIntegrityError(f"{model_file}: signed by another key (fingerprint "
                                  f"{props.get('signing_key_fingerprint')}, the given public key is {fingerprint})")
    try:
        key.verify(base64.b64decode(props["signature"], validate=True),
                   SIGNATURE_CONTEXT + props["integrity_sha256"].encode("ascii"))
    except (InvalidSignature, ValueError) as err:
        raise ModelIntegrityError(f"{model_file}: signature check failed: the signature does not match the model's "
                                  f"digest under key {fingerprint}") from err
    return "verified"


def key_fingerprint(public_key) -> str:
    """sha256 (hex) of an Ed25519 public key's raw 32 bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _read_key_file(path: str | os.PathLike, kind: str) -> bytes:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {kind} key file not found")
    with open(path, "rb") as handle:
        return handle.read()


def load_private_key(path: str | os.PathLike):
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(_read_key_file(path, "private"), password=None)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{os.fspath(path)}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{os.fspath(path)}: a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_public_key(path: str | os.PathLike):
    """An Ed25519 public key from a PEM file (SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(_read_key_file(path, "public"))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{os.fspath(path)}: not a PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{os.fspath(path)}: a {type(key).__name__}, expected an Ed25519 public key")
    return key


def write_key_pair(private_file: str | os.PathLike, public_file: str | os.PathLike) -> str:
    """Generate an Ed25519 key pair as PEM files (the private one readable by its owner only); its fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_file, public_file = os.fspath(private_file), os.fspath(public_file)
    for path in (private_file, public_file):
        if os.path.exists(path):
            raise FileExistsError(f"{path}: exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    for path in (private_file, public_file):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    descriptor = os.open(private_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private_pem)
    with open(public_file, "wb") as handle:
        handle.write(public_pem)
    return key_fingerprint(key.public_key())


# -- provenance and the demo-model rule --------------------------------------------------------------------------


def is_demo_model(metadata: dict) -> bool:
    """Whether the model's (verified) metadata marks it as trained on the embedded synthetic set."""
    return str(metadata.get("demo_model", "")).lower() == "true"


def check_demo_model(model: dict, allow_demo_model: bool = False) -> None:
    """Refuse a demo model (``model``: :meth:`OnnxClassifier.describe`) unless ``allow_demo_model``."""
    if model.get("demo_model") and not as_flag(allow_demo_model, "allow_demo_model"):
        raise DemoModelError(f"{model.get('file', 'the model')}: a demo model (trained on the embedded synthetic set, "
                             "not on real MRI) is refused for DICOM inference; train on a real data set, or pass "
                             "allow_demo_model (--allow_demo_model) to run it anyway, marked DEMO MODEL")


def check_signed(model: dict, allow_unsigned: bool = False) -> None:
    """Refuse a model whose signature was not verified on load (``model``: :meth:`OnnxClassifier.describe`), unless
    ``allow_unsigned``: hospital inference is signed by default. A demo model is exempt (it passed
    :func:`check_demo_model`, so it was allowed, and every output says DEMO MODEL)."""
    if model.get("signature") == "verified" or model.get("demo_model") or as_flag(allow_unsigned, "allow_unsigned"):
        return
    state = model.get("signature") or "not checked"
    raise UnsignedModelError(f"{os.path.basename(str(model.get('file', 'the model')))}: signature {state}: an "
                             f"unsigned model, or one whose signature was not checked, is refused; {SIGNING_HINT}")


def provenance_summary(provenance: dict | None) -> str:
    """One line on what trained the model, from the ``provenance`` record (docs/deployment.md)."""
    if not provenance:
        return "training data not recorded"
    data = provenance.get("data") or {}
    recipe = provenance.get("recipe") or {}
    code = provenance.get("code") or {}
    parts = [f"data: {data.get('name') or data.get('kind') or 'unknown'}"]
    if data.get("fingerprint_sha256"):
        parts.append(f"data fingerprint {data['fingerprint_sha256'][:16]}")
    if recipe.get("method"):
        parts.append(f"method {recipe['method']}" + (f", {recipe['epochs']} epochs" if recipe.get("epochs") else ""))
    test = ((provenance.get("metrics") or {}).get("test") or {})
    if test.get("accuracy") is not None:
        parts.append(f"test accuracy {float(test['accuracy']):.3f} (n={test.get('n')})")
    if code.get("robustmri_version"):
        parts.append(f"robustmri {code['robustmri_version']}"
                     + (f" ({str(code['git_commit'])[:12]})" if code.get("git_commit") else ""))
    return "; ".join(parts)


def model_line(model: dict) -> str:
    """The report's sentence naming the model (``model``: :meth:`OnnxClassifier.describe`): its verified digest."""
    digest = model.get("integrity_sha256")
    identity = (f"integrity sha256 {digest} (verified on load), signature {model.get('signature')}" if digest else
                "integrity not verified")
    line = (f"Model: robustmri classifier version {model.get('version') or 'unknown'}, {identity}, "
            f"ONNX Runtime {model.get('provider')}. Trained on: {model.get('trained_on') or 'not recorded'}.")
    return f"{DEMO_MODEL_NOTICE}. {line}" if model.get("demo_model") else line
