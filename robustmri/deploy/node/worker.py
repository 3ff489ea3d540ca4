"""The node's study loop: complete studies (no instance for the study timeout) are answered by
:func:`robustmri.deploy.dicom.study.infer_dicom`, and their SRs sent to the destination until it stores them.

What a study yields is what ``infer_dicom`` writes into its result folder: a study answered with a tumour type,
or abstained (the model cannot vouch for its slices), has one SR, which is sent; a study that gives no result
(refused for integrity, e.g. two patients under one SeriesInstanceUID; no series matching the series rule; no
readable instance) has no SR, only ``summary.json`` with the reason, and nothing is sent: the study is
``delivered`` with 0 SRs and its outcome (``no_result``; ``no_input`` when its folder held no file) is in the
queue (``robustmri-node --status``).
"""

from __future__ import annotations

import glob
import logging
import os
import threading
import time

from robustmri.deploy.dicom.study import DicomInputError, OutputError, infer_dicom
from robustmri.deploy.node.queue import Study, StudyQueue
from robustmri.deploy.node.sender import Destination, backoff, send

logger = logging.getLogger(__name__)


class Worker:
    """Answers and delivers the queue's studies, one step at a time, until :attr:`stop` is set."""

    def __init__(self, queue: StudyQueue, classifier, destination: Destination, calling_ae: str,
                 study_timeout: float, allow_demo_model: bool = False, allow_unsigned: bool = False,
                 poll: float = 0.2, tls=None, keep_delivered: float | None = None):
        self.queue, self.classifier, self.destination, self.calling_ae = queue, classifier, destination, calling_ae
        self.study_timeout, self.poll = study_timeout, poll
        self.allow_demo_model, self.allow_unsigned = allow_demo_model, allow_unsigned
        self.tls, self.keep_delivered, self._purged = tls, keep_delivered, 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        """Loop until :attr:`stop`: a stop between steps leaves every study durably where it is (a restart
        resumes it); the step in hand (one study's inference or delivery) is finished first."""
        while not self.stop.is_set():
            if not self.step():
                self.stop.wait(self.poll)

    def step(self) -> bool:
        """Do one thing (answer a ready study, or deliver an answered one); False when there was nothing to do."""
        self.queue.promote_complete(self.study_timeout)
        study = self.queue.next_ready()
        if study is not None:
            self.answer(study)
            return True
        study = self.queue.next_due()
        if study is not None:
            self.deliver(study)
            return True
        if self.keep_delivered is not None and time.monotonic() - self._purged >= 1.0:  # idle: retention
            self._purged = time.monotonic()
            purged = self.queue.purge_delivered(self.keep_delivered)
            if purged:
                logger.info("removed %d study(ies) delivered over %.0f s ago", purged, self.keep_delivered)
        return False

    def answer(self, study: Study) -> None:
        folder = self.queue.result_folder(study.study_key)
        for old in self.sr_files(study):  # an earlier answer's SR must not be sent for this one
            os.remove(old)
        try:
            summary = infer_dicom([self.queue.study_folder(study.study_key)], self.classifier, folder,
                                  progress=False, allow_demo_model=self.allow_demo_model,
                                  allow_unsigned=self.allow_unsigned)
        except OutputError as err:  # the disk, not the study: it stays ready and is tried again
            logger.error("study %s: cannot write its results (%s); kept ready", study.study_uid, err.strerror)
            self.stop.wait(min(30.0, self.study_timeout + 1))
            return
        except DicomInputError:
            outcome, n_sr = "no_input", 0
        except Exception as err:  # kept as failed, for the operator; the other studies go on
            # the error's type only: its message or traceback could quote header values (names, IDs)
            logger.error("study %s: inference failed (%s)", study.study_uid, type(err).__name__)
            self.queue.mark_failed(study, f"failed: {type(err).__name__}")
            return
        else:
            outcome, n_sr = summary["status"], len(self.sr_files(study))
        if not self.queue.mark_answered(study, n_sr, outcome):
            logger.info("study %s: more instances arrived while it was answered; answered again later",
                        study.study_uid)
            return
        logger.info("study %s answered: %s, %d SR(s)", study.study_uid, outcome, n_sr)

    def sr_files(self, study: Study) -> list[str]:
        return sorted(glob.glob(os.path.join(self.queue.result_folder(study.study_key), "*.sr.dcm")))

    def deliver(self, study: Study) -> None:
        files = self.sr_files(study)
        if not files or send(files, self.destination, self.calling_ae, tls=self.tls):
            if self.queue.mark_delivered(study):
                logger.info("study %s delivered: %d SR(s) stored by %s", study.study_uid, len(files),
                            self.destination)
            return
        delay = backoff(study.attempts)
        self.queue.mark_retry(study, delay)
        logger.warning("study %s: delivery attempt %d failed; next in %.0f s", study.study_uid, study.attempts + 1,
                       delay)
