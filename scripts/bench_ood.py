"""Measure the out-of-distribution detector of an exported model on out-of-distribution sets built here.

    python scripts/bench_ood.py --checkpoint /runs/figshare64/models/model.pt \
        --dataset_dir /data/figshare-brain-tumor --out docs/benchmarks/ood
    python scripts/bench_ood.py --checkpoint model.pt --model model.onnx --dataset_dir DATA --out OUT

The model is the checkpoint exported with its detector (``robustmri.deploy.onnx.ood``: fitted on the
protocol's training split, threshold on its validation split, as ``scripts/export_onnx.py`` does);
``--model`` reuses an export, refused unless its ``checkpoint_sha256`` is the checkpoint's. Give the
protocol the model was trained on (``--dataset_dir``, ``--seed``, ``--noise``; the size and
preprocessing come from ``model_metadata.json`` beside the checkpoint).

In distribution: the protocol's test split (the detector never saw it), as evaluated (noisy
share as the protocol says) and, for data on disk, clean (each slice read again and prepared by
the model's preprocessing). Out of distribution, ``--n_per_set`` slices each (seeded), every one
prepared by the model's own preprocessing as deployment would (a slice it cannot prepare, e.g. no
head found, gets no class and is counted as ``unpreparable``):

- ``natural_images``: crops of scikit-image's bundled sample pictures (photographs, microscopy,
  astronomy, text), grey;
- ``uniform_noise``, ``gaussian_noise``; ``checkerboard`` (periods 4 to 64 px); ``single_pixel``
  (one bright pixel on black); ``disc`` (a bright disc, random size and place, on black);
- ``binary_masks``: segmentation-mask-like binary images: tumour masks and brain (intracranial)
  masks of the synthetic generator, and ellipses filling figshare's tumour boxes (``labels.csv``; the
  JPEG copy has no tumour masks, the original .mat release's ``tumorMask`` is not here);
- ``tumour_free_heads``: synthetic heads without a lesion (``generate_slices(tumour_free=True)``);
  ``synthetic_tumour_heads``: synthetic heads with tumours (another rendering of the same classes);
- ``t2_like``: the in-distribution test slices with intensities inverted inside the head.

Per set: AUROC of the OOD score against the in-distribution test split (1 = perfectly separated),
the share of slices not assessable, and the share of 8-slice series that abstain under the model's
abstention rule; the in-distribution rows give the acceptance. The AUROC of a softmax score
(1 - max probability) is reported beside it for comparison. Writes ``ood_bench.json``,
``ood_bench.md`` and ``ood_examples.png`` into ``--out``.
"""

from __future__ import annotations

import csv
import datetime
import logging
import os
import platform
import sys

import fire
import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

from robustmri.data.preprocessing import head_mask
from robustmri.data.readers import read_image
from robustmri.data.synthetic import generate_slices
from robustmri.deploy.onnx.export import bundle_version, export_onnx, file_sha256, split_arrays
from robustmri.deploy.onnx.export_checkpoint import monai_logs_to_stderr
from robustmri.deploy.onnx.runtime import OnnxClassifier
from robustmri.engine.checkpoint import load_weights
from robustmri.engine.trained_model import check_trained_network, trained_config
from robustmri.outputs import image_grid, write_json

BUNDLE = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bundle"))
RAW_SIZE = 256  # the side of the raw out-of-distribution slices (the model's preprocessing resizes them)
SERIES_LENGTH = 8
SKIMAGE_PICTURES = ("camera", "astronaut", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "horse",
                    "brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "retina", "clock",
                    "cell", "microaneurysms", "shepp_logan_phantom")

logger = logging.getLogger("bench_ood")


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 3:
        image = image[..., :3] @ np.array([0.299, 0.587, 0.114]) if image.shape[-1] >= 3 else image[..., 0]
    return image


def _resize(image: np.ndarray, size: int = RAW_SIZE) -> np.ndarray:
    from PIL import Image

    image = image.astype(np.float32)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.float32)


def natural_images(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    import skimage.data

    pictures = [_grey(getattr(skimage.data, name)()) for name in SKIMAGE_PICTURES]
    out = []
    for k in range(n):
        picture = pictures[k % len(pictures)]
        side = int(min(picture.shape) * rng.uniform(0.5, 1.0))
        top = int(rng.integers(0, picture.shape[0] - side + 1))
        left = int(rng.integers(0, picture.shape[1] - side + 1))
        out.append(_resize(picture[top:top + side, left:left + side]) / max(1.0, float(picture.max())) * 255)
    return out


def checkerboards(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    yy, xx = np.mgrid[:RAW_SIZE, :RAW_SIZE]
    out = []
    for _ in range(n):
        period = int(rng.integers(4, 65))
        dy, dx = rng.integers(0, period, 2)
        out.append(255.0 * (((yy + dy) // period + (xx + dx) // period) % 2))
    return out


def single_pixels(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        image = np.zeros((RAW_SIZE, RAW_SIZE), np.float32)
        image[tuple(rng.integers(0, RAW_SIZE, 2))] = 255.0
        out.append(image)
    return out


def discs(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    yy, xx = np.mgrid[:RAW_SIZE, :RAW_SIZE]
    out = []
    for _ in range(n):
        radius = rng.uniform(0.1, 0.45) * RAW_SIZE
        cy, cx = rng.uniform(radius, RAW_SIZE - radius, 2)
        out.append(rng.uniform(80, 255) * ((yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2).astype(np.float32))
    return out


def binary_masks(n: int, rng: np.random.Generator, dataset_dir: str | None) -> list[np.ndarray]:
    synthetic = generate_slices(n_patients=max(4, n // 2), size=RAW_SIZE, seed=1234, return_masks=True)
    masks = [m for m in synthetic["tumour_masks"] if m.any()][: n // 3]
    masks += list(synthetic["intracranial_masks"][: n // 3])
    boxes = []
    labels_csv = os.path.join(dataset_dir or "", "labels.csv")
    if os.path.isfile(labels_csv):
        with open(labels_csv) as handle:
            boxes = [(float(r["box_x_center"]), float(r["box_y_center"]), float(r["box_width"]), float(r["box_height"]))
                     for r in csv.DictReader(handle) if r.get("box_width")]
    yy, xx = (np.mgrid[:RAW_SIZE, :RAW_SIZE] + 0.5) / RAW_SIZE
    while len(masks) < n:
        if boxes:
            x, y, w, h = boxes[int(rng.integers(len(boxes)))]
        else:
            x, y, w, h = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3)
        masks.append(((xx - x) / (w / 2)) ** 2 + ((yy - y) / (h / 2)) ** 2 < 1)
    return [255.0 * np.asarray(m, np.float32) for m in masks[:n]]


def t2_like(raw_slices: list[np.ndarray]) -> list[np.ndarray]:
    """Intensities inverted inside the head (``lo + hi - v`` with the head's own range), background kept."""
    out = []
    for raw in raw_slices:
        image = np.asarray(raw, dtype=np.float32).copy()
        try:
            mask = head_mask(image)
        except ValueError:
            continue
        low, high = float(image[mask].min()), float(image[mask].max())
        image[mask] = low + high - image[mask]
        out.append(image)
    return out


def prepare_all(classifier: OnnxClassifier, raws: list[np.ndarray]) -> tuple[np.ndarray, int]:
    prepared, failed = [], 0
    for raw in raws:
        try:
            prepared.append(classifier.prepare(raw))
        except ValueError:
            failed += 1
    size = classifier.spatial_size
    return (np.stack(prepared) if prepared else np.zeros((0, 1, size, size), np.float32)), failed


def run_model(classifier: OnnxClassifier, images: np.ndarray, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    if not len(images):
        return np.zeros((0, len(classifier.class_names))), np.zeros(0)
    outputs = [classifier.predict_with_scores(images[i:i + batch]) for i in range(0, len(images), batch)]
    return np.concatenate([p for p, _ in outputs]), np.concatenate([s for _, s in outputs])


def series_abstained(assessable: np.ndarray, groups: list[np.ndarray], max_share: float) -> float | None:
    """Share of series (index arrays into ``assessable``) with more than ``max_share`` slices not assessable."""
    groups = [g for g in groups if len(g)]
    if not groups:
        return None
    return float(np.mean([(~assessable[g]).mean() > max_share for g in groups]))


def main(checkpoint: str, dataset_dir: str = "", out: str = "docs/benchmarks/ood", model: str = "",
         seed: int = 0, noise: str = "gaussian", synthetic_patients: int = 300, n_per_set: int = 200,
         bench_seed: int = 0, examples: int = 3) -> dict:
    """Build the sets, score them with the exported model, write the JSON, the table and the figure."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    monai_logs_to_stderr()
    config = trained_config(BUNDLE, checkpoint, dataset_dir=dataset_dir, noise=noise, seed=seed,
                           synthetic_patients=synthetic_patients)
    data = config.get_parsed_content("data")
    os.makedirs(out, exist_ok=True)
    if model:
        classifier = OnnxClassifier(model, device="cpu")
        if classifier.metadata["checkpoint_sha256"] != file_sha256(checkpoint):
            raise SystemExit(f"{model} was not exported from {checkpoint} (checkpoint_sha256 differs)")
    else:
        network = config.get_parsed_content("network_def")
        check_trained_network(network, checkpoint)
        network = load_weights(network, checkpoint).eval()
        model = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "model_ood_bench.onnx")
        export_onnx(network, model, config.get_parsed_content("class_names"),
                    int(config.get_parsed_content("spatial_size")), checkpoint=checkpoint,
                    model_version=bundle_version(BUNDLE), preprocess=config.get_parsed_content("preprocess"),
                    ood_train=split_arrays(data, "train"), ood_validation=split_arrays(data, "val")[0])
        classifier = OnnxClassifier(model, device="cpu")
    detector = classifier.require_detector()
    rng = np.random.default_rng(bench_seed)
    test = data.split("test")
    sets: dict[str, dict] = {}

    def add(name: str, kind: str, prepared: np.ndarray, unpreparable: int, groups=None, description: str = ""):
        probabilities, scores = run_model(classifier, prepared)
        sets[name] = {"kind": kind, "description": description, "prepared": prepared, "scores": scores,
                      "probabilities": probabilities, "unpreparable": unpreparable, "groups": groups}

    test_images, test_labels = split_arrays(data, "test")
    by_patient = {}
    for k, item in enumerate(test):
        by_patient.setdefault(item["group"], []).append(k)
    patient_groups = [np.array(v) for v in by_patient.values()]
    add("test (protocol)", "in", test_images, 0, patient_groups,
        f"the protocol's test split as evaluated ({sum(i['noisy'] for i in test)} of {len(test)} noisy)")
    on_disk = all(os.path.isfile(str(item.get("file", ""))) for item in test)
    raws = [read_image(item["file"]) for item in tqdm(test, desc="test slices", disable=not on_disk)] if on_disk \
        else [item["image"][0] for item in test]
    if on_disk:
        prepared, failed = prepare_all(classifier, raws)
        add("test (clean)", "in", prepared, failed, patient_groups if not failed else None,
            "the test split's slices read again, clean, prepared by the model's preprocessing")
    n = int(n_per_set)
    builders = {
        "natural_images": (lambda: natural_images(n, rng), "crops of scikit-image's sample pictures, grey"),
        "uniform_noise": (lambda: [rng.uniform(0, 255, (RAW_SIZE, RAW_SIZE)) for _ in range(n)], "U(0, 255) per pixel"),
        "gaussian_noise": (lambda: [np.clip(rng.normal(128, 40, (RAW_SIZE, RAW_SIZE)), 0, 255) for _ in range(n)],
                           "N(128, 40^2) per pixel, clipped"),
        "checkerboard": (lambda: checkerboards(n, rng), "black and white squares, period 4 to 64 px"),
        "single_pixel": (lambda: single_pixels(n, rng), "one bright pixel on black"),
        "disc": (lambda: discs(n, rng), "one bright disc on black, random radius and place"),
        "binary_masks": (lambda: binary_masks(n, rng, dataset_dir),
                         "binary tumour and brain masks, tumour-box ellipses"),
        "tumour_free_heads": (lambda: [255 * x for x in generate_slices(
            n_patients=n, size=RAW_SIZE, seed=4321, slices_per_patient=(1, 1), tumour_free=True)["images"]],
            "synthetic heads without a lesion"),
        "synthetic_tumour_heads": (lambda: [255 * x for x in generate_slices(
            n_patients=n, size=RAW_SIZE, seed=4322, slices_per_patient=(1, 1))["images"]],
            "synthetic heads with a tumour (another rendering)"),
        "t2_like": (lambda: t2_like(raws[:n]), "test slices inverted inside the head"),
    }
    for name, (build, description) in tqdm(builders.items(), desc="OOD sets"):
        raw = build()
        prepared, failed = prepare_all(classifier, raw)
        groups = [np.arange(i, min(i + SERIES_LENGTH, len(prepared))) for i in range(0, len(prepared), SERIES_LENGTH)]
        add(name, "out", prepared, failed, groups, description)

    threshold, max_share = detector["threshold"], detector["series_max_not_assessable"]
    reference = sets["test (protocol)"]
    rows = []
    for name, entry in sets.items():
        scores = entry["scores"]
        assessable = scores <= threshold
        n_all = len(scores) + entry["unpreparable"]
        row = {"set": name, "kind": entry["kind"], "description": entry["description"], "n": n_all,
               "unpreparable": entry["unpreparable"],
               "not_assessable_share": float((~assessable).mean()) if len(scores) else None,
               "no_class_share": float(((~assessable).sum() + entry["unpreparable"]) / n_all) if n_all else None,
               "series_abstained_share": series_abstained(assessable, entry["groups"] or [], max_share),
               "median_score": float(np.median(scores)) if len(scores) else None}
        if entry["kind"] == "out" and len(scores):
            labels = np.r_[np.zeros(len(reference["scores"])), np.ones(len(scores))]
            row["auroc"] = float(roc_auc_score(labels, np.r_[reference["scores"], scores]))
            softmax = 1 - np.r_[reference["probabilities"].max(1), entry["probabilities"].max(1)]
            row["auroc_softmax"] = float(roc_auc_score(labels, softmax))
        rows.append(row)
    report = {
        "command": "python scripts/bench_ood.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), {platform.platform()}",
        "checkpoint_sha256": classifier.metadata["checkpoint_sha256"], "data": data.source,
        "spatial_size": classifier.spatial_size, "preprocess": classifier.preprocess,
        "detector": detector, "validation_acceptance": float(classifier.metadata["ood_validation_acceptance"]),
        "n_validation": int(classifier.metadata["ood_n_validation"]), "series_length": SERIES_LENGTH,
        "rows": rows,
    }
    write_json(os.path.join(out, "ood_bench.json"), report)
    with open(os.path.join(out, "ood_bench.md"), "w") as handle:
        handle.write(markdown(report))
    figure(sets, threshold, os.path.join(out, "ood_examples.png"), examples, rng)
    print(markdown(report))
    return report


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def markdown(report: dict) -> str:
    detector = report["detector"]
    lines = [f"Detector: {detector['name']}, threshold {detector['threshold']:.4g} (accepts "
             f"{100 * report['validation_acceptance']:.1f} % of {report['n_validation']} validation slices, target "
             f"{100 * detector['target_acceptance']:.0f} %), fitted on {detector['n_train']} training slices; "
             f"abstention rule: abstain above {100 * detector['series_max_not_assessable']:.0f} % not assessable "
             f"(series: the test split's patients, {report['series_length']} consecutive slices for the other sets). "
             f"Data: {report['data']}; {report['spatial_size']} x {report['spatial_size']}, "
             f"`{report['preprocess']}` preprocessing.", "",
             "| set | n | AUROC (Mahalanobis) | AUROC (softmax, for comparison) | not assessable | no class (incl. "
             "unpreparable) | series abstained | median score |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["rows"]:
        auroc = "in distribution" if row["kind"] == "in" else f"{row['auroc']:.3f}" if "auroc" in row else "n/a"
        softmax = "" if row["kind"] == "in" else f"{row['auroc_softmax']:.3f}" if "auroc_softmax" in row else "n/a"
        unprep = f" ({row['unpreparable']} unpreparable)" if row["unpreparable"] else ""
        median = "n/a" if row["median_score"] is None else f"{row['median_score']:.3g}"
        lines.append(f"| {row['set']} | {row['n']} | {auroc} | {softmax} | {_pct(row['not_assessable_share'])} | "
                     f"{_pct(row['no_class_share'])}{unprep} | {_pct(row['series_abstained_share'])} | {median} |")
    return "\n".join(lines) + "\n"


def figure(sets: dict, threshold: float, path: str, per_set: int, rng: np.random.Generator) -> str:
    images, titles = [], []
    for name, entry in sets.items():
        count = min(per_set, len(entry["scores"]))
        picks = np.sort(rng.choice(len(entry["scores"]), count, replace=False)) if count else []
        for k in range(per_set):
            if k < count:
                score = float(entry["scores"][picks[k]])
                images.append(entry["prepared"][picks[k], 0])
                verdict = "assessable" if score <= threshold else "NOT assessable"
                titles.append(f"{name}\nscore {score:.3g}: {verdict}")
            else:
                images.append(np.zeros_like(next(iter(sets.values()))["prepared"][0, 0]))
                titles.append(f"{name}\n(nothing prepared)")
    return image_grid(images, titles, path, ncols=2 * per_set, vmin=0.0, vmax=1.0, title_fontsize=8,
                      suptitle=f"model inputs and their OOD scores\n(threshold {threshold:.3g}; higher = more out "
                               "of distribution)", panel_size=(2.4, 2.7))


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
