"""TLS for the node's two DICOM links (optional): the server side for the studies it receives, the client side for
the SRs it sends. Both are mutual: each side presents its certificate and checks the other's against the given CA."""

from __future__ import annotations

import ssl
from dataclasses import dataclass


@dataclass(frozen=True)
class TlsFiles:
    """The node's certificate and private key (PEM), and the CA certificates (PEM) that its peers' certificates
    must chain to."""

    cert: str
    key: str
    ca: str

    def server_context(self) -> ssl.SSLContext:
        """For the C-STORE server: callers must present a certificate signed by the CA."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        context.load_verify_locations(self.ca)
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """For sending SRs: the destination's certificate is checked against the CA and its host name."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert, self.key)
        context.load_verify_locations(self.ca)
        return context


def tls_files(cert: str, key: str, ca: str) -> TlsFiles | None:
    """None when no TLS option is given; ValueError (one line) when only some are, or one cannot be loaded."""
    given = [bool(cert), bool(key), bool(ca)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("TLS needs --tls_cert, --tls_key and --tls_ca together")
    files = TlsFiles(cert, key, ca)
    try:
        files.server_context()
        files.client_context()
    except (OSError, ssl.SSLError) as err:
        reason = getattr(err, "reason", None) or err.strerror or type(err).__name__  # never the path
        raise ValueError(f"cannot load the TLS files ({reason})") from None
    return files
