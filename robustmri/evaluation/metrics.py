"""Classification metrics of a test run, written as JSON and CSV."""

from __future__ import annotations

import csv
import os

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

from robustmri import INTENDED_USE
from robustmri.outputs import write_json


def balanced_accuracy(per_class: dict) -> float | None:
    """Mean recall over the classes present (support > 0) in a report's ``per_class``; ``None`` if none is."""
    recalls = [c["recall"] for c in per_class.values() if c.get("support", 0) > 0]
    return float(np.mean(recalls)) if recalls else None


def classification_report(labels, probabilities, class_names) -> dict:
    """Accuracy, balanced accuracy, per-class precision / recall / F1, macro-F1, confusion matrix and ROC-AUC.

    ``probabilities`` is [N, C]; ROC-AUC is one-vs-rest per class and macro-averaged,
    ``None`` for a class absent from ``labels`` (it is undefined there).
    """
    labels = np.asarray(labels, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape != (len(labels), len(class_names)):
        raise ValueError(f"probabilities must be [N, {len(class_names)}] with N = {len(labels)}, "
                         f"got {probabilities.shape}")
    if len(labels) == 0:
        raise ValueError("no samples to evaluate")
    classes = list(range(len(class_names)))
    predictions = probabilities.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=classes, zero_division=0)
    auc = []
    for k in classes:
        positives = labels == k
        auc.append(float(roc_auc_score(positives, probabilities[:, k])) if 0 < positives.sum() < len(labels) else None)
    defined_auc = [a for a in auc if a is not None]
    per_class = {name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                        "support": int(support[k]), "roc_auc": auc[k]}
                 for k, name in enumerate(class_names)}
    return {
        "n": int(len(labels)),
        "accuracy": float((predictions == labels).mean()),
        "balanced_accuracy": balanced_accuracy(per_class),
        "macro_f1": float(f1_score(labels, predictions, labels=classes, average="macro", zero_division=0)),
        "roc_auc_macro": float(np.mean(defined_auc)) if defined_auc else None,
        "per_class": per_class,
        "confusion_matrix": {"rows_true_columns_predicted": list(class_names),
                             "counts": confusion_matrix(labels, predictions, labels=classes).tolist()},
    }


def write_report(report: dict, output_dir: str, stem: str = "metrics") -> dict[str, str]:
    """Write ``<stem>.json`` (the report and ``intended_use``), ``<stem>_per_class.csv`` and ``<stem>_confusion.csv``;
    return their paths."""
    paths = {key: os.path.join(output_dir, f"{stem}{suffix}") for key, suffix in
             (("json", ".json"), ("per_class", "_per_class.csv"), ("confusion", "_confusion.csv"))}
    write_json(paths["json"], {**report, "intended_use": INTENDED_USE})
    with open(paths["per_class"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "precision", "recall", "f1", "support", "roc_auc"])
        for name, row in report["per_class"].items():
            writer.writerow([name, row["precision"], row["recall"], row["f1"], row["support"], row["roc_auc"]])
        writer.writerow(["overall_accuracy", report["accuracy"], "", "", report["n"], ""])
        writer.writerow(["macro_f1", "", "", report["macro_f1"], "", report["roc_auc_macro"]])
    with open(paths["confusion"], "w", newline="") as handle:
        writer = csv.writer(handle)
        names = report["confusion_matrix"]["rows_true_columns_predicted"]
        writer.writerow(["true \\ predicted", *names])
        for name, counts in zip(names, report["confusion_matrix"]["counts"]):
            writer.writerow([name, *counts])
    return paths
