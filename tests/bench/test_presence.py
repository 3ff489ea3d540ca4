"""The presence measurement: the box's path into the network's input by hand, the cells' targets by hand, a detector
that learns a planted lesion, and the measurement end to end on a boxed synthetic folder."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

from robustmri.bench.presence import (
    PresenceNet,
    box_in_input,
    cell_auroc,
    cell_fractions,
    cell_scores,
    cell_targets,
    far_from_box,
    markdown,
    measure_presence,
    read_boxes,
    slice_scores,
    train_presence,
)
from robustmri.bench.tumour_free import ImageSet
from robustmri.data.preprocessing import head_window, preprocess_head
from robustmri.data.synthetic import generate_slices


def test_box_in_input_identity_window_by_hand():
    # an 8 x 8 slice, the window the whole slice, input 8 px: pixel centres 0.5 .. 7.5; the box spans 2 .. 6
    mask = box_in_input((0.5, 0.5, 0.5, 0.5), (8, 8), (0, 0, 8), 8)
    expected = np.zeros((8, 8), bool)
    expected[2:6, 2:6] = True
    np.testing.assert_array_equal(mask, expected)


def test_box_in_input_follows_a_crop_and_a_resize_by_hand():
    # a 100 x 200 slice; window top 10, left 50, side 40, input 4 px: centres at 10 + 5, 15, 25, 35 rows and
    # 50 + 5, 15, 25, 35 columns; the box rows 0.2..0.4 x 100 = 20..40, columns 0.3..0.35 x 200 = 60..70
    mask = box_in_input((0.325, 0.3, 0.05, 0.2), (100, 200), (10, 50, 40), 4)
    expected = np.zeros((4, 4), bool)
    expected[1:3, 1] = True  # rows 25 and 35, column 65
    np.testing.assert_array_equal(mask, expected)


def test_box_in_input_marks_the_bright_lesion_of_a_preprocessed_slice():
    rows, cols = np.mgrid[0:120, 0:160]
    image = np.where((rows - 60) ** 2 / 50 ** 2 + (cols - 90) ** 2 / 55 ** 2 < 1, 100.0, 0.0)
    image += np.random.default_rng(0).normal(0, 2, image.shape)
    image[40:60, 100:124] = 250.0  # the lesion: rows 40..60, columns 100..124
    box = ((100 + 124) / 2 / 160, (40 + 60) / 2 / 120, 24 / 160, 20 / 120)
    prepared = preprocess_head(image, 32)
    mask = box_in_input(box, image.shape, head_window(image), 32)
    assert mask.sum() > 4
    assert prepared[mask].mean() > 0.9 and prepared[~mask].mean() < 0.5
    bright = prepared > 0.95
    assert (bright & ~mask).sum() <= 0.2 * bright.sum()  # the lesion lies where the box was mapped


def test_cell_fractions_and_targets_by_hand():
    mask = np.zeros((1, 4, 4))
    mask[0, 0, 0:2] = 1  # half of cell (0, 0)
    mask[0, 3, 3] = 1  # a quarter of cell (1, 1)
    fractions = cell_fractions(mask, 2)
    np.testing.assert_allclose(fractions[0], [[0.5, 0.0], [0.0, 0.25]])
    target, weight = cell_targets(fractions)
    np.testing.assert_array_equal(target[0], [[1, 0], [0, 0]])
    np.testing.assert_array_equal(weight[0], [[1, 1], [1, 0]])  # the quarter-covered cell is left out
    with pytest.raises(ValueError, match="multiple of grid"):
        cell_fractions(np.zeros((1, 5, 5)), 2)


def test_far_from_box_leaves_a_one_cell_margin():
    fractions = np.zeros((1, 5, 5))
    fractions[0, 0, 0] = 0.1
    far = far_from_box(fractions)[0]
    assert not far[:2, :2].any() and far[2:, :].all() and far[:, 2:].all()


def test_presence_net_shape_and_size_rules():
    import torch

    assert PresenceNet(32, 4)(torch.zeros(2, 1, 32, 32)).shape == (2, 4, 4)
    for size, grid in ((48, 4), (32, 32), (32, 5)):
        with pytest.raises(ValueError, match="power of two"):
            PresenceNet(size, grid)


def test_cell_auroc_by_hand():
    cells = np.array([[[0.9, 0.1], [0.4, 0.7]]])
    target = np.array([[[1, 0], [0, 1]]], float)
    assert cell_auroc(cells, target, np.ones_like(target)) == 1.0
    weight = np.array([[[1, 1], [1, 0]]], float)  # without the 0.7 cell: 0.9 against 0.1 and 0.4
    assert cell_auroc(cells, target, weight) == 1.0
    assert cell_auroc(cells, np.zeros_like(target), weight) is None
    assert cell_auroc(np.array([[[0.2, 0.8]]]), np.array([[[1, 0]]], float), np.ones((1, 1, 2))) == 0.0


def _planted(n, size, seed):
    """Noise slices, each with one bright 4 x 4 square at a random place (its mask) or, for every fourth, none."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.5, (n, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        if i % 4 == 3:
            continue
        r, c = rng.integers(0, size - 4, 2)
        images[i, r:r + 4, c:c + 4] = 1.0
        masks[i, r:r + 4, c:c + 4] = True
    return images, masks


def test_train_presence_learns_a_planted_lesion():
    images, masks = _planted(240, 16, 0)
    target, weight = cell_targets(cell_fractions(masks, 4))
    network = train_presence(images, target, weight, grid=4, epochs=6, seed=0)
    held_images, held_masks = _planted(80, 16, 1)
    held_target, held_weight = cell_targets(cell_fractions(held_masks, 4))
    cells = cell_scores(network, held_images)
    assert cells.shape == (80, 4, 4)
    assert cell_auroc(cells, held_target, held_weight) > 0.9
    scores = slice_scores(cells)
    lesion = np.arange(80) % 4 != 3
    assert np.median(scores[lesion]) > np.max(scores[~lesion])  # slices without the square score lower


def test_read_boxes_names_what_is_missing(tmp_path):
    (tmp_path / "labels.csv").write_text("file,label_name\na.png,glioma\n")
    with pytest.raises(ValueError, match="no column box_x_center"):
        read_boxes(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label_name,box_x_center,box_y_center,box_width,box_height\n"
                                         "a.png,glioma,0.5,0.5,0.2,0.2\nb.png,glioma,0.95,0.5,0.2,0.2\n")
    with pytest.raises(ValueError, match="line 3: the box .* does not lie inside"):
        read_boxes(tmp_path)
    with pytest.raises(ValueError, match="not found"):
        read_boxes(tmp_path / "nowhere")


def _boxed_folder(root, n_patients=60, size=64):
    """The synthetic generator's slices written as PNGs with labels.csv giving each tumour's box."""
    data = generate_slices(n_patients=n_patients, size=size, seed=3, return_masks=True)
    names = ("meningioma", "glioma", "pituitary")
    rows = []
    for i, (image, label, group, tumour) in enumerate(zip(data["images"], data["labels"], data["groups"],
                                                          data["tumour_masks"])):
        ys, xs = np.nonzero(tumour)
        if not len(ys):
            continue
        name = names[int(label)]
        os.makedirs(root / name, exist_ok=True)
        Image.fromarray((255 * image).astype(np.uint8)).save(root / name / f"{i}.png")
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        rows.append([f"{name}/{i}.png", name, (x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size,
                     (y1 - y0) / size, int(group)])
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label_name", "box_x_center", "box_y_center", "box_width", "box_height", "group"])
        writer.writerows(rows)
    return len(rows)


def test_measure_presence_end_to_end_on_a_boxed_synthetic_folder(tmp_path):
    n = _boxed_folder(tmp_path)
    free = generate_slices(n_patients=20, size=64, seed=9, slices_per_patient=(1, 1), tumour_free=True)["images"]
    flat = ImageSet("flat", [np.zeros((64, 64), np.float32)], "a constant slice: no head", "test")
    report = measure_presence(tmp_path, size=32, grid=4, epochs=2, seeds=(0,), tumour_free=[
        ImageSet("heads", list(255 * free), "synthetic tumour-free heads", "test"), flat])
    assert report["n_slices"] + report["skipped"] == n
    row = report["rows"][0]
    assert row["n_train"] + row["n_val"] + row["n_test"] == report["n_slices"]
    assert row["sets"]["heads"]["n"] == 20 and 0.0 <= row["sets"]["heads"]["called_present"] <= 1.0
    assert row["sets"]["flat"] == {"n": 0, "called_present": None}  # no head: no class anywhere, not counted
    assert 0.0 < row["test_tumour_slices_called_present"] <= 1.0
    table = markdown(report)
    assert "heads called tumour-bearing" in table and "| 0 |" in table


def test_bench_presence_command_writes_its_record(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT

    _boxed_folder(tmp_path / "data", n_patients=40)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_presence.py"), "--dataset_dir",
                             str(tmp_path / "data"), "--out", str(out), "--size", "32", "--epochs", "1", "--seeds",
                             "0,1", "--n_synthetic", "3", "--public", "false"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "presence.json").read_text())
    assert [row["seed"] for row in report["rows"]] == [0, 1] and report["dataset_dir"] == "DATA"
    assert "commit" in report["code"] and "| mean |" in (out / "presence.md").read_text()
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_presence.py"), "--dataset_dir",
                              str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert missing.returncode != 0 and "not found" in missing.stderr.strip().splitlines()[-1]
