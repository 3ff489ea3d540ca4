"""Training precision and memory format: decided once, from what the processor can do, and recorded.

:func:`resolve_precision` turns a requested precision (``"auto"``, ``"fp32"``, ``"bf16"``)
into the one training runs in, with the reason. ``"auto"`` on CUDA takes bf16 where the GPU
has it natively, else fp16 (which needs a GradScaler: :func:`trainer_amp` tells the MONAI
trainer to use its own ``amp=True``). ``"auto"`` on the CPU reads the processor's
capabilities (:func:`cpu_capabilities`: torch's own CPU feature detection, ``/proc/cpuinfo``
where torch has none) and applies :func:`cpu_rule`: without native bf16 instructions
(AVX512-BF16, AMX-BF16, Arm BF16) bf16 is emulated and slower, so fp32; with AMX-BF16 tiles it
is bf16. Only in between (AVX512-BF16 or Arm BF16 without AMX) does the gain depend on the
network, and there one measurement decides (:func:`measure_cpu`: bf16 only where it is at
least :data:`MIN_SPEEDUP` times faster with a loss within :data:`LOSS_RTOL` of fp32's),
cached per machine (:func:`cache_path`), so the same command chooses the same way every
time and a busy moment cannot flip it. A resumed run takes the precision recorded in its
training state instead (:mod:`robustmri.engine.training_state`), and the trained model's
``model_metadata.json`` records the choice and why.

:func:`prepare_network` moves the network to its device, into channels_last memory format
when it has 2-D convolutions, and wraps its ``forward`` (an instance attribute, not a wrapper
class, so state_dict keys, ``.features``, ``.classifier`` and isinstance checks are those of
the network) so that 4-D inputs are made channels_last and, for bf16 (and fp16 when the
trainer does not handle it), the forward of a network in training mode runs under
``torch.autocast`` with floating outputs cast back to float32.

Autocast applies in training mode only: a network in eval mode (validation, predictions,
influence features and input gradients, export parity) runs in float32 as before, so those
numbers do not change with the training precision. ``network.features(...)`` and
``network.classifier`` are not wrapped either. :func:`full_precision` runs the wrapped
forward in float32 in training mode too (for code that needs float32 activations there).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Iterator

import torch
from torch import nn

from robustmri.outputs import write_json

logger = logging.getLogger(__name__)

#: The precisions that may be requested.
PRECISIONS = ("auto", "fp32", "bf16")
#: CPU features (torch's names, which are ``/proc/cpuinfo``'s on x86) that run bf16 natively.
NATIVE_BF16 = ("amx_bf16", "avx512_bf16", "bf16", "sve_bf16")
#: Where a measurement decides: bf16 only when a training step is at least this many times faster than fp32 ...
MIN_SPEEDUP = 1.2
#: ... and its loss matches the fp32 loss (same weights, same input) within this relative tolerance.
LOSS_RTOL = 2e-2
#: The CPU measurement uses at most this many samples of ``input_shape`` (same C, H, W), to stay quick.
MEASURE_MAX_BATCH = 4
#: Timed step pairs stop once this many seconds have been spent on them (at least one pair is timed).
MEASURE_BUDGET_S = 0.5

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _cuda_has_bf16(device: torch.device) -> bool:
    """Native bf16 on this CUDA device (emulated bf16, on GPUs before Ampere, does not count)."""
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch: no including_emulation argument
            return bool(torch.cuda.is_bf16_supported())


def _proc_cpuinfo() -> dict:
    """The CPU's model name and flags from ``/proc/cpuinfo`` (empty where there is none)."""
    found: dict = {}
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and "cpu_name" not in found:
                    found["cpu_name"] = value.strip()
                elif key in ("flags", "Features") and "flags" not in found:
                    found["flags"] = set(value.split())
    except OSError:
        pass
    return found


def cpu_capabilities() -> dict:
    """The CPU as training sees it: its model, torch's kernel level and which :data:`NATIVE_BF16` features it has.

    The features come from torch's own detection (``torch.cpu.get_capabilities``), the same
    that decides torch's kernels; where this torch has none, from ``/proc/cpuinfo``.
    """
    info = _proc_cpuinfo()
    detect = getattr(torch.cpu, "get_capabilities", None)
    features = dict(detect()) if detect is not None else {name: True for name in info.get("flags", ())}
    return {"cpu": str(features.get("cpu_name") or info.get("cpu_name") or platform.processor() or "unknown"),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{name: bool(features.get(name, False)) for name in (*NATIVE_BF16, "amx_tile")}}


def cpu_rule(capabilities: dict) -> tuple[str | None, str]:
    """``(precision, why)`` from :func:`cpu_capabilities` alone; ``precision`` None where they cannot decide."""
    where = f"{capabilities['cpu']} (torch CPU capability {capabilities['torch_cpu_capability']})"
    if capabilities["amx_bf16"] and capabilities["amx_tile"]:
        return "bf16", f"{where} has AMX-BF16 tiles: bf16 matrix units"
    native = [name for name in NATIVE_BF16 if capabilities[name]]
    if not native:
        return "fp32", f"{where} has no native bf16 (AVX512-BF16, AMX-BF16 or Arm BF16): bf16 would be emulated"
    return None, f"{where} has {', '.join(native)} without AMX: whether bf16 is faster depends on the network"


def cache_path() -> str:
    """The file of CPU measurements: ``$XDG_CACHE_HOME/robustmri/precision.json`` (``~/.cache`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "robustmri", "precision.json")


def _read_cache(path: str) -> dict:
    try:
        with open(path) as handle:
            cache = json.load(handle)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: measure (and write it anew)
        return {}


def _write_cache(path: str, cache: dict) -> None:
    """Write atomically (:func:`~robustmri.outputs.write_json`); a cache that cannot be written only means
    measuring again next time."""
    try:
        write_json(path, cache)
    except OSError as err:
        logger.warning("precision: cannot write %s (%s); the measurement is not kept", path, err)


def _measured(network: nn.Module, input_shape: tuple, steps: int, capabilities: dict, why: str) -> tuple[str, str]:
    """The cached measurement's choice for this machine, network and input, measuring once when there is none."""
    shape = tuple(int(s) for s in input_shape)
    key = " | ".join([capabilities["cpu"], f"torch {torch.__version__}", capabilities["torch_cpu_capability"],
                      f"{type(network).__module__}.{type(network).__qualname__}", "x".join(map(str, shape))])
    path = cache_path()
    entry = _read_cache(path).get(key)
    if isinstance(entry, dict) and entry.get("precision") in ("fp32", "bf16"):
        return entry["precision"], f"{why}; measured on {entry.get('measured_utc', '?')} ({path}): {entry['summary']}"
    measured = measure_cpu(network, shape, steps)
    choice = choose(measured)
    summary = (f"bf16 {measured['speedup']:.2f}x the speed of fp32 (needs >= {MIN_SPEEDUP:.2f}x), loss difference "
               f"{measured['loss_rel_diff']:.1e} (needs <= {LOSS_RTOL:.0e})")
    cache = _read_cache(path)
    cache[key] = {"precision": choice, "summary": summary, "measurement": measured,
                  "measured_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    _write_cache(path, cache)
    return choice, f"{why}; measured once for this machine (kept in {path}): {summary}"


def resolve_precision(requested: str, device, network: nn.Module | None = None, input_shape: tuple | None = None,
                      steps: int = 3) -> tuple[str, str]:
    """``(precision, why)``: ``"fp32"``, ``"bf16"`` or (CUDA without native bf16) ``"fp16"``, and the reason.

    ``"fp32"`` and ``"bf16"`` are returned as given (bf16 on a CUDA device without native bf16
    is a ValueError). ``"auto"``: on CUDA bf16 where supported, else fp16; on the CPU
    :func:`cpu_rule`, and where it cannot decide the cached measurement on ``network`` and
    ``input_shape`` (fp32 when there is nothing to measure); on other devices fp32.
    ``network`` itself is not changed: a measurement runs on a copy.
    """
    if not isinstance(requested, str) or requested.lower() not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {requested!r}")
    requested = requested.lower()
    device = torch.device(device)
    if requested == "bf16" and device.type == "cuda" and not _cuda_has_bf16(device):
        raise ValueError(f"precision 'bf16' was requested but {device} ({torch.cuda.get_device_name(device)}) "
                         "has no native bf16 support; use 'fp32' or 'auto' (fp16 with a GradScaler)")
    if requested != "auto":
        return requested, "requested"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if _cuda_has_bf16(device):
            return "bf16", f"{device} ({name}) has native bf16"
        return "fp16", f"{device} ({name}) has no native bf16: fp16 with the trainer's GradScaler"
    if device.type != "cpu":
        return "fp32", f"{device.type}: only CUDA and the CPU have a rule"
    capabilities = cpu_capabilities()
    choice, why = cpu_rule(capabilities)
    if choice is not None:
        return choice, why
    if network is None or input_shape is None:
        return "fp32", f"{why}; nothing to measure (no network or input_shape given)"
    return _measured(network, input_shape, steps, capabilities, why)


def choose(measured: dict) -> str:
    """``"bf16"`` when it was at least :data:`MIN_SPEEDUP` faster and its loss within :data:`LOSS_RTOL`, else fp32."""
    fast = measured["speedup"] >= MIN_SPEEDUP
    agrees = measured["loss_rel_diff"] <= LOSS_RTOL
    return "bf16" if fast and agrees else "fp32"


def _loss(output: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    output = output.float()
    if targets is not None:
        return nn.functional.cross_entropy(output, targets)
    return output.square().mean()


def _timed_step(network: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None,
                dtype: torch.dtype | None) -> tuple[float, float]:
    """One forward/backward step (under CPU autocast to ``dtype`` unless None): ``(seconds, loss)``."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        output = network(inputs)
    loss = _loss(output, targets)
    loss.backward()
    elapsed = time.perf_counter() - start
    network.zero_grad(set_to_none=True)
    return elapsed, float(loss.detach())


def _plain_copy(network: nn.Module) -> nn.Module:
    """A deep copy on the CPU in training mode, without a :func:`prepare_network` forward (no autocast of its own)."""
    clone = copy.deepcopy(network)
    if isinstance(clone.__dict__.get("forward"), _PrecisionForward):
        inner = clone.__dict__["forward"].inner
        if inner is None:
            del clone.__dict__["forward"]
        else:
            clone.forward = inner
    return clone.cpu().train()


def _is_channels_last(network: nn.Module) -> bool:
    """Some 2-D convolution weight is channels_last (and not also contiguous, as one with a single channel is)."""
    return any(isinstance(m, nn.Conv2d) and m.weight.dim() == 4 and not m.weight.is_contiguous()
               and m.weight.is_contiguous(memory_format=torch.channels_last) for m in network.modules())


def measure_cpu(network: nn.Module, input_shape: tuple, steps: int = 3) -> dict:
    """fp32 against bf16 autocast on a deep copy of ``network``: seconds per step and the losses.

    Random input (a fixed seed, the global RNG untouched) of ``input_shape`` with the batch
    capped at :data:`MEASURE_MAX_BATCH`, in the memory format of the network's convolution
    weights; random class targets when the output is [N, C]. One warm-up step of each is
    excluded, then up to ``steps`` interleaved pairs (fp32 step, bf16 step), stopping early
    once :data:`MEASURE_BUDGET_S` is spent; the median step time of each is reported. The
    losses are of the same weights on the same input (no optimiser step is taken). The
    network's parameters, buffers and gradients are not touched.
    """
    shape = tuple(int(s) for s in input_shape)
    shape = (min(shape[0], MEASURE_MAX_BATCH),) + shape[1:]
    clone = _plain_copy(network)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(shape, generator=generator)
    if inputs.dim() == 4 and _is_channels_last(clone):
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    losses: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with torch.enable_grad():
        with torch.no_grad():
            probe = clone(inputs)  # the output shape, for the targets
        targets = (torch.randint(probe.shape[1], (probe.shape[0],), generator=generator)
                   if probe.dim() == 2 and probe.shape[1] > 1 else None)
        for dtype in (None, torch.bfloat16):  # warm-up, not timed
            _timed_step(clone, inputs, targets, dtype)
        spent = 0.0
        for _ in range(max(1, int(steps))):
            for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
                seconds, loss = _timed_step(clone, inputs, targets, dtype)
                times[name].append(seconds)
                losses[name].append(loss)
                spent += seconds
            if spent >= MEASURE_BUDGET_S:
                break
    fp32_s, bf16_s = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    fp32_loss, bf16_loss = statistics.fmean(losses["fp32"]), statistics.fmean(losses["bf16"])
    return {"input_shape": shape, "pairs": len(times["fp32"]), "fp32_s": fp32_s, "bf16_s": bf16_s,
            "speedup": fp32_s / bf16_s if bf16_s > 0 else float("inf"), "fp32_loss": fp32_loss,
            "bf16_loss": bf16_loss,
            "loss_rel_diff": abs(bf16_loss - fp32_loss) / max(abs(fp32_loss), 1e-12)}


# -- the network, prepared --------------------------------------------------------------------------


def _has_conv2d_weights(network: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.conv._ConvNd) and getattr(m, "weight", None) is not None
               and m.weight.dim() == 4 for m in network.modules())


def _channels_last_inputs(value):
    if torch.is_tensor(value) and value.dim() == 4:
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _to_float32(value):
    if torch.is_tensor(value):
        return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_float32(v) for v in value)
    if isinstance(value, list):
        return [_to_float32(v) for v in value]
    if isinstance(value, dict):
        return type(value)((k, _to_float32(v)) for k, v in value.items())
    return value


def _device_type(args, kwargs, network: nn.Module) -> str:
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value):
            return value.device.type
    parameter = next(network.parameters(), None)
    return parameter.device.type if parameter is not None else "cpu"


class _PrecisionForward:
    """The ``forward`` that :func:`prepare_network` puts on a network (an instance attribute).

    It holds the network (deepcopy and pickle rebind it to the copy) and the forward it
    replaces when that was an instance attribute too (``inner``; None: the class's forward).
    The settings are read from the network's attributes at every call.
    """

    def __init__(self, module: nn.Module, inner=None):
        self.module = module
        self.inner = inner

    def __call__(self, *args, **kwargs):
        module = self.module
        forward = self.inner if self.inner is not None else type(module).forward.__get__(module)
        if getattr(module, "robustmri_channels_last", False):
            args = tuple(_channels_last_inputs(a) for a in args)
            kwargs = {k: _channels_last_inputs(v) for k, v in kwargs.items()}
        dtype = _AUTOCAST_DTYPES.get(getattr(module, "robustmri_precision", "fp32"))
        if (dtype is None or trainer_amp(module) or not module.training
                or getattr(module, "_robustmri_full_precision", False)):
            return forward(*args, **kwargs)
        with torch.autocast(_device_type(args, kwargs, module), dtype=dtype):
            output = forward(*args, **kwargs)
        return _to_float32(output)


def trainer_amp(network: nn.Module) -> bool:
    """True only for fp16: the MONAI SupervisedTrainer's own ``amp=True`` (autocast + GradScaler) runs it.

    A prepared network in fp16 gets no autocast of its own (the trainer's is the one, so that
    its GradScaler scales the loss); bf16 needs no scaler and autocasts in its own forward.
    """
    from robustmri.influence.adapter import unwrap  # a DistributedDataParallel network: the module inside

    return getattr(unwrap(network), "robustmri_precision", None) == "fp16"


@contextlib.contextmanager
def full_precision(network: nn.Module) -> Iterator[nn.Module]:
    """``with full_precision(network):`` its prepared forward runs in float32, in training mode too."""
    previous = network.__dict__.get("_robustmri_full_precision", False)
    network._robustmri_full_precision = True
    try:
        yield network
    finally:
        network._robustmri_full_precision = previous


def set_precision(network: nn.Module, precision: str, why: str, requested: str | None = None) -> nn.Module:
    """Record ``precision`` (and why, and what was requested) on a network on its device and wrap its forward.

    :func:`prepare_network` calls it with its decision; a resumed run with the precision its
    training state recorded. Neither the device nor the memory format changes here. The
    record is ``network.robustmri_precision``, ``robustmri_precision_reason`` and
    ``robustmri_precision_requested``; ``forward`` is wrapped (see the module doc) only when
    the precision or channels_last needs it.
    """
    network.robustmri_precision = precision
    network.robustmri_precision_reason = why
    network.robustmri_precision_requested = requested if requested is not None else getattr(
        network, "robustmri_precision_requested", precision)
    current = network.__dict__.get("forward")
    inner = current.inner if isinstance(current, _PrecisionForward) else current
    if getattr(network, "robustmri_channels_last", False) or precision in _AUTOCAST_DTYPES:
        network.forward = _PrecisionForward(network, inner)
    elif isinstance(current, _PrecisionForward):  # nothing to do any more: put back what was there
        if inner is None:
            del network.__dict__["forward"]
        else:
            network.forward = inner
    return network


def prepare_network(network: nn.Module, device, precision: str = "auto", channels_last: bool = True,
                    input_shape: tuple | None = None) -> nn.Module:
    """``network`` itself, on ``device``, in the resolved precision and memory format.

    channels_last applies when asked and the network has 4-D convolution weights. The
    precision is :func:`resolve_precision` of ``precision`` (``input_shape``, e.g.
    ``(batch, 1, size, size)``, is what ``"auto"`` measures on a CPU whose capabilities cannot
    decide, after the memory format is set), recorded by :func:`set_precision`; the choice and
    why are logged in one line. Calling it again re-prepares the network.
    """
    device = torch.device(device)
    network.to(device)
    use_channels_last = bool(channels_last) and _has_conv2d_weights(network)
    if use_channels_last:
        network.to(memory_format=torch.channels_last)
    elif getattr(network, "robustmri_channels_last", False):  # prepared before with channels_last
        network.to(memory_format=torch.contiguous_format)
    resolved, why = resolve_precision(precision, device, network, input_shape)
    network.robustmri_channels_last = use_channels_last
    set_precision(network, resolved, why, str(precision).lower())
    logger.info("network %s on %s: precision %s (requested %s: %s), channels_last %s, trainer amp %s",
                type(network).__name__, device, resolved, precision, why, use_channels_last, trainer_amp(network))
    return network
