"""The machine a measurement ran on, as the benchmark scripts write it next to their numbers."""

from __future__ import annotations

import os
import platform
import subprocess


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


def code_version() -> dict:
    """The code a measurement ran: the package version and, in a git checkout, its commit and whether files
    differed from it (``commit`` None outside a checkout or without git)."""
    from robustmri import __version__

    folder = os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", folder, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"robustmri": __version__, "commit": commit, "modified": bool(status) if status is not None else None}


def describe_machine() -> dict:
    """CPU, cores, torch threads, GPU, versions and the code's version: recorded with a benchmark's protocol."""
    import torch

    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(), "code": code_version()}
