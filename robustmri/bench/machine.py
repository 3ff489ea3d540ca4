"""The machine a measurement ran on, as the benchmark scripts write it next to their numbers."""

from __future__ import annotations

import functools
import os
import platform
import subprocess

from robustmri.engine.model_metadata import code_version as checkout_version


def cpu_name() -> str:
    """The CPU model from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` reports."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=1)
def code_version() -> dict:
    """The code a measurement ran, asked once per process: the checkout's version, commit and whether tracked
    files differed from it (:func:`robustmri.engine.model_metadata.code_version`, as a trained model records
    them), and ``git describe --always --dirty`` (``-dirty``: they did); None outside a checkout or without git."""
    checkout = checkout_version()
    describe = None
    if checkout["git_commit"]:
        folder = os.path.dirname(os.path.abspath(__file__))
        try:
            done = subprocess.run(["git", "-C", folder, "describe", "--always", "--dirty", "--abbrev=12"],
                                  capture_output=True, text=True, timeout=30)
            describe = done.stdout.strip() if done.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            pass
    return {"robustmri": checkout["robustmri_version"], "commit": checkout["git_commit"], "describe": describe,
            "modified": checkout["git_dirty"]}


def run_provenance() -> dict:
    """What each run record carries about the code: ``commit`` (git describe, ``-dirty`` when modified; None
    outside a checkout) and the versions of robustmri, torch and MONAI."""
    import monai
    import torch

    code = code_version()
    return {"commit": code["describe"],
            "versions": {"robustmri": code["robustmri"], "torch": torch.__version__, "monai": monai.__version__}}


def describe_machine() -> dict:
    """CPU, cores, torch threads, GPU, versions and the code's version: recorded with a benchmark's protocol."""
    import torch

    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "code": code_version()}


def write_measurement(out: str | os.PathLike, stem: str, report: dict, table: str, script: str,
                      argv: list[str]) -> None:
    """Stamp a measurement's report with its command, date, machine and code, write ``stem.json`` and the table
    as ``stem.md`` into ``out``, and print the table (what each ``scripts/bench_*.py`` leaves behind)."""
    import datetime

    from robustmri.outputs import write_json

    report.update(command=f"python scripts/{script} " + " ".join(argv), code=code_version(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  machine=f"{platform.machine()}, {os.cpu_count()} CPU(s), {platform.platform()}")
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, f"{stem}.json"), report)
    with open(os.path.join(out, f"{stem}.md"), "w") as handle:
        handle.write(table)
    print(table)
