"""Peak memory of DICOM series inference: does it grow with the run, or only with the largest series?

    OMP_NUM_THREADS=1 python scripts/bench_dicom_memory.py --out bench_dicom_memory.json

Writes synthetic series of ``image_size`` x ``image_size`` slices (MR Image Storage, one file
per slice; and the same as Enhanced MR, one multi-frame file per series, when this code base
can write it) in the cases "800 slices in 8 series" and "200 slices in 1 series", and runs
:func:`robustmri.deploy.dicom.study.infer_dicom` on each in a fresh subprocess (the model
loaded and three batches of 32 run beforehand, as a service would). Per case, from
/proc/self/status: the resident set size after that warm-up (``baseline_mb``), the peak
resident set size during inference (``peak_mb``: VmHWM, reset to the baseline before inference
through /proc/self/clear_refs) and their difference (``inference_mb``: what reading, decoding,
classifying and reporting the series added); and the peak of the warm-up (``warm_up_peak_mb``).
The subprocess imports the ``robustmri`` on its PYTHONPATH, so the same script measures another
checkout (e.g. before a change): ``PYTHONPATH=/path/to/other/checkout python
scripts/bench_dicom_memory.py``. Speed does not matter here; the weights are an untrained
network of the paper's shape.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import fire
import numpy as np

from robustmri.outputs import write_json

#: The batch size of inference (infer_dicom's default).
BATCH = 32
WARM_UP_BATCHES = 3
#: (name, number of series, slices per series)
CASES = (("800 slices in 8 series", 8, 100), ("200 slices in 1 series", 1, 200))


def _images(n: int, size: int, seed: int) -> list[np.ndarray]:
    """Distinct slices whose values are multiples of 0.25 (exact through the fixtures' slope 0.25, intercept -10)."""
    rng = np.random.default_rng(seed)
    base = np.add.outer(np.arange(size), np.arange(size)).astype(np.float64)
    return [base + rng.integers(0, 400, (size, size)) * 0.25 for _ in range(n)]


def _write_case(folder: str, n_series: int, per_series: int, size: int, enhanced: bool) -> None:
    from robustmri.bench import dicom_fixtures

    for k in range(n_series):
        images = _images(per_series, size, seed=k)
        if enhanced:
            dicom_fixtures.write_enhanced_mr(os.path.join(folder, f"series{k}.dcm"), images, series_number=k + 1)
        else:
            dicom_fixtures.write_mr_series(os.path.join(folder, f"series{k}"), images, series_number=k + 1)


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(folder: str, model: str, output_dir: str) -> None:
    """Run inference on ``folder`` in this process; print one JSON line with the memory figures."""
    from robustmri.deploy.dicom.study import infer_dicom
    from robustmri.deploy.onnx.runtime import OnnxClassifier

    classifier = OnnxClassifier(model, device="cpu", intra_op_num_threads=1)
    # full batches first, as a service would have run: ONNX Runtime's CPU arena settles at its size on the
    # second run of a shape (about 0.8 GB at 256 x 256, batch 32), so it is in the baseline, not in the figures
    batch = np.random.default_rng(0).random((BATCH, 1, classifier.spatial_size, classifier.spatial_size), np.float32)
    for _ in range(WARM_UP_BATCHES):
        classifier.predict(batch)
    warm_up_peak = _status_mb("VmHWM")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # the peak resident set size starts again from the current one (Linux >= 4.0)
    baseline = _status_mb("VmRSS")
    summary = infer_dicom(folder, classifier, output_dir, batch_size=BATCH, progress=False,
                          allow_unsigned=True)  # a measurement tool: the model is the one given, unsigned or not
    peak = _status_mb("VmHWM")
    print(json.dumps({"baseline_mb": round(baseline, 1), "peak_mb": round(peak, 1),
                      "inference_mb": round(peak - baseline, 1), "warm_up_peak_mb": round(warm_up_peak, 1),
                      "n_files": summary["n_files"], "n_series_classified": summary["n_series_classified"]}))


def main(image_size: int = 512, spatial_size: int = 256, network_padding: int = 0, enhanced: bool = True,
         case: str = "", out: str = ""):
    """Measure every case (those whose name contains ``case`` when given; and its Enhanced MR form when
    ``enhanced`` and supported); print a JSON report."""
    import torch

    from robustmri import CLASS_NAMES
    from robustmri.bench import dicom_fixtures
    from robustmri.deploy.onnx.export import export_onnx
    from robustmri.networks import PaperCNN

    forms = ["MR Image Storage, one file per slice"]
    if enhanced and hasattr(dicom_fixtures, "write_enhanced_mr"):
        forms.append("Enhanced MR, one multi-frame file per series")
    report = {"image_size": image_size, "spatial_size": spatial_size, "python": sys.executable,
              "robustmri": os.path.dirname(os.path.dirname(os.path.abspath(dicom_fixtures.__file__))), "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        network = PaperCNN(spatial_size=spatial_size, padding=network_padding).eval()
        checkpoint, model = os.path.join(tmp, "model.pt"), os.path.join(tmp, "model.onnx")
        torch.save(network.state_dict(), checkpoint)
        export_onnx(network, model, CLASS_NAMES, spatial_size, checkpoint=checkpoint, preprocess="minmax")
        for form in forms:
            for name, n_series, per_series in [c for c in CASES if case in c[0]]:
                folder = os.path.join(tmp, "in")
                _write_case(folder, n_series, per_series, image_size, enhanced=form.startswith("Enhanced"))
                result = subprocess.run([sys.executable, os.path.abspath(__file__), "child", folder, model,
                                         os.path.join(tmp, "out")], capture_output=True, text=True, check=False)
                if result.returncode:
                    raise RuntimeError(f"{name} ({form}) failed:\n{result.stderr[-3000:]}")
                figures = json.loads(result.stdout.strip().splitlines()[-1])
                report["cases"].append({"case": name, "form": form, **figures})
                print(json.dumps(report["cases"][-1]), file=sys.stderr)
                for path in (folder, os.path.join(tmp, "out")):
                    shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(report, indent=2))
    if out:
        write_json(out, report)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(*sys.argv[2:5])
    else:
        fire.Fire(main)
