"""How fast the DICOM node answers a PACS: Orthanc and ``robustmri-node`` on loopback ports, studies sent with
``storescu``, SRs counted through Orthanc's REST API.

Latency: the time from ``storescu``'s end (the study's last instance received by the node) to the study's SR
stored in Orthanc, less the study timeout (the node's wait for further instances, a setting rather than work).
Throughput: a burst of studies sent back to back (one association), the time from the first send to the last SR
stored in Orthanc, as studies per hour. Every study has a new StudyInstanceUID and the same slices.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import statistics
import time
from pathlib import Path

import numpy as np

from robustmri.bench.dicom_fixtures import write_mr_series
from robustmri.bench.machine import describe_machine
from robustmri.bench.pacs import Node, Orthanc, free_port, pacs_tools_missing, storescu, wait_for

#: Seconds between two looks at Orthanc while a study's SR is awaited: the latency's resolution.
POLL_S = 0.05


def _write_study(folder: Path, images: list[np.ndarray]) -> str:
    """``images`` as one T1 post-contrast series of a new study in ``folder``; its StudyInstanceUID."""
    from pydicom.uid import generate_uid

    study_uid = generate_uid()
    write_mr_series(folder, images, study_uid=study_uid)
    return study_uid


def _send(folder: Path, port: int, timeout: float) -> None:
    sent = storescu(folder, port, timeout=timeout)
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed ({sent.returncode}): {(sent.stdout + sent.stderr)[-2000:]}")


def _sr_study_uids(orthanc: Orthanc, known: dict[str, str]) -> set[str]:
    """The StudyInstanceUIDs of the SRs in Orthanc; ``known`` caches Orthanc ID -> study UID so a poll asks only
    for the tags of SRs it has not seen."""
    for orthanc_id in orthanc.sr_ids():
        if orthanc_id not in known:
            known[orthanc_id] = orthanc.get(f"/instances/{orthanc_id}/simplified-tags")["StudyInstanceUID"]
    return set(known.values())


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_record(model: str | Path) -> dict:
    """What identifies the model measured: its file's SHA-256 and the integrity digest, version and demo flag its
    metadata carries (the digest the node checks and derives the SR UIDs from)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    return {"file": Path(model).name, "sha256": file_sha256(model), "integrity_sha256": props.get("integrity_sha256"),
            "model_version": props.get("model_version"), "demo_model": props.get("demo_model")}


def measure_node(model: str | Path, folder: str | Path, images: list[np.ndarray], model_options: tuple = (),
                 study_timeout: float = 2.0, repeats: int = 5, burst: int = 20, study_wait_s: float = 600,
                 burst_wait_s: float = 3600, series: str = "") -> dict:
    """Start Orthanc and the node (``model_options``: how it trusts the model, e.g. ``("--public_key", PEM)``),
    measure latency over ``repeats`` single studies (after one warm-up study, reported apart) and throughput over
    a burst of ``burst`` studies of ``images``; return the report. Both processes are stopped before returning.
    Studies, the node's work folder and Orthanc's database go under ``folder``."""
    if missing := pacs_tools_missing():
        raise RuntimeError(f"needs {' and '.join(missing)} on PATH (Debian packages orthanc, dcmtk)")
    if repeats < 1 or burst < 1 or study_timeout < 0:
        raise ValueError("repeats and burst must be >= 1 and study_timeout >= 0")
    folder, model = Path(folder), Path(model)
    n_files = len(images)
    node_port = free_port()
    orthanc = node = None
    try:
        orthanc = Orthanc(folder / "orthanc", node_port).start()
        node = Node(folder / "node", model, orthanc.dicom_port, node_port, study_timeout=study_timeout,
                    extra=model_options).start()

        def one_study(index: int) -> float:
            study_dir = folder / "studies" / f"single{index:03d}"
            study_uid = _write_study(study_dir, images)
            _send(study_dir, node.port, timeout=study_wait_s)
            received = time.monotonic()
            wait_for(lambda: orthanc.srs(study_uid), study_wait_s, f"the SR of a study (node log: {node.folder})",
                     interval=POLL_S)
            return time.monotonic() - received - study_timeout

        warmup = one_study(0)
        latencies = [one_study(k + 1) for k in range(repeats)]

        burst_dir = folder / "studies" / "burst"
        uids = {_write_study(burst_dir / f"s{k:03d}", images) for k in range(burst)}
        known: dict[str, str] = {}
        started = time.monotonic()
        _send(burst_dir, node.port, timeout=burst_wait_s)
        wait_for(lambda: uids <= _sr_study_uids(orthanc, known), burst_wait_s,
                 f"the SRs of {burst} studies (node log: {node.folder})", interval=POLL_S)
        burst_s = time.monotonic() - started
        srs_per_study = collections.Counter(known.values())
        outcomes = collections.Counter(s.outcome for s in node.studies().values())
    finally:
        if node is not None and node.process is not None:
            node.stop()
        if orthanc is not None:
            orthanc.stop()
    if any(count != 1 for count in srs_per_study.values()):
        raise RuntimeError(f"a study has other than one SR in Orthanc: {dict(srs_per_study)}")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe_machine(),
        "model": model_record(model),
        "series": series or f"{n_files} slices of {images[0].shape[0]} x {images[0].shape[1]}",
        "study_timeout_s": study_timeout,
        "latency_s": {"repeats": repeats, "median": round(statistics.median(latencies), 3),
                      "min": round(min(latencies), 3), "max": round(max(latencies), 3),
                      "values": [round(v, 3) for v in latencies], "warmup": round(warmup, 3)},
        "burst": {"studies": burst, "seconds": round(burst_s, 2),
                  "studies_per_hour": round(burst * 3600 / burst_s, 1)},
        "outcomes": dict(outcomes),
    }


def markdown_table(report: dict) -> str:
    """The report's numbers as a markdown table."""
    latency, burst = report["latency_s"], report["burst"]
    outcomes = ", ".join(f"{name} {count}" for name, count in sorted(report["outcomes"].items()))
    rows = [("series", report["series"]), ("study timeout (s), subtracted", report["study_timeout_s"]),
            (f"latency, last instance -> SR in Orthanc (s), median of {latency['repeats']}", latency["median"]),
            ("latency min / max (s)", f"{latency['min']} / {latency['max']}"),
            ("first study, not counted (s)", latency["warmup"]),
            (f"burst of {burst['studies']} studies, first send -> last SR (s)", burst["seconds"]),
            ("studies per hour", burst["studies_per_hour"]),
            ("studies' outcomes (warm-up, single, burst)", outcomes),
            ("machine", f"{report['machine']['cpu']}, {report['machine']['cpu_count']} logical CPU(s)")]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])
