"""Progress bars for long work (tqdm): shown on an interactive terminal, quiet in logs and on ranks other than 0.

``disable=None`` is tqdm's own "only when the output is a terminal"; under ``torchrun`` only
rank 0 draws, so N processes do not draw N bars.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from tqdm.auto import tqdm


def _draws() -> bool:
    """Rank 0 (or no process group) draws; the same test as :func:`robustmri.engine.distributed.is_main_process`,
    repeated here because this module sits below the engine."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None, unit: str = "batch") -> tqdm:
    """``tqdm(iterable, ...)``, drawn only on an interactive terminal of rank 0, and cleared when done."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, disable=None if _draws() else True)


def map_in_processes(function, jobs: list, workers: int = 1, desc: str = "", unit: str = "img", show: bool = True,
                     chunksize: int = 8) -> list:
    """``[function(job) for job in jobs]``, in ``workers`` processes when more than one (``function`` and the jobs
    must pickle), in order, with a progress bar unless ``show`` is False."""
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            return list(tqdm(pool.map(function, jobs, chunksize=chunksize), total=len(jobs), desc=desc, unit=unit,
                             disable=not show, leave=False))
    return [function(job) for job in tqdm(jobs, desc=desc, unit=unit, disable=not show, leave=False)]
