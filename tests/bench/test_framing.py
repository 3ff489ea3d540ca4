"""The framing measurement (robustmri.bench.framing): each variant against a hand computation, and the sets."""

import numpy as np
import pytest
import torch
from PIL import Image

from robustmri import CLASS_NAMES
from robustmri.bench.framing import (
    MOVES,
    SKULL_CUT,
    ZOOMS,
    MAX_HEAD_BORDER_SHARE,
    accuracy_by_variant,
    border_share,
    border_shares,
    centred_zoom,
    direction,
    framing_variants,
    guard_by_shift,
    moved,
    variant_names,
)
from robustmri.data.preprocessing import head_mask, preprocess_head, resize
from robustmri.data.readers import read_image
from robustmri.data.shift_families import family_shifts, render_family_shift
from robustmri.data.synthetic import generate_slices


def test_centred_zoom_is_the_central_window_resized():
    image = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    np.testing.assert_array_equal(centred_zoom(image, 1.0), resize(image, 8))
    np.testing.assert_array_equal(centred_zoom(image, 2.0), resize(image[2:6, 2:6], 8))
    with pytest.raises(ValueError, match="zoom"):
        centred_zoom(image, 0.5)


def test_moved_shifts_by_the_share_in_the_drawn_direction():
    image = np.zeros((20, 20), np.float32)
    image[10, 10] = 1.0
    angle = direction(7)
    assert angle == np.random.default_rng([7, 1]).uniform(0, 2 * np.pi)
    out = moved(image, 0.2, angle)  # 4 px along the angle, rounded per axis
    rows, cols = int(round(4 * np.sin(angle))), int(round(4 * np.cos(angle)))
    assert out[10 + rows, 10 + cols] == 1.0 and out.sum() == 1.0
    assert not moved(image, 1.0, angle).any()  # at least 14 px along one axis: out of the frame


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    root = tmp_path_factory.mktemp("framing")
    synthetic = generate_slices(n_patients=4, size=48, seed=2)
    out = []
    for k, (image, label) in enumerate(zip(synthetic["images"][:5], synthetic["labels"][:5])):
        path = root / f"s{k}.png"
        Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(path)
        out.append({"file": str(path), "label": int(label), "id": 100 + k})
    blank = root / "blank.png"
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(blank)
    return out + [{"file": str(blank), "label": 0, "id": 999}]


def test_variants_are_the_prepared_slice_zoomed_moved_and_the_benchs_cut(items):
    sets, skipped = framing_variants(items, 24, "head", progress=False)
    assert list(sets) == variant_names() == [f"zoom {z:g}" for z in ZOOMS] + [f"move {m:g}" for m in MOVES] + [SKULL_CUT]
    assert [s[0] for s in skipped] == [999] and "constant" in skipped[0][1]  # the blank slice, in no variant
    assert all(len(v) == 5 for v in sets.values())
    raw = read_image(items[1]["file"])
    prepared = preprocess_head(raw, 24)
    np.testing.assert_allclose(sets["zoom 1"][1]["image"][0], resize(prepared, 24), atol=1e-6)
    np.testing.assert_allclose(sets["zoom 1.5"][1]["image"][0], centred_zoom(prepared, 1.5), atol=1e-6)
    np.testing.assert_allclose(sets["move 0.1"][1]["image"][0], moved(prepared, 0.1, direction(101)),
                               atol=1e-6)
    cut = render_family_shift(raw, SKULL_CUT, 24, [101, family_shifts(24)[SKULL_CUT].stream], "head")
    np.testing.assert_allclose(sets[SKULL_CUT][1]["image"][0], preprocess_head(cut, 24), atol=1e-6)
    assert all(not item["noisy"] and item["image"].shape == (1, 24, 24) for item in sets["move 0.2"])


def test_accuracy_recall_and_predicted_shares(items):
    sets, _ = framing_variants(items[:3], 24, "head", progress=False)

    class Constant(torch.nn.Module):  # always the second class
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.tensor([[0.0, 1.0, 0.0]]).repeat(len(x), 1) + 0 * self.weight

    result = accuracy_by_variant(Constant(), sets, CLASS_NAMES)
    labels = np.array([item["label"] for item in items[:3]])
    for row in result.values():
        assert row["n"] == 3 and row["accuracy"] == pytest.approx((labels == 1).mean())
        assert row["predicted_share"] == {CLASS_NAMES[0]: 0.0, CLASS_NAMES[1]: 1.0, CLASS_NAMES[2]: 0.0}


def test_border_share_is_the_share_of_the_outer_ring_by_hand():
    mask = np.zeros((10, 12), dtype=bool)
    assert border_share(mask) == 0.0
    mask[0, :] = True  # the top row: 12 of the ring's 2 * 12 + 2 * 8 = 40 pixels
    assert border_share(mask) == pytest.approx(12 / 40)
    mask[5, 0] = True  # one more on the left edge
    assert border_share(mask) == pytest.approx(13 / 40)
    assert border_share(np.ones((3, 3), dtype=bool)) == 1.0
    with pytest.raises(ValueError, match="2-D mask"):
        border_share(np.ones(5, dtype=bool))


def test_the_framing_check_is_measured_per_shift_with_the_refused_slices_classified_by_hand(items):
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.tensor([[0.0, 1.0, 0.0]]).repeat(len(x), 1) + 0 * x.mean()

    result = guard_by_shift(Constant(), items, 24, "head", ["none", SKULL_CUT], workers=1, progress=False)
    assert set(result) == {"none", SKULL_CUT}
    labels = np.array([item["label"] for item in items[:5]])
    for shift, row in result.items():
        assert row["n"] == 5 and row["unpreparable"] == 1  # the blank slice has no head
        assert row["accuracy"] == pytest.approx((labels == 1).mean())
    # by hand: the border share of each rendering, against the limit
    shares = [border_share(head_mask(render_family_shift(read_image(item["file"]), SKULL_CUT, 24,
                                                         [item["id"], family_shifts(24)[SKULL_CUT].stream], "head")))
              for item in items[:5]]
    refused = np.asarray(shares) > MAX_HEAD_BORDER_SHARE
    assert result[SKULL_CUT]["refused"] == pytest.approx(refused.mean()) and result["none"]["refused"] == 0.0
    assert refused.any()  # these cut heads run along the border
    assert result[SKULL_CUT]["refused_accuracy"] == pytest.approx((labels[refused] == 1).mean())
    summary = border_shares(items, workers=1, progress=False)
    by_hand = [border_share(head_mask(read_image(item["file"]))) for item in items[:5]]
    assert summary["n"] == 5 and summary["no_head"] == 1 and summary["max"] == pytest.approx(max(by_hand))
    assert summary["above_limit"] == sum(share > MAX_HEAD_BORDER_SHARE for share in by_hand)


@pytest.mark.slow  # trains nothing, but rebuilds a checkpoint's protocol and runs the script twice
def test_script_writes_the_table_figure_and_pairs_by_position(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import ROOT
    from deploy_helpers import write_trained
    from robustmri.networks import PaperCNN

    torch.manual_seed(0)
    checkpoint = write_trained(tmp_path / "models", PaperCNN(spatial_size=32, padding=2).eval(), 32, preprocess="head")
    command = [sys.executable, str(ROOT / "scripts" / "bench_framing.py"), "--checkpoints", str(checkpoint),
               "--baseline", str(checkpoint), "--names", "a,b", "--out", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "framing.json").read_text())
    runs = report["configurations"]["a"]
    assert list(report["configurations"]) == ["a", "b"] and list(runs[0]["variants"]) == variant_names()
    assert runs[0]["variants"]["zoom 1"]["n"] > 0 and report["command"].startswith("python scripts/bench_framing.py")
    table = (tmp_path / "out" / "framing.md").read_text()
    assert "| variant | a: accuracy % | b: accuracy % | a − b, points |" in table
    assert table.count(" 0/1 |") == len(variant_names())  # the same checkpoint twice: no difference anywhere
    assert (tmp_path / "out" / "framing.png").stat().st_size > 10_000
    unpaired = subprocess.run(command[:4] + ["--baseline", f"{checkpoint},{checkpoint}", "--out", str(tmp_path / "x")],
                              capture_output=True, text=True, timeout=120)
    assert unpaired.returncode != 0 and "as many checkpoints" in unpaired.stderr
