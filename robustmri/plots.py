"""Pictures people would rather look at than read: training curves, confusion matrices."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_training_curves(history: list[dict], path: str) -> None:
    """Training loss and every validation metric against the epoch."""
    epochs = [h["epoch"] for h in history]
    metric_keys = sorted({k for h in history for k in h if k.startswith("val_")})
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(9, 3.5))
    losses = [h.get("train_loss") for h in history]
    if any(v is not None for v in losses):
        ax_loss.plot(epochs, [np.nan if v is None else v for v in losses], marker="o", ms=3)
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    for key in metric_keys:
        ax_val.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", ms=3, label=key)
    ax_val.set(xlabel="epoch", title="validation (clean)")
    if metric_keys:
        ax_val.legend()
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(report: dict, path: str, title: str = "") -> None:
    names = report["confusion_matrix"]["rows_true_columns_predicted"]
    counts = np.asarray(report["confusion_matrix"]["counts"])
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.imshow(counts, cmap="Blues")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if counts[i, j] > counts.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true",
           title=f"{title}\naccuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_score_histogram(scores, labels, class_names, path: str) -> None:
    """Influence scores per class; negative = harmful, positive = helpful."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(scores.min(), scores.max(), 40) if scores.max() > scores.min() else 10
    for k, name in enumerate(class_names):
        if (labels == k).any():
            ax.hist(scores[labels == k], bins=bins, alpha=0.55, label=f"{name} (n={(labels == k).sum()})")
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set(xlabel="influence score (> 0 helpful, < 0 harmful)", ylabel="training samples",
           title="influence of training samples on the clean validation loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_influence_examples(images, deltas, scores, class_names, labels, path: str, per_side: int = 3) -> None:
    """The most harmful and most helpful training images; with ``deltas`` (ISP) each row
    shows noisy image | perturbation | perturbed image, as in the paper's figures."""
    scores = np.asarray(scores)
    order = np.argsort(scores)
    rows = list(dict.fromkeys(order[:per_side].tolist() + order[-per_side:].tolist()))
    columns = 1 if deltas is None else 3
    fig, axes = plt.subplots(columns, len(rows), figsize=(2.1 * len(rows), 2.3 * columns), squeeze=False)
    for j, r in enumerate(rows):
        name = class_names[int(labels[r])] if class_names else str(int(labels[r]))
        verdict = "harmful" if scores[r] < 0 else "helpful"
        axes[0, j].imshow(images[r], cmap="gray", vmin=0, vmax=1)
        axes[0, j].set_title(f"{verdict}: {name}\nscore {scores[r]:.2e}", fontsize=8)
        if deltas is not None:
            limit = float(np.abs(deltas[r]).max()) or 1.0
            axes[1, j].imshow(deltas[r], cmap="seismic", vmin=-limit, vmax=limit)
            axes[1, j].set_title(f"perturbation (max {limit:.3f})", fontsize=8)
            axes[2, j].imshow(np.clip(images[r] + deltas[r], 0, 1), cmap="gray", vmin=0, vmax=1)
            axes[2, j].set_title("perturbed", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
