"""Deployment speed: ONNX Runtime vs PyTorch eager throughput, and one DICOM series end to end.

    python scripts/bench_deploy.py --threads 2 --out bench_deploy.json
    python scripts/bench_deploy.py --checkpoint bundle/models/model.pt --spatial_size 256 --network_padding 0

Throughput: slices per second at batch 1 and 32 for PyTorch eager and ONNX Runtime on the
CPU (and on CUDA when a GPU and onnxruntime-gpu are there). End to end: one series of
``n_slices`` slices of ``image_size`` x ``image_size`` (real figshare slices when the data is
found, else the embedded synthetic phantom) read, preprocessed, classified, reported (JSON
and SR); the model is loaded once beforehand, as a service would. Speed does not depend on
the weights: without --checkpoint an untrained network of the paper's shape is used.
A benchmark, not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import tempfile
import time

import fire
import numpy as np
import torch

from robustmri import CLASS_NAMES
from robustmri.bench.dicom_fixtures import series_images, write_mr_series
from robustmri.bench.machine import cpu_name
from robustmri.deploy.dicom.study import infer_dicom
from robustmri.deploy.onnx.export import export_onnx
from robustmri.deploy.onnx.runtime import CUDA, OnnxClassifier
from robustmri.engine.checkpoint import load_weights
from robustmri.networks import PaperCNN

FIGSHARE = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "shared",
                                        "data", "figshare-brain-tumor"))


def _rate(run, batch: int, min_seconds: float, warmup: int = 3) -> float:
    """Slices per second of ``run()`` (one batch per call), timed for at least ``min_seconds``."""
    for _ in range(warmup):
        run()
    calls, start = 0, time.perf_counter()
    while True:
        run()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 3:
            return calls * batch / elapsed


def _detector_data(images, spatial_size: int) -> dict:
    """The OOD detector's data for this speed bench: the series' own slices (prepared, and 3 noisy copies each for
    the covariance), the threshold accepting all of them, so the series is classified. Speed does not depend on it;
    a real export fits it on the training split (scripts/export_onnx.py)."""
    from robustmri.data.preprocessing import preprocess_minmax

    prepared = np.stack([preprocess_minmax(np.asarray(i, np.float32), spatial_size) for i in images])[:, None]
    rng = np.random.default_rng(0)
    train = np.concatenate([np.clip(prepared + rng.normal(0, 0.05, prepared.shape), 0, 1) for _ in range(3)])
    return {"ood_train": (train.astype(np.float32), np.arange(len(train)) % len(CLASS_NAMES)),
            "ood_validation": prepared, "target_acceptance": 1.0}


def main(checkpoint: str = "", spatial_size: int = 256, network_padding: int = 0, threads: int = 2,
         min_seconds: float = 3.0, n_slices: int = 24, image_size: int = 512, repeats: int = 5,
         dataset_dir: str = FIGSHARE, out: str = ""):
    """Measure and print a JSON report (also written to ``out`` when given)."""
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network = PaperCNN(spatial_size=spatial_size, padding=network_padding)
    if checkpoint:
        load_weights(network, checkpoint)
    network.eval()
    report = {"machine": f"{cpu_name()}, {os.cpu_count()} logical CPU(s)", "threads": threads,
              "spatial_size": spatial_size, "weights": checkpoint or "untrained (speed does not depend on them)",
              "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint or os.path.join(tmp, "model.pt")
        if not checkpoint:
            torch.save(network.state_dict(), ckpt)
        onnx_file = os.path.join(tmp, "model.onnx")
        parity = np.random.default_rng(0).random((32, 1, spatial_size, spatial_size), dtype=np.float32)
        images, source = series_images(n_slices, image_size, dataset_dir)
        export = export_onnx(network, onnx_file, CLASS_NAMES, spatial_size, checkpoint=ckpt, parity_images=parity,
                             preprocess="minmax", **_detector_data(images, spatial_size))
        report["parity_random_images"] = export["parity"]

        throughput = {}
        # one session per provider and one GPU copy of the network, as a service would hold them
        cpu = OnnxClassifier(onnx_file, device="cpu", intra_op_num_threads=threads)
        gpu = OnnxClassifier(onnx_file, device="auto")
        net_gpu = copy.deepcopy(network).cuda() if torch.cuda.is_available() else None
        for batch in (1, 32):
            x = torch.rand(batch, 1, spatial_size, spatial_size)
            with torch.inference_mode():
                throughput[f"pytorch_eager_cpu_b{batch}"] = _rate(lambda: network(x), batch, min_seconds)
            xn = x.numpy()
            throughput[f"onnxruntime_cpu_b{batch}"] = _rate(lambda: cpu.predict(xn), batch, min_seconds)
            if gpu.provider == CUDA:
                throughput[f"onnxruntime_cuda_b{batch}"] = _rate(lambda: gpu.predict(xn), batch, min_seconds)
            if net_gpu is not None:
                x_gpu = x.cuda()

                def run_gpu():
                    with torch.inference_mode():
                        net_gpu(x_gpu)
                    torch.cuda.synchronize()

                throughput[f"pytorch_eager_cuda_b{batch}"] = _rate(run_gpu, batch, min_seconds)
        report["slices_per_second"] = {k: round(v, 1) for k, v in throughput.items()}
        report["onnxruntime_over_pytorch_cpu_b32"] = round(throughput["onnxruntime_cpu_b32"]
                                                           / throughput["pytorch_eager_cpu_b32"], 2)

        series_dir = os.path.join(tmp, "series")
        write_mr_series(series_dir, images)
        classifier = cpu
        times, stages = [], []
        for repeat in range(repeats + 1):  # the first run warms the file cache and onnxruntime
            start = time.perf_counter()
            summary = infer_dicom(series_dir, classifier, os.path.join(tmp, f"out{repeat}"), progress=False,
                                  allow_unsigned=True)  # a measurement of a model exported just now
            elapsed = time.perf_counter() - start
            assert summary["n_series_classified"] == 1, summary
            if repeat:
                times.append(elapsed)
                with open(os.path.join(tmp, f"out{repeat}", summary["series"][0]["report_file"])) as handle:
                    stages.append(json.load(handle)["timing_s"])
        report["end_to_end"] = {
            "series": f"{len(images)} slices of {image_size} x {image_size}, MR Image Storage, {source}",
            "provider": classifier.provider, "repeats": repeats,
            "seconds_median": round(statistics.median(times), 4), "seconds_min": round(min(times), 4),
            "decode_preprocess_s_median": round(statistics.median(s["decode_preprocess"] for s in stages), 4),
            "inference_s_median": round(statistics.median(s["inference"] for s in stages), 4),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        with open(out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    fire.Fire(main)
