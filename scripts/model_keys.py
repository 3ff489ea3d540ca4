"""Make an Ed25519 key pair for signing exported models (PEM files), or show a key's fingerprint.

    python scripts/model_keys.py generate --private keys/model_signing.pem --public keys/model_signing.pub.pem
    python scripts/model_keys.py fingerprint keys/model_signing.pub.pem

The same keys with OpenSSL:

    openssl genpkey -algorithm ed25519 -out model_signing.pem
    openssl pkey -in model_signing.pem -pubout -out model_signing.pub.pem

Sign at export (``scripts/export_onnx.py --signing_key model_signing.pem``, or the bundle's
``export.json --signing_key``); verify at inference (``scripts/infer_dicom.py --public_key
model_signing.pub.pem``, or ``infer_dicom.json --model_public_key``). Keep the private key off the
inference machines; the private file is written readable by its owner only and never overwritten.
The fingerprint (sha256 of the raw public key) is what the model's ``signing_key_fingerprint`` says.
"""

from __future__ import annotations

import fire

from robustmri.deploy.onnx.trust import key_fingerprint, load_public_key, write_key_pair


def generate(private: str = "model_signing.pem", public: str = "model_signing.pub.pem") -> str:
    """Write a new key pair; print and return its fingerprint."""
    fingerprint = write_key_pair(private, public)
    print(f"private key {private} (keep it secret), public key {public}, fingerprint {fingerprint}")
    return fingerprint


def fingerprint(public: str) -> str:
    """The fingerprint of a public key file (PEM)."""
    value = key_fingerprint(load_public_key(public))
    print(value)
    return value


if __name__ == "__main__":
    fire.Fire({"generate": generate, "fingerprint": fingerprint}, serialize=lambda result: None)
