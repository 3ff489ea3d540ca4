"""``robustmri-node``: a DICOM node that receives studies from a PACS and sends each one's SR back.

    robustmri-node --model model.onnx --public_key signing.pub.pem --listen 127.0.0.1:11112 \\
        --ae_title ROBUSTMRI --destination PACS@127.0.0.1:4242 --work_dir /var/lib/robustmri-node
    robustmri-node --work_dir /var/lib/robustmri-node --status

The model is loaded and verified once at start, with the checks of ``scripts/infer_dicom.py`` (integrity digest;
signed by default: a model whose Ed25519 signature was not verified with ``--public_key`` is refused unless
``--allow_unsigned``; a demo model is refused unless ``--allow_demo_model``). Only the calling AE titles in
``--calling_ae`` (default: the destination's) may associate. A study is complete ``--study_timeout`` seconds
after its last instance; its SR goes to ``--destination`` by C-STORE, retried with capped exponential back-off
while the destination is unreachable. ``--tls_cert``, ``--tls_key`` and ``--tls_ca`` (together): both links over
TLS, mutual (each side's certificate checked against the CA; the destination's also against its host name).
SIGTERM (or Ctrl-C): stop accepting, finish the step in hand, exit 0; studies not delivered stay in the work
folder and a restart resumes them.

Exit status: 0 stopped by SIGTERM/SIGINT (or ``--status`` printed); 2 usage (a bad option, a refused model);
3 the work folder cannot be used or the port cannot be bound. One line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
import threading
import time

from robustmri.deploy.dicom.study import EXIT_OK, EXIT_OUTPUT, EXIT_USAGE, check_output_dir, OutputError
from robustmri.deploy.node.queue import DATABASE, StudyQueue
from robustmri.deploy.node.sender import Destination
from robustmri.deploy.node.tls import tls_files

logger = logging.getLogger("robustmri.deploy.node")

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _fail(message: str, status: int = EXIT_USAGE):
    print(f"robustmri-node: {message}", file=sys.stderr)
    sys.exit(status)


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``500M``, ``20G`` (powers of 1024); ValueError otherwise."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _SIZE_UNITS else (text, "")
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except ValueError:
        raise ValueError(f"not a size: {text!r}") from None
    if value <= 0:
        raise ValueError(f"not a positive size: {text!r}")
    return int(value)


def parse_listen(text: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not (colon and host and port.isdigit() and 0 <= int(port) < 65536):
        raise ValueError(f"--listen must be HOST:PORT, got {text!r}")
    return host, int(port)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robustmri-node", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the exported ONNX model")
    parser.add_argument("--public_key", default="", help="Ed25519 public key (PEM) that verifies the model")
    parser.add_argument("--allow_unsigned", action="store_true", help="accept a model whose signature is not verified")
    parser.add_argument("--allow_demo_model", action="store_true", help="accept a demo model (outputs say DEMO MODEL)")
    parser.add_argument("--listen", default="127.0.0.1:11112", help="HOST:PORT to listen on (default %(default)s)")
    parser.add_argument("--ae_title", default="ROBUSTMRI", help="the node's AE title (default %(default)s)")
    parser.add_argument("--destination", help="where SRs go: AET@HOST:PORT (the PACS)")
    parser.add_argument("--calling_ae", action="append", default=None,
                        help="a calling AE title allowed to send (repeatable; default: the destination's)")
    parser.add_argument("--work_dir", required=True, help="the node's durable work folder")
    parser.add_argument("--study_timeout", type=float, default=30.0,
                        help="seconds after a study's last instance before it is answered (default %(default)s)")
    parser.add_argument("--max_work_bytes", default="20G",
                        help="size cap of the received instances (e.g. 500M, 20G; default %(default)s): beyond it "
                             "C-STORE is refused with 0xA700 (out of resources)")
    parser.add_argument("--keep_delivered", type=float, default=None,
                        help="seconds to keep a delivered study's instances and results (default: kept until removed)")
    parser.add_argument("--tls_cert", default="", help="the node's certificate (PEM): TLS on both links")
    parser.add_argument("--tls_key", default="", help="the node's private key (PEM)")
    parser.add_argument("--tls_ca", default="", help="CA certificates (PEM) that the peers' certificates chain to")
    parser.add_argument("--device", default="cpu", help="onnxruntime device: cpu, cuda or auto (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    parser.add_argument("--status", action="store_true", help="print the work folder's queue and exit")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    return parser


def print_status(work_dir: str) -> None:
    """The queue, one line per study (UIDs, state, counts: no patient data), and the totals per state."""
    if not os.path.isfile(os.path.join(work_dir, DATABASE)):
        _fail(f"no node queue in the work folder ({DATABASE} not found)", EXIT_USAGE)
    try:
        queue = StudyQueue(work_dir, read_only=True)
        studies = queue.studies()
    except sqlite3.Error as err:
        _fail(f"cannot read the queue ({type(err).__name__})", EXIT_OUTPUT)
    counts: dict[str, int] = {}
    for s in studies:
        counts[s.state] = counts.get(s.state, 0) + 1
        updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.last_received))
        print(f"{s.study_uid}  {s.state:<9}  {s.n_instances} instance(s)  {s.n_bytes} bytes  {s.n_sr} SR(s)  "
              f"outcome={s.outcome or '-'}  attempts={s.attempts}  last_received={updated}")
    print(f"{len(studies)} study(ies): " + (", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
                                            or "none"))


def load_classifier(model: str, public_key: str, allow_demo_model: bool, allow_unsigned: bool, device: str,
                    threads: int):
    """The model, loaded and verified once, with the checks of infer_dicom (refused: one line, exit 2)."""
    from robustmri.deploy.onnx.runtime import ModelMetadataError, OnnxClassifier
    from robustmri.deploy.onnx.trust import DemoModelError, ModelIntegrityError, check_demo_model, check_signed

    try:
        classifier = OnnxClassifier(model, device=device, intra_op_num_threads=threads, public_key=public_key or None)
        classifier.require_detector()
        described = classifier.describe()
        check_demo_model(described, allow_demo_model)
        check_signed(described, allow_unsigned)
    except (ModelIntegrityError, DemoModelError) as err:
        _fail(f"model refused: {err}")
    except (FileNotFoundError, ModelMetadataError, RuntimeError, ValueError) as err:
        _fail(str(err).splitlines()[0])
    return classifier


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.status:
        print_status(args.work_dir)
        return EXIT_OK
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.model or not args.destination:
        _fail("--model and --destination are required (or --status)")
    try:
        destination = Destination.parse(args.destination)
        host, port = parse_listen(args.listen)
    except ValueError as err:
        _fail(str(err))
    try:
        tls = tls_files(args.tls_cert, args.tls_key, args.tls_ca)
    except ValueError as err:
        _fail(str(err))
    try:
        max_bytes = parse_size(args.max_work_bytes)
    except ValueError as err:
        _fail(f"--max_work_bytes: {err} (e.g. 500M, 20G)")
    if not (args.study_timeout >= 0 and args.threads >= 0 and (args.keep_delivered or 0) >= 0):  # NaN too
        _fail("--study_timeout, --keep_delivered and --threads must be numbers >= 0")
    calling = args.calling_ae or [destination.ae_title]
    if any(not aet or len(aet) > 16 for aet in calling + [args.ae_title]):
        _fail("AE titles must have 1 to 16 characters")
    classifier = load_classifier(args.model, args.public_key, args.allow_demo_model, args.allow_unsigned,
                                 args.device, args.threads)
    try:
        check_output_dir(args.work_dir)
        queue = StudyQueue(args.work_dir, max_bytes=max_bytes)
    except OutputError as err:
        _fail(f"work folder: {err.strerror}", EXIT_OUTPUT)
    except sqlite3.Error as err:
        _fail(f"work folder: cannot open its queue ({type(err).__name__})", EXIT_OUTPUT)
    return serve(queue, classifier, host, port, args, destination, calling, tls)


def serve(queue: StudyQueue, classifier, host: str, port: int, args, destination: Destination,
          calling: list[str], tls=None) -> int:
    from robustmri.deploy.node.scp import start_server
    from robustmri.deploy.node.worker import Worker

    worker = Worker(queue, classifier, destination, args.ae_title, args.study_timeout,
                    allow_demo_model=args.allow_demo_model, allow_unsigned=args.allow_unsigned, tls=tls,
                    keep_delivered=args.keep_delivered)

    def stop(signum, _frame):
        logger.info("signal %d: stopping (the step in hand is finished, pending studies stay queued)", signum)
        # from another thread: Event.set() here could wait on the lock that the interrupted Event.wait() holds
        threading.Thread(target=worker.stop.set, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server = start_server(queue, host, port, args.ae_title, calling, tls)
    except OSError as err:
        _fail(f"cannot listen on {host}:{port} ({os.strerror(err.errno) if err.errno else type(err).__name__})",
              EXIT_OUTPUT)
    pending = [s for s in queue.studies() if s.state != "delivered"]
    logger.info("listening on %s:%d as %s (calling AE titles %s%s); destination %s; %d study(ies) pending",
                host, port, args.ae_title, ",".join(calling), ", TLS" if tls else "", destination, len(pending))
    try:
        worker.run()
    finally:
        server.shutdown()  # no new association; instances already acknowledged are in the queue
        queue.close()
    logger.info("stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
