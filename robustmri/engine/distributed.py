"""Multi-process training with PyTorch's ``DistributedDataParallel``, launched by ``torchrun``.

``bundle/configs/multi_gpu_train.json`` (the model-zoo overlay) uses these pieces; nothing here
schedules processes: ``torchrun`` starts one process per device and sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address, and :func:`init_process_group` reads
them (NCCL on CUDA, gloo on the CPU).

Conventions, the same for every method config the overlay is merged onto:

- The training set is sharded by :class:`robustmri.data.in_memory.EpochSampler` (a
  ``DistributedSampler``): every rank draws the same (seed, epoch) permutation and takes its
  share, so the per-epoch order and the per-(seed, epoch, sample) augmentation do not depend on
  the number of ranks. ``batch_size`` is per process.
- The network is wrapped in ``DistributedDataParallel`` (:func:`prepare_distributed_network`);
  everything that needs the network itself (the weight average, influence, ``model.pt``) uses
  :func:`robustmri.influence.adapter.unwrap`.
- :class:`BroadcastState`, the first trainer handler at the end of every epoch, copies rank 0's
  network and weight average (parameters and BatchNorm statistics, which each rank updates
  from its own batches) to every rank, so validation, the influence step and the saved model
  see one set of weights on every rank.
- A second network a method keeps beside the trainer's (ALR's peer, MW-Net's weight net, PINT's
  teacher) follows the same rules: what the method trains by hand has its gradients averaged over
  the ranks (:func:`average_gradients`, as DDP does), and it takes rank 0's state at every epoch
  end. Per-epoch records are pooled over the ranks (:func:`gather_lists`), so every rank holds the
  same method state, the one rank 0 saves for resuming.
- Files are written by rank 0 only (:func:`is_main_process`); handlers that only log or write
  are dropped on other ranks (:func:`for_this_rank`).
- Validation is not sharded: every rank evaluates the whole (small) validation set with the
  same weights, so every rank has the same metrics.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch import nn

from robustmri.influence.distributed import all_reduce  # noqa: F401  (re-exported: methods use it from here)

logger = logging.getLogger(__name__)

#: Handlers that only log or write files: rank 0 keeps them, other ranks drop them.
RANK0_HANDLERS = ("StatsHandler", "TensorBoardStatsHandler", "ProgressBar", "CheckpointSaver", "MetricsSaver",
                  "ClassificationSaver")


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True for rank 0, and for a run without a process group."""
    return rank() == 0


def local_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_process_group(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes in the environment (once); NCCL on CUDA, gloo on the CPU.

    Returns whether a group is initialised. Without ``torchrun``'s variables (``WORLD_SIZE``
    unset) it does nothing, so the overlay also runs as a single plain process.
    """
    if is_distributed():
        return True
    if "WORLD_SIZE" not in os.environ:
        logger.warning("multi_gpu_train.json: not started by torchrun (no WORLD_SIZE): one process, no group")
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend)
    logger.info("process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def destroy_process_group() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def prepare_distributed_network(network: nn.Module, device, precision: str = "auto", channels_last: bool = True,
                                input_shape: tuple | None = None, **ddp_options) -> nn.Module:
    """:func:`robustmri.engine.precision.prepare_network`, then ``DistributedDataParallel`` in a process group.

    It takes ``prepare_network``'s arguments, so an overlay only replaces the ``network``
    node's target. Rank 0's initial weights are broadcast by DDP itself when it wraps.
    """
    from robustmri.engine.precision import prepare_network

    network = prepare_network(network, device, precision, channels_last, input_shape)
    if not is_distributed():
        return network
    device = torch.device(device)
    device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(network, device_ids=device_ids, **ddp_options)


@torch.no_grad()
def broadcast_module(module: nn.Module, source: int = 0) -> None:
    """Copy ``source``'s parameters and buffers of ``module`` to every rank (in place)."""
    if not is_distributed():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=source)


def average_gradients(parameters) -> None:
    """Replace each parameter's gradient by its mean over the ranks, as DDP does for the wrapped network
    (one flattened all-reduce; a missing gradient counts as zero). Nothing happens without a process group.

    For a second network a method trains by hand beside the trainer's (ALR's peer, MW-Net's weight
    net): with its gradient averaged, every rank's optimiser takes the same step, the step one
    process would take on the ranks' batches together.
    """
    if not is_distributed():
        return
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def gather_lists(values: list) -> list:
    """Every rank's ``values`` (picklable) concatenated in rank order; ``values`` itself without a process group."""
    if not is_distributed():
        return list(values)
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, list(values))
    return [value for part in parts for value in part]


def broadcast_object(value, source: int = 0):
    """``source``'s ``value`` (picklable) on every rank; ``value`` itself without a process group."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source)
    return holder[0]


class BroadcastState:
    """Trainer handler: at the end of every epoch, before any other handler, every rank takes rank 0's
    network and weight-average states (parameters and BatchNorm statistics)."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        from robustmri.influence.adapter import unwrap

        seen = set()
        for module in self.modules:
            module = unwrap(module)
            if id(module) not in seen:
                seen.add(id(module))
                broadcast_module(module)


def for_this_rank(handlers: Sequence) -> list:
    """``handlers`` on rank 0; on other ranks without those that only log or write (:data:`RANK0_HANDLERS`).

    A dropped TensorBoard handler already opened its event file when it was built: the file
    (empty of events) is closed and removed, so rank 0's is the only one.
    """
    if is_main_process():
        return list(handlers)
    kept = []
    for handler in handlers:
        if type(handler).__name__ in RANK0_HANDLERS:
            _discard_writer(handler)
        else:
            kept.append(handler)
    return kept


def _discard_writer(handler) -> None:
    writer = getattr(handler, "_writer", None)
    if writer is None or not getattr(handler, "internal_writer", False):
        return
    path = getattr(getattr(getattr(writer, "file_writer", None), "event_writer", None), "_file_name", None)
    writer.close()
    if path and os.path.isfile(path):
        os.remove(path)
