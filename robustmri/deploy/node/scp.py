"""The node's C-STORE/C-ECHO server (pynetdicom): only the configured calling AE titles may associate; each
instance is stored durably (:meth:`.queue.StudyQueue.add_instance`) before its success status is returned."""

from __future__ import annotations

import logging

from robustmri.deploy.node.queue import QueueFull, StudyQueue

logger = logging.getLogger(__name__)

#: C-STORE statuses (PS3.4 B.2.3): out of resources (the size cap), cannot understand (no study or instance UID),
#: processing failure (the instance could not be written).
OUT_OF_RESOURCES, CANNOT_UNDERSTAND, PROCESSING_FAILURE, SUCCESS = 0xA700, 0xC000, 0x0110, 0x0000


def store_handler(queue: StudyQueue):
    """The ``EVT_C_STORE`` handler: the instance written and recorded, then its status."""

    def handle(event) -> int:
        try:
            dataset = event.dataset
            study_uid, sop_uid = str(dataset.StudyInstanceUID), str(dataset.SOPInstanceUID)
        except Exception:  # an undecodable dataset or a missing UID: refused, the node never guesses a study
            logger.warning("C-STORE refused: the instance has no readable StudyInstanceUID or SOPInstanceUID")
            return CANNOT_UNDERSTAND
        if not study_uid or not sop_uid:
            logger.warning("C-STORE refused: empty StudyInstanceUID or SOPInstanceUID")
            return CANNOT_UNDERSTAND
        try:
            queue.add_instance(study_uid, sop_uid, bytes(event.encoded_dataset(include_meta=True)))
        except QueueFull as err:
            logger.warning("C-STORE refused (study %s, instance %s): %s", study_uid, sop_uid, err)
            return OUT_OF_RESOURCES
        except OSError as err:
            logger.error("C-STORE failed (study %s, instance %s): cannot write (%s)", study_uid, sop_uid,
                         type(err).__name__)
            return OUT_OF_RESOURCES if err.errno == 28 else PROCESSING_FAILURE  # 28: ENOSPC
        logger.debug("stored instance %s of study %s", sop_uid, study_uid)
        return SUCCESS

    return handle


def start_server(queue: StudyQueue, host: str, port: int, ae_title: str, calling_aes: list[str], tls=None):
    """Listen on ``host:port`` in background threads; the pynetdicom server (``shutdown()`` stops it).
    ``tls``: a :class:`.tls.TlsFiles` (every association over TLS, the caller's certificate required), or None."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.require_calling_aet = list(calling_aes)  # any other calling AE title: association rejected
    ae.require_called_aet = True
    handlers = [(evt.EVT_C_STORE, store_handler(queue)),
                (evt.EVT_CONN_OPEN, lambda event: logger.info("association from %s:%s", *event.address))]
    return ae.start_server((host, port), block=False, evt_handlers=handlers,
                           ssl_context=tls.server_context() if tls else None)
