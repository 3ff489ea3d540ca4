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
