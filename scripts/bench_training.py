"""Training speed (images/s) of the data path, memory format and precision, side by side in one run.

    python scripts/bench_training.py --sizes 64,128 --repeats 3 --steps 10 --out bench/training_speed.json

On random images (``--n`` of them, 1 channel) and the paper's CNN (``padding=2``), batch
``--batch_size``, Adam and cross-entropy, four configurations:

- (a) the old data path: MONAI ``Dataset`` with a per-sample ``RandFlipd`` (prob 0.5, the
  width axis) and ``EnsureTyped(track_meta=False)``, a torch ``DataLoader`` (num_workers=0,
  shuffled), fp32 training of a contiguous network;
- (b) in-memory tensors: a preloaded [N, 1, H, W] tensor indexed with a shuffled permutation
  and half of each batch flipped at once with ``torch.where``; fp32, contiguous;
- (c) (b) with the network and its inputs in channels_last
  (``robustmri.engine.precision.prepare_network(..., "fp32", channels_last=True)``);
- (d) (c) under bf16 autocast (``prepare_network(..., "bf16")``), reported even when slower.

Each configuration has its own network (same initial weights) and optimiser, is warmed up
by ``--warmup`` steps (not timed), then timed for ``--steps`` optimiser steps (data
included) per repeat; the repeats are interleaved (a, b, c, d, a, b, ...), so a slow
phase of the machine hits every configuration alike. The table gives the median images/s
and the speed-up over (a). The run also records whether the CPU has native bf16
(avx512_bf16 / amx_bf16 flags in /proc/cpuinfo) and what ``precision="auto"`` chooses.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

import fire
import numpy as np
import torch
from torch import nn

from robustmri.bench.machine import cpu_name
from robustmri.engine.precision import prepare_network, resolve_precision
from robustmri.networks import PaperCNN
from robustmri.outputs import write_json

CONFIGS = {
    "a": "MONAI Dataset + RandFlipd + EnsureTyped, DataLoader(num_workers=0); fp32 contiguous",
    "b": "in-memory tensor, batched flip; fp32 contiguous",
    "c": "(b) + channels_last",
    "d": "(c) + bf16 autocast",
}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")


def cpu_flags() -> dict[str, bool]:
    """Which of :data:`CPU_FLAGS` ``/proc/cpuinfo`` lists (all False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        flags = []
    return {flag: flag in flags for flag in CPU_FLAGS}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _monai_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    """(a): per-sample MONAI transforms and a DataLoader, epoch after epoch."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, EnsureTyped, RandFlipd

    transform = Compose([RandFlipd(keys="image", prob=0.5, spatial_axis=1),
                         EnsureTyped(keys="image", track_meta=False)]).set_random_state(seed)
    data = [{"image": image, "label": int(label)} for image, label in zip(images, labels)]
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(Dataset(data, transform=transform), batch_size=batch_size, shuffle=True, num_workers=0,
                        drop_last=True, generator=generator)
    while True:
        for batch in loader:
            yield batch["image"], batch["label"]


def _tensor_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
    """(b)-(d): a shuffled permutation of a preloaded tensor, half of each batch flipped in one go."""
    generator = torch.Generator().manual_seed(seed)
    n = len(images)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            batch = images[index]
            flip = torch.rand(batch_size, generator=generator) < 0.5
            yield torch.where(flip[:, None, None, None], batch.flip(-1), batch), labels[index]


class _Run:
    """One configuration: its network, optimiser and batches; ``steps(k)`` trains k steps and returns seconds."""

    def __init__(self, key: str, size: int, batches, device: torch.device, seed: int):
        torch.manual_seed(seed)
        network = PaperCNN(spatial_size=size, padding=2)
        if key == "a":
            network.to(device)
        else:
            network = prepare_network(network, device, "bf16" if key == "d" else "fp32", channels_last=key in "cd")
        self.network = network.train()
        self.optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        self.batches = batches
        self.device = device
        self.loss = float("nan")

    def steps(self, count: int) -> float:
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(count):
            images, labels = next(self.batches)
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(self.network(images), labels)
            loss.backward()
            self.optimizer.step()
        _sync(self.device)
        elapsed = time.perf_counter() - start
        self.loss = float(loss.detach())
        return elapsed


def _sizes(sizes) -> list[int]:
    if isinstance(sizes, str):
        sizes = sizes.replace(",", " ").split()
    elif isinstance(sizes, int):
        sizes = [sizes]
    return [int(s) for s in sizes]


def table(results: list[dict]) -> str:
    lines = ["| size | config | what | images/s (median) | images/s per repeat | speed-up over (a) |",
             "|---:|:---:|:---|---:|:---|---:|"]
    for row in results:
        per_repeat = ", ".join(f"{x:.0f}" for x in row["images_per_s"])
        lines.append(f"| {row['size']} | {row['config']} | {CONFIGS[row['config']]} | {row['median_images_per_s']:.1f} "
                     f"| {per_repeat} | {row['speedup_over_a']:.2f}x |")
    return "\n".join(lines)


def main(sizes="64,128", repeats: int = 3, steps: int = 10, warmup: int = 2, n: int = 1024, batch_size: int = 32,
         device: str | None = None, threads: int | None = None, seed: int = 0,
         out: str = "bench/training_speed.json") -> dict:
    """Measure (a)-(d) at every size; print a markdown table and write the JSON to ``out``."""
    if threads:
        torch.set_num_threads(int(threads))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    flags = cpu_flags()
    results, auto = [], {}
    for size in _sizes(sizes):
        generator = torch.Generator().manual_seed(seed)
        images = torch.rand(n, 1, size, size, generator=generator)
        labels = torch.randint(3, (n,), generator=generator)
        keys = list(CONFIGS)
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            keys.remove("d")
        runs = {key: _Run(key, size, _monai_batches(images.numpy(), labels.numpy(), batch_size, seed) if key == "a"
                          else _tensor_batches(images, labels, batch_size, seed), device, seed) for key in keys}
        for run in runs.values():
            run.steps(warmup)
        seconds = {key: [] for key in keys}
        for repeat in range(int(repeats)):
            for key, run in runs.items():
                seconds[key].append(run.steps(int(steps)))
            print(f"size {size}, repeat {repeat + 1}/{repeats}: "
                  + ", ".join(f"({k}) {batch_size * steps / s[-1]:.1f}" for k, s in seconds.items()) + " images/s",
                  flush=True)
        medians = {key: statistics.median(batch_size * int(steps) / s for s in seconds[key]) for key in keys}
        for key in keys:
            rates = [batch_size * int(steps) / s for s in seconds[key]]
            results.append({"size": size, "config": key, "description": CONFIGS[key],
                            "seconds": seconds[key], "images_per_s": rates,
                            "median_images_per_s": medians[key], "speedup_over_a": medians[key] / medians["a"],
                            "final_loss": runs[key].loss})
        start = time.perf_counter()
        choice, why = resolve_precision("auto", device, PaperCNN(spatial_size=size, padding=2).to(device)
                                        .to(memory_format=torch.channels_last), (batch_size, 1, size, size))
        auto[str(size)] = {"choice": choice, "why": why, "seconds": time.perf_counter() - start}
    report = {
        "machine": {"cpu": cpu_name(), "cpu_flags": flags, "native_bf16_cpu": flags["avx512_bf16"] or flags["amx_bf16"],
                    "device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "settings": {"sizes": _sizes(sizes), "repeats": int(repeats), "steps": int(steps), "warmup": int(warmup),
                     "n": int(n), "batch_size": int(batch_size), "network": "PaperCNN(padding=2)",
                     "optimizer": "Adam(lr=1e-3)", "seed": int(seed)},
        "configs": CONFIGS,
        "results": results,
        "auto_precision": auto,
    }
    markdown = table(results)
    print()
    print(f"{cpu_name()} ({device}, {torch.get_num_threads()} threads); CPU flags: "
          + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()))
    print(markdown)
    print("precision='auto' chooses: " + ", ".join(f"{s} px {a['choice']} ({a['seconds']:.2f} s to decide)"
                                                    for s, a in auto.items()))
    report["markdown"] = markdown
    write_json(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda _: None)
