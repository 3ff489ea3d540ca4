"""Noise2Void-Training baseline: denoise every image with a blind-spot denoiser, then classify.

Stage 1 trains a Noise2Void denoiser (Krull, Buchholz, Jug 2019) on the noisy training
images alone: no clean image is ever used. In random patches about ``mask_percentage`` %
of the pixels (one per cell of a square grid, so they are spread out) are replaced by a
random other pixel of their ``neighbourhood`` x ``neighbourhood`` window, and the network
is asked to predict the original noisy value there. Because pixel noise is independent
and the masked pixel's own value is hidden, the best prediction is the clean signal.

Stage 2 (:func:`denoise_protocol`) runs the denoiser on the training, validation and test
images (whole image at once, clipped to [0, 1]); the classifier is then trained on them
exactly as the naive baseline. The bundle's ``n2v.json`` does both in one ``training`` run.

The maths (:func:`stratified_mask_coordinates`, :func:`blind_spot_mask`,
:func:`masked_mse`) is free of training code so that the tests can check it directly.
"""

from __future__ import annotations

import logging
import math
import os
import time

import numpy as np
import torch
from monai.networks.nets import UNet
from torch import nn
from tqdm.auto import tqdm

from robustmri.data.protocol import ProtocolData
from robustmri.methods import Method
from robustmri.options import as_flag
from robustmri.outputs import plt, save_figure, write_json

logger = logging.getLogger(__name__)

DENOISER_FILE = "n2v_denoiser.pt"
SUMMARY_FILE = "n2v_summary.json"
EXAMPLES_FILE = "n2v_examples.png"

METHOD = Method(name="n2v", title="N2V: Noise2Void denoiser on the noisy training images, then training (baseline)",
                order=2, families=("noisy images",), summary=SUMMARY_FILE,
                reference="Krull, Buchholz, Jug, CVPR 2019 (the paper's N2V-Training baseline)")


def make_denoiser() -> nn.Module:
    """MONAI UNet of depth 2 (32, 64 channels), one channel in and out.

    Batch norm, not MONAI's default instance norm: instance norm discards each patch's
    mean and contrast, so the network could not reproduce the intensities it denoises.
    """
    model = UNet(spatial_dims=2, in_channels=1, out_channels=1, channels=(32, 64), strides=(2,), norm="batch")
    output_layer = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)][-1]
    # PyTorch initialises a transposed convolution as if each output summed out_channels * k * k
    # inputs; here it sums in_channels * (k / stride)^2 (96 * 2.25), so the initial outputs were
    # ~2 (images lie in [0, 1]) and training spent its first hundreds of steps undoing that.
    in_channels, _, kernel_h, kernel_w = output_layer.weight.shape
    stride_h, stride_w = output_layer.stride
    fan_in_assumed = output_layer.weight.shape[1] * kernel_h * kernel_w
    fan_in_actual = in_channels * kernel_h * kernel_w / (stride_h * stride_w)
    with torch.no_grad():
        output_layer.weight.mul_(math.sqrt(fan_in_assumed / fan_in_actual))
    return model


def stratified_mask_coordinates(height: int, width: int, percentage: float,
                                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of about ``percentage`` % of the pixels, one per grid cell.

    The grid's spacing is sqrt(100 / percentage) (22.4 px for 0.2 %) and its origin is
    shifted at random; each cell gets one uniformly placed pixel and pixels that fall
    outside the image are dropped, so on average exactly ``percentage`` % of an image of
    any size is chosen, and never two pixels close together.
    """
    _check_percentage(percentage)
    spacing = math.sqrt(100.0 / percentage)

    def cell_edges(size: int) -> torch.Tensor:
        offset = torch.rand((), generator=generator).item() * spacing
        count = int(math.ceil((size + offset) / spacing)) + 1
        return torch.ceil(torch.arange(count + 1, dtype=torch.float64) * spacing - offset).long()

    row_edges, col_edges = cell_edges(height), cell_edges(width)
    row_start, row_size = row_edges[:-1], row_edges[1:] - row_edges[:-1]
    col_start, col_size = col_edges[:-1], col_edges[1:] - col_edges[:-1]
    shape = (len(row_start), len(col_start))
    rows = row_start[:, None] + (torch.rand(shape, generator=generator, dtype=torch.float64) * row_size[:, None]).long()
    cols = col_start[None, :] + (torch.rand(shape, generator=generator, dtype=torch.float64) * col_size[None, :]).long()
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    return rows[inside], cols[inside]


def _check_percentage(percentage: float) -> None:
    if not 0.0 < percentage <= 100.0:
        raise ValueError(f"mask percentage must lie in (0, 100], got {percentage}")


def blind_spot_mask(images: torch.Tensor, percentage: float = 0.2, neighbourhood: int = 11,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise2Void input and mask for a batch [B, 1, H, W].

    Returns (masked images, boolean mask): every masked pixel holds the value of a random
    other pixel of its ``neighbourhood`` window (inside the image, never itself). An image
    too small to draw any pixel at this percentage gets one random pixel, so that every
    training batch has a loss.
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images of shape [B, 1, H, W], got {tuple(images.shape)}")
    if neighbourhood < 3 or neighbourhood % 2 == 0:
        raise ValueError(f"neighbourhood must be an odd number >= 3, got {neighbourhood}")
    height, width = images.shape[-2:]
    radius = neighbourhood // 2
    steps = torch.arange(-radius, radius + 1)
    offset_rows, offset_cols = (t.reshape(-1) for t in torch.meshgrid(steps, steps, indexing="ij"))
    not_centre = (offset_rows != 0) | (offset_cols != 0)
    offset_rows, offset_cols = offset_rows[not_centre], offset_cols[not_centre]
    masked, mask = images.clone(), torch.zeros_like(images, dtype=torch.bool)
    for b in range(images.shape[0]):
        rows, cols = stratified_mask_coordinates(height, width, percentage, generator)
        if len(rows) == 0:
            rows = torch.randint(height, (1,), generator=generator)
            cols = torch.randint(width, (1,), generator=generator)
        source_rows, source_cols = rows[:, None] + offset_rows, cols[:, None] + offset_cols
        valid = (source_rows >= 0) & (source_rows < height) & (source_cols >= 0) & (source_cols < width)
        # Uniform choice among the valid neighbours: the largest random key wins.
        keys = torch.rand(valid.shape, generator=generator).masked_fill(~valid, -1.0)
        choice = keys.argmax(dim=1, keepdim=True)
        source_rows, source_cols = source_rows.gather(1, choice)[:, 0], source_cols.gather(1, choice)[:, 0]
        masked[b, 0, rows, cols] = images[b, 0, source_rows.to(images.device), source_cols.to(images.device)]
        mask[b, 0, rows, cols] = True
    return masked, mask


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels only (the Noise2Void loss)."""
    if not mask.any():
        raise ValueError("the mask selects no pixel")
    return (prediction - target)[mask].pow(2).mean()


def random_patches(images: torch.Tensor, count: int, patch_size: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` random crops (whole images if smaller), each randomly rotated by k * 90 degrees and flipped."""
    height, width = images.shape[-2:]
    size_h, size_w = min(patch_size, height), min(patch_size, width)
    which = torch.randint(len(images), (count,), generator=generator)
    tops = torch.randint(height - size_h + 1, (count,), generator=generator)
    lefts = torch.randint(width - size_w + 1, (count,), generator=generator)
    turns = torch.randint(4 if size_h == size_w else 1, (count,), generator=generator)
    flips = torch.randint(2, (count,), generator=generator)
    patches = []
    for i, t, l, k, f in zip(which.tolist(), tops.tolist(), lefts.tolist(), turns.tolist(), flips.tolist()):
        patch = torch.rot90(images[i, :, t:t + size_h, l:l + size_w], k, dims=(-2, -1))
        patches.append(torch.flip(patch, dims=(-1,)) if f else patch)
    return torch.stack(patches)


def train_denoiser(images: torch.Tensor, steps: int = 400, batch_size: int = 16, patch_size: int = 64,
                   mask_percentage: float = 0.2, neighbourhood: int = 11, learning_rate: float = 4e-4,
                   seed: int = 0, device: str | torch.device = "cpu",
                   progress: bool = True) -> tuple[nn.Module, dict]:
    """Train a Noise2Void denoiser on noisy images [N, 1, H, W] in [0, 1]; returns (eval-mode model, summary)."""
    if images.ndim != 4 or images.shape[1] != 1 or len(images) == 0:
        raise ValueError(f"expected a non-empty stack of images [N, 1, H, W], got {tuple(images.shape)}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("patch_size", patch_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if patch_size < 4:
        raise ValueError(f"patch_size must be at least 4 (the U-Net halves it once), got {patch_size}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    _check_percentage(mask_percentage)
    if neighbourhood < 3 or neighbourhood % 2 == 0:
        raise ValueError(f"neighbourhood must be an odd number >= 3, got {neighbourhood}")
    generator = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the caller's RNG
        torch.manual_seed(int(seed))
        model = make_denoiser().to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    images = images.float().cpu()
    losses = []
    start = time.perf_counter()
    model.train()
    bar = tqdm(range(int(steps)), desc="Noise2Void denoiser", unit="step", disable=not progress, leave=False)
    for _ in bar:
        patches = random_patches(images, int(batch_size), int(patch_size), generator)
        masked, mask = blind_spot_mask(patches, mask_percentage, neighbourhood, generator)
        patches, masked, mask = patches.to(device), masked.to(device), mask.to(device)
        optimiser.zero_grad(set_to_none=True)
        loss = masked_mse(model(_pad_even(masked)[0])[..., :patches.shape[-2], :patches.shape[-1]], patches, mask)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.2e}", refresh=False)
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    summary = {"steps": int(steps), "batch_size": int(batch_size), "patch_size": int(patch_size),
               "mask_percentage": float(mask_percentage), "neighbourhood": int(neighbourhood),
               "learning_rate": float(learning_rate), "seed": int(seed), "n_train_images": len(images),
               "first_masked_loss": losses[0], "final_masked_loss": losses[-1],
               "final_masked_loss_mean_last_10pct": float(np.mean(tail)),
               "train_s": time.perf_counter() - start}
    return model, summary


def _pad_even(images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad H and W to even sizes (the U-Net halves and doubles them once)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = height % 2, width % 2
    if pad_h or pad_w:
        images = nn.functional.pad(images, (0, pad_w, 0, pad_h), mode="replicate")
    return images, (height, width)


@torch.no_grad()
def denoise_images(model: nn.Module, images: torch.Tensor, batch_size: int = 16,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """Whole-image denoising of [N, 1, H, W] in eval mode, clipped to [0, 1]; returned on the CPU."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch, (height, width) = _pad_even(images[start:start + batch_size].float().to(device))
        outputs.append(model(batch)[..., :height, :width].clamp(0.0, 1.0).cpu())
    return torch.cat(outputs) if outputs else images.float().clone()


def denoise_protocol(data: ProtocolData, denoiser_path: str, output_dir: str, steps: int = 400,
                     batch_size: int = 16, patch_size: int = 64, mask_percentage: float = 0.2,
                     neighbourhood: int = 11, learning_rate: float = 4e-4, seed: int = 0,
                     device: str | torch.device = "cpu", reuse: bool = False,
                     n_examples: int = 4) -> ProtocolData:
    """Stage 1 and 2 of N2V-Training: train (or load) the denoiser, return the data denoised.

    Trains on ``data.train`` only and saves the model to ``denoiser_path`` with its
    settings and the training ids; with ``reuse`` the saved denoiser is loaded instead
    (e.g. to evaluate the classifier later on identically denoised test images). Writes
    ``n2v_summary.json`` and ``n2v_examples.png`` (noisy | denoised) into ``output_dir``.
    The returned items are copies; ``data`` is not changed.
    """
    if not isinstance(data, ProtocolData):
        raise TypeError(f"data must be a robustmri.data.protocol.ProtocolData, got {type(data).__name__}")
    if not data.train:
        raise ValueError("Noise2Void needs training images to learn from; the training split is empty")
    reuse = as_flag(reuse, "reuse")
    train_ids = [int(item["id"]) for item in data.train]
    train_images = _stack(data.train)
    if reuse:
        model, summary = _load_denoiser(denoiser_path, train_ids, device)
    else:
        model, summary = train_denoiser(train_images, steps, batch_size, patch_size, mask_percentage, neighbourhood,
                                        learning_rate, seed, device)
        os.makedirs(os.path.dirname(os.path.abspath(denoiser_path)), exist_ok=True)
        torch.save({"state_dict": model.state_dict(), "summary": summary, "train_ids": train_ids}, denoiser_path)
        logger.info("N2V denoiser: %d steps in %.1f s, final masked loss %.3e -> %s", summary["steps"],
                    summary["train_s"], summary["final_masked_loss"], denoiser_path)

    start = time.perf_counter()
    counts: dict[str, int] = {}

    def front_end(name: str, items: list[dict]) -> list[dict]:
        counts[name] = len(items)
        return _denoise_items(model, items, batch_size, device)

    denoised = data.with_front_end(front_end)
    summary = {**summary, "reused": bool(reuse), "denoiser_path": os.path.abspath(denoiser_path),
               "denoise_s": time.perf_counter() - start,
               "n_denoised": counts}
    write_json(os.path.join(output_dir, SUMMARY_FILE), summary)
    shown = min(n_examples, len(data.train))
    plot_denoising_examples(train_images[:shown, 0].numpy(), _stack(denoised.train[:shown])[:, 0].numpy(),
                            os.path.join(output_dir, EXAMPLES_FILE))
    return denoised


def _stack(items: list[dict]) -> torch.Tensor:
    return torch.as_tensor(np.stack([np.asarray(item["image"], dtype=np.float32) for item in items]))


def _denoise_items(model: nn.Module, items: list[dict], batch_size: int, device) -> list[dict]:
    if not items:
        return []
    images = denoise_images(model, _stack(items), batch_size, device).numpy()
    return [{**item, "image": image.astype(np.float32)} for item, image in zip(items, images)]


def plot_denoising_examples(noisy: np.ndarray, denoised: np.ndarray, path: str) -> None:
    """One row per image: noisy | denoised | difference, so residual structure is visible."""
    rows = len(noisy)
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.5 * rows), squeeze=False)
    for row, (before, after) in enumerate(zip(noisy, denoised)):
        difference = before - after
        limit = max(float(np.abs(difference).max()), 1e-6)
        panels = ((before, "noisy", "gray", 0, 1), (after, "denoised (N2V)", "gray", 0, 1),
                  (difference, "noisy - denoised", "coolwarm", -limit, limit))
        for ax, (image, title, cmap, low, high) in zip(axes[row], panels):
            ax.imshow(image, cmap=cmap, vmin=low, vmax=high)
            ax.set_title(title if row == 0 else "", fontsize=9)
            ax.axis("off")
    save_figure(fig, path)


def _load_denoiser(path: str, train_ids: list[int], device) -> tuple[nn.Module, dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"n2v_reuse_denoiser is set but there is no denoiser at {path}: "
                                "train one first (run without reuse)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if sorted(saved["train_ids"]) != sorted(train_ids):
        raise ValueError(f"the denoiser at {path} was trained on other training images than this run's "
                         "(different seed, split or data set): retrain it (run without reuse)")
    model = make_denoiser()
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval(), dict(saved["summary"])
