import json

import numpy as np
import pytest

from robustmri import INTENDED_USE
from robustmri.evaluation.metrics import classification_report, write_report

NAMES = ("meningioma", "glioma", "pituitary")


def test_report_against_hand_counts(tmp_path):
    labels = np.array([0, 0, 1, 1, 1, 2])
    probs = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.1, .6, .3], [.5, .3, .2], [.1, .1, .8]])
    report = classification_report(labels, probs, NAMES)
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["confusion_matrix"]["counts"] == [[1, 1, 0], [1, 2, 0], [0, 0, 1]]
    assert report["per_class"]["glioma"]["precision"] == pytest.approx(2 / 3)
    assert report["per_class"]["glioma"]["recall"] == pytest.approx(2 / 3)
    assert report["per_class"]["pituitary"]["roc_auc"] == pytest.approx(1.0)
    f1 = [0.5, 2 / 3, 1.0]
    assert report["macro_f1"] == pytest.approx(np.mean(f1))
    assert report["balanced_accuracy"] == pytest.approx(np.mean([1 / 2, 2 / 3, 1]))  # recalls by hand
    paths = write_report(report, str(tmp_path))
    written = json.load(open(paths["json"]))
    assert written["accuracy"] == pytest.approx(4 / 6) and written["intended_use"] == INTENDED_USE
    assert "intended_use" not in report  # the file states it; the report in memory stays the metrics
    assert open(paths["confusion"]).read().splitlines()[1] == "meningioma,1,1,0"


def test_absent_class_has_no_auc_and_bad_shapes_fail():
    report = classification_report([0, 1], [[.9, .1, 0], [.2, .8, 0]], NAMES)
    assert report["per_class"]["pituitary"]["roc_auc"] is None and report["roc_auc_macro"] == 1.0
    assert report["balanced_accuracy"] == 1.0  # the absent class does not count as a recall of 0
    with pytest.raises(ValueError, match="probabilities must be"):
        classification_report([0, 1], [[1, 0, 0]], NAMES)
