"""Speed of the influence step against its floor and against the reference procedure.

    python scripts/bench_influence.py --n 2300 --size 256 --out bench_influence.json

Measured in one run, on the paper's CNN (unpadded 5 x 5 kernels at 256 x 256):

- floor: one inference pass over the N training images (every sample's features must
  be computed once), and one training pass (forward, backward, Adam step);
- ours: the ISR step (features of train and validation, exact solve, all N scores)
  and the ISP step (the ISR step plus the input gradients of all N images);
- reference: what the authors' notebooks do: each sample's last-layer gradient by its
  own backward pass, LiSSA (damp 0.05, scale 50, batch 10, depth N / 10) with a full
  network forward per Hessian-vector product, then the N dot products.

The reference scores are compared (Pearson) with ours from the same LiSSA recursion on
cached features (same seed, so the same mini-batches: this checks the engine) and with
ours from the exact solve at the same effective damping, 2.5 (this shows how far the
stochastic LiSSA estimate is from the solve it approximates). ``hessian_max_eig`` is the
largest eigenvalue of the last-layer Hessian: LiSSA's recursion contracts only while it
stays below about (2 - damp) * scale.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time

import fire
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from robustmri.bench.machine import cpu_name
from robustmri.data.batching import item_batches
from robustmri.data.synthetic import generate_slices
from robustmri.influence import (
    ExactSolver,
    LissaSolver,
    SoftmaxLastLayer,
    collect_features,
    compute_influence,
    influence_scores,
    input_gradients,
)
from robustmri.networks import PaperCNN
from robustmri.outputs import write_json


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(device, fn):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def _reference_scores(model, images, labels, val_images, val_labels, device, damp=0.05, scale=50.0,
                      lissa_batch=10, seed=0):
    """The reference procedure, step by step as the authors ran it."""
    params = [model.classifier.weight, model.classifier.bias]
    loss_fn = nn.CrossEntropyLoss()
    model.eval()
    val_loss = loss_fn(model(val_images.to(device)), val_labels.to(device))
    v = [g.detach() for g in torch.autograd.grad(val_loss, params)]
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    h = [x.clone() for x in v]
    for _ in tqdm(range(math.ceil(n / lissa_batch)), desc="reference LiSSA", leave=False):
        idx = torch.randint(n, (lissa_batch,), generator=generator)
        loss = loss_fn(model(images[idx].to(device)), labels[idx].to(device))
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hvp = torch.autograd.grad(sum((g * x).sum() for g, x in zip(grads, h)), params)
        h = [vi + (1 - damp) * hi - hv / scale for vi, hi, hv in zip(v, h, hvp)]
    s = [x / scale for x in h]
    scores = torch.empty(n)
    for i in tqdm(range(n), desc="reference per-sample gradients", leave=False):
        loss = loss_fn(model(images[i:i + 1].to(device)), labels[i:i + 1].to(device))
        grads = torch.autograd.grad(loss, params)
        scores[i] = sum((g * x).sum() for g, x in zip(grads, s)).item() / n
    return scores


def main(n: int = 2300, n_val: int = 140, size: int = 256, padding: int = 0, batch_size: int = 64,
         reference: bool = True, device: str = "auto", threads: int | None = None, seed: int = 0,
         out: str = "bench_influence.json") -> dict:
    if threads:
        torch.set_num_threads(int(threads))
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          ("cpu" if device == "auto" else device))
    torch.manual_seed(seed)
    patients = max(8, (n + n_val) // 2)
    data = generate_slices(n_patients=patients, size=size, seed=seed)
    if len(data["labels"]) < n + n_val:
        raise ValueError(f"generated {len(data['labels'])} slices, fewer than n + n_val = {n + n_val}")
    images = torch.from_numpy(data["images"][:n + n_val, None]).float()
    labels = torch.from_numpy(data["labels"][:n + n_val]).long()
    train_x, train_y, val_x, val_y = images[:n], labels[:n], images[n:], labels[n:]
    train_items = [{"image": x, "label": y, "id": k} for k, (x, y) in enumerate(zip(train_x.numpy(), train_y.tolist()))]
    val_items = [{"image": x, "label": y, "id": k} for k, (x, y) in enumerate(zip(val_x.numpy(), val_y.tolist()))]
    model = PaperCNN(spatial_size=size, padding=padding).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def inference_pass():
        model.eval()
        with torch.no_grad():
            for batch in item_batches(train_items, batch_size):
                model(batch["image"].to(device))

    def training_pass():
        model.train()
        for batch in item_batches(train_items, batch_size):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(batch["image"].to(device)), batch["label"].to(device)).backward()
            optimiser.step()

    inference_pass()  # warm-up (allocator, kernels)
    figures: dict = {}
    figures["inference_pass_s"], _ = _timed(device, inference_pass)
    figures["training_pass_s"], _ = _timed(device, training_pass)
    model.eval()
    solver = ExactSolver(damping=2.5)
    figures["isr_step_s"], result = _timed(device, lambda: compute_influence(
        model, item_batches(train_items, batch_size), item_batches(val_items, batch_size), solver, device))

    def all_input_gradients():
        s = result.s.to(device)
        for batch in item_batches(train_items, batch_size):
            input_gradients(model, batch["image"].to(device), batch["label"].to(device), s)

    gradients_s, _ = _timed(device, all_input_gradients)
    figures["isp_step_s"] = figures["isr_step_s"] + gradients_s
    figures["isr_over_inference_pass"] = figures["isr_step_s"] / figures["inference_pass_s"]
    figures["isp_over_training_pass"] = figures["isp_step_s"] / figures["training_pass_s"]
    if reference:
        figures["reference_isr_s"], reference_scores = _timed(device, lambda: _reference_scores(
            model, train_x, train_y, val_x, val_y, device))
        figures["reference_over_ours_isr"] = figures["reference_isr_s"] / figures["isr_step_s"]
        figures["reference_over_inference_pass"] = figures["reference_isr_s"] / figures["inference_pass_s"]
        features, feature_labels, _ = collect_features(model, item_batches(train_items, batch_size), device)
        val_features, val_labels, _ = collect_features(model, item_batches(val_items, batch_size), device)
        problem = SoftmaxLastLayer.from_linear(model.classifier, features.double(), feature_labels)
        v = problem.mean_gradient(val_features.double(), val_labels)
        ours_lissa = influence_scores(problem, LissaSolver(damp=0.05, scale=50.0, batch_size=10, seed=0)(problem, v))
        figures["pearson_ours_lissa_vs_reference"] = _pearson(ours_lissa, reference_scores)
        figures["pearson_ours_exact_vs_reference"] = _pearson(result.scores, reference_scores)
        figures["hessian_max_eig"] = _largest_eigenvalue(problem)
    report = {
        "settings": {"n": n, "n_val": n_val, "size": size, "padding": padding, "batch_size": batch_size,
                     "feature_dim": model.feature_dim, "device": str(device), "threads": torch.get_num_threads()},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
        "figures": {k: round(v, 4) for k, v in figures.items()},
    }
    write_json(out, report)
    print(json.dumps(report, indent=2))


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.double().numpy(), b.double().numpy())[0, 1])


def _largest_eigenvalue(problem: SoftmaxLastLayer, iterations: int = 100) -> float:
    vector = torch.randn(problem.num_classes, problem.dim, dtype=problem.theta.dtype,
                         generator=torch.Generator().manual_seed(0))
    value = 0.0
    for _ in range(iterations):
        product = problem.hvp(vector)
        value = float((product * vector).sum() / (vector * vector).sum())
        vector = product / product.norm()
    return value


if __name__ == "__main__":
    fire.Fire(main)
