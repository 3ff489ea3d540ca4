"""C-STORE of the node's SRs to the destination (the PACS), and the back-off between delivery attempts.

One association per study: every SR of the study is sent, and the study counts as delivered only when the
destination acknowledged each one with success (0x0000) or a warning (0xB000-0xBFFF, the object was stored). A
study not delivered stays in the queue (:mod:`.queue`, state ``answered``) and is retried after
:func:`backoff` seconds, for as long as the node runs and across restarts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: First retry delay (seconds), doubled at each failed attempt up to :data:`BACKOFF_CAP`.
BACKOFF_FIRST, BACKOFF_CAP = 1.0, 60.0


def backoff(attempts: int, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: ``first * 2**attempts``, at most ``cap``."""
    return min(cap, first * 2.0 ** min(attempts, 32))


@dataclass(frozen=True)
class Destination:
    """Where the SRs go: ``AET@HOST:PORT``."""

    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``AET@HOST:PORT``; ValueError (one line) otherwise."""
        aet, at, address = text.partition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and aet and host and port.isdigit() and 0 < int(port) < 65536 and len(aet) <= 16):
            raise ValueError("--destination must be AET@HOST:PORT (an AE title of at most 16 characters), "
                             f"got {text!r}")
        return cls(aet, host, int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def send(files: list[str], destination: Destination, calling_ae: str, timeout: float = 30.0, tls=None) -> bool:
    """C-STORE every file in ``files`` to ``destination`` in one association; True when each was stored.
    ``tls``: a :class:`.tls.TlsFiles` (the destination's certificate checked against its CA and host name), or None.
    Network errors, a rejected association or a failure status are logged (without patient data) and give False."""
    from pydicom import dcmread
    from pynetdicom import AE

    datasets = [dcmread(path) for path in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class in sorted({ds.SOPClassUID for ds in datasets}):
        ae.add_requested_context(sop_class)
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                               tls_args=(tls.client_context(), destination.host) if tls else None)
    except (OSError, RuntimeError) as err:
        logger.warning("destination %s: cannot associate (%s)", destination, type(err).__name__)
        return False
    if not assoc.is_established:
        logger.warning("destination %s: association not established (rejected, aborted or unreachable)", destination)
        return False
    stored = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is not None and (code == 0x0000 or 0xB000 <= code <= 0xBFFF):
                stored += 1
            else:
                logger.warning("destination %s: SR %s not stored (status %s)", destination, ds.SOPInstanceUID,
                               "none" if code is None else f"0x{code:04X}")
                break
    finally:
        assoc.release()
    return stored == len(datasets)
