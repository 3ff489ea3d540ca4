"""Denoise: the PSNR measure, NLM's gain and Rician bias correction on a phantom, the blur control, the front end
applied to every split and variant, the control's budget, and both bundle runs."""

import json
import math

import numpy as np
import pytest
from skimage.restoration import denoise_nl_means

from robustmri.data.noise import apply_noise
from robustmri.data.protocol import ProtocolData
from robustmri.methods import denoise
from robustmri.methods.denoise import (
    MATCH_SIGMA,
    blur,
    denoise_image,
    denoise_protocol,
    match_blur_width,
    nlm_denoise,
    psnr,
    psnr_gain,
)


def phantom(size: int = 64) -> np.ndarray:
    """A head-like slice in [0, 1]: a smooth ellipse with a darker ventricle and a bright lesion, zero background
    on a frame of 6 px (where sigma is estimated)."""
    rows, cols = np.mgrid[0:size, 0:size] / (size - 1) * 2.0 - 1.0
    head = (rows / 0.8) ** 2 + (cols / 0.7) ** 2 <= 1.0
    image = np.where(head, 0.55 + 0.2 * np.cos(2.0 * rows) * np.cos(1.5 * cols), 0.0)
    image = np.where((rows / 0.25) ** 2 + (cols / 0.12) ** 2 <= 1.0, 0.15, image)
    image = np.where((rows - 0.35) ** 2 + (cols + 0.3) ** 2 <= 0.15 ** 2, 0.95, image)
    return image.astype(np.float32)


def noisy_phantoms(noise: str, sigma: float, count: int = 4) -> tuple[np.ndarray, np.ndarray]:
    clean = np.stack([phantom()] * count)
    noisy = np.stack([apply_noise(image, noise, sigma, np.random.default_rng([7, k])) for k, image in enumerate(clean)])
    return clean, noisy


def test_psnr_and_its_gain_against_a_hand_computation():
    clean = np.zeros((2, 4, 4))
    noisy = np.stack([np.full((4, 4), 0.1), np.full((4, 4), 0.2)])
    denoised = np.stack([np.full((4, 4), 0.01), np.full((4, 4), 0.2)])
    # MSE 0.01 -> 20 dB, 1e-4 -> 40 dB; 0.04 -> 13.979 dB; the second image is not changed
    assert psnr(noisy, clean) == pytest.approx([20.0, 10 * math.log10(1 / 0.04)])
    assert psnr(denoised, clean) == pytest.approx([40.0, 10 * math.log10(1 / 0.04)])
    assert psnr_gain(clean, noisy, denoised) == pytest.approx((20.0 + 0.0) / 2)
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_gain(clean, noisy, denoised[:1])


@pytest.mark.parametrize("noise", ["gaussian", "rician"])
def test_nlm_raises_psnr_clearly_at_the_training_level(noise):
    # Measured on this phantom: gain +6.3 dB (Gaussian) and +8.6 dB (Rician) at 32/255; asserted: at least +4 dB.
    clean, noisy = noisy_phantoms(noise, MATCH_SIGMA)
    results = [denoise_image(image, noise, "nlm") for image in noisy]
    denoised = np.stack([image for image, _ in results])
    sigmas = np.array([sigma for _, sigma in results])
    assert sigmas == pytest.approx(MATCH_SIGMA, rel=0.1)  # each image's own estimate, from its border
    assert psnr_gain(clean, noisy, denoised) > 4.0
    assert denoised.dtype == np.float32 and denoised.min() >= 0 and denoised.max() <= 1


def test_rician_bias_correction_brings_a_flat_region_back_to_its_level():
    # A dim flat region (signal 0.15 = ~1.2 sigma at 32/255) where magnitude noise raises the mean most: measured,
    # the noisy mean is 0.212, plain NLM of the magnitude 0.212, the bias-corrected form 0.152; background (truth 0)
    # 0.159 and 0.025.
    truth, sigma = 0.15, MATCH_SIGMA
    clean = np.zeros((64, 64), dtype=np.float32)
    clean[12:52, 12:52] = truth
    noisy = apply_noise(clean, "rician", sigma, np.random.default_rng(3))
    plain = denoise_nl_means(noisy.astype(np.float64), denoise.PATCH_SIZE, denoise.PATCH_DISTANCE,
                             denoise.H_PER_SIGMA * sigma, fast_mode=True, sigma=sigma, preserve_range=True)
    corrected = nlm_denoise(noisy, sigma, "rician")
    region = (slice(20, 44), slice(20, 44))
    plain_error, corrected_error = abs(plain[region].mean() - truth), abs(corrected[region].mean() - truth)
    assert noisy[region].mean() > truth + 0.04  # the bias being corrected is there
    assert corrected_error < plain_error / 3, (plain_error, corrected_error)
    # the background (truth 0) too: Rayleigh's mean sigma * sqrt(pi / 2) ~ 0.157 is mostly removed
    assert corrected[:8].mean() < 0.5 * plain[:8].mean()


def test_rician_form_averages_the_squares_with_the_magnitude_weights():
    # the squares ride as a second channel (robustmri.methods.denoise.nlm_denoise): scikit-image must compute one set
    # of weights, from the distance averaged over channels, and apply it to each channel
    rng = np.random.default_rng(0)
    image = np.clip(phantom() + rng.normal(0, 0.1, (64, 64)), 0, 1).astype(np.float64)
    sigma, h, scale = 0.1, 0.08, 1e-4
    single = denoise_nl_means(image, 5, 6, h, fast_mode=True, sigma=sigma, preserve_range=True)
    both = denoise_nl_means(np.stack([image, scale * image], axis=-1), 5, 6, h / math.sqrt(2), fast_mode=True,
                            sigma=sigma / math.sqrt(2), preserve_range=True, channel_axis=-1)
    assert np.abs(both[..., 0] - single).max() < 1e-6  # the weights are the magnitude's own
    assert np.abs(both[..., 1] / scale - single).max() < 1e-6  # and the second channel is averaged with them


@pytest.mark.parametrize("noise", ["gaussian", "rician"])
def test_a_clean_image_is_left_as_it_is(noise):
    image = phantom()
    for filter in ("nlm", "blur"):
        out, sigma = denoise_image(image, noise, filter)
        assert sigma == 0.0 and out.dtype == np.float32
        assert np.array_equal(out, image)
    # nearly clean (0.5/255): changed by well under the noise step of the protocol
    faint = apply_noise(image, noise, 0.5 / 255, np.random.default_rng(0))
    out, _ = denoise_image(faint, noise, "nlm")
    assert np.abs(out - image).mean() < 1.0 / 255


@pytest.mark.parametrize("noise", ["gaussian", "rician"])
def test_the_blur_control_gains_and_its_search_finds_the_width_of_a_target_gain(noise):
    clean, noisy = noisy_phantoms(noise, MATCH_SIGMA)
    sigmas = np.full(len(noisy), MATCH_SIGMA)
    blurred = np.stack([blur(image, MATCH_SIGMA, noise) for image in noisy])  # the fixed, matched width
    gain = psnr_gain(clean, noisy, blurred)
    assert gain > 1.0 and blurred.dtype == np.float32 and 0 <= blurred.min() <= blurred.max() <= 1
    found = match_blur_width(clean, noisy, sigmas, noise, target_gain=gain - 0.5)
    assert found["matched"] and found["gain"] == pytest.approx(gain - 0.5, abs=0.02)
    assert found["width"] <= found["peak_width"] and found["peak_gain"] >= gain - 1e-6
    beyond = match_blur_width(clean, noisy, sigmas, noise, target_gain=found["peak_gain"] + 1.0)
    assert not beyond["matched"] and beyond["width"] == pytest.approx(found["peak_width"], abs=1e-3)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="denoise_filter"):
        denoise_image(phantom(), "gaussian", "bm3d")
    with pytest.raises(ValueError, match="noise must be one of"):
        denoise_image(phantom(), "none", "nlm")
    with pytest.raises(ValueError, match="sigma"):
        nlm_denoise(phantom(), -0.1, "gaussian")


def tiny_protocol() -> ProtocolData:
    """Noisy training, clean validation, half-noisy test, and the test split at shares 0 and 1 (the same
    realisations as the protocol gives every variant)."""
    clean = [phantom(32) * (0.5 + 0.05 * k) for k in range(10)]
    noisy = [apply_noise(image, "gaussian", MATCH_SIGMA, np.random.default_rng([0, k])) for k, image in
             enumerate(clean)]

    def item(k, is_noisy):
        return {"image": (noisy if is_noisy else clean)[k][None].copy(), "label": k % 3, "id": k, "noisy": is_noisy,
                "file": f"x/{k}", "group": k}

    return ProtocolData(train=[item(k, True) for k in range(6)], val=[item(k, False) for k in (6, 7)],
                        test=[item(8, True), item(9, False)], class_names=("a", "b", "c"), source="test",
                        test_at={0.0: [item(8, False), item(9, False)], 1.0: [item(8, True), item(9, True)]})


def test_both_filters_treat_the_same_splits_and_variants(tmp_path):
    data = tiny_protocol()
    before = {name: [item["image"].copy() for item in data.split(name)] for name in ("train", "val", "test")}
    outputs = {}
    for filter in ("nlm", "blur"):
        out = denoise_protocol(data, str(tmp_path / filter), "gaussian", filter)
        summary = json.loads((tmp_path / filter / "denoise_summary.json").read_text())
        assert summary["filter"] == filter and summary["noise"] == "gaussian"
        assert summary["n_items"] == {"train": 6, "val": 2, "test": 2, "test_at_0": 2, "test_at_1": 2}
        # 10 slices, 2 of the test ones both noisy and clean: 12 distinct images, each filtered once
        assert summary["n_filtered"] == 12 and summary["seconds_per_image"] > 0
        assert summary["mean_sigma_hat"]["val"] == 0.0
        assert summary["mean_sigma_hat"]["train"] == pytest.approx(MATCH_SIGMA, rel=0.15)
        outputs[filter] = out
        for name in ("train", "val", "test"):
            assert [i["id"] for i in out.split(name)] == [i["id"] for i in data.split(name)]
        assert sorted(out.test_at) == sorted(data.test_at)
        for share, items in out.test_at.items():
            assert [i["id"] for i in items] == [i["id"] for i in data.test_at[share]]
            assert [i["noisy"] for i in items] == [i["noisy"] for i in data.test_at[share]]
        every = [i["image"] for name in ("train", "val", "test") for i in out.split(name)] + [
            i["image"] for items in out.test_at.values() for i in items]
        assert all(image.dtype == np.float32 and image.shape == (1, 32, 32) for image in every)
        assert all(0 <= image.min() and image.max() <= 1 for image in every)
        # noisy images are filtered, clean ones kept; a variant's image is filtered as in the test split
        assert not np.array_equal(out.train[0]["image"], data.train[0]["image"])
        assert np.array_equal(out.val[0]["image"], data.val[0]["image"])
        assert np.array_equal(out.test_at[1.0][0]["image"], out.test[0]["image"])
        assert not np.array_equal(out.test_at[1.0][1]["image"], data.test_at[1.0][1]["image"])
    assert not np.array_equal(outputs["nlm"].train[0]["image"], outputs["blur"].train[0]["image"])
    for name, images in before.items():  # the input is not changed
        assert all(np.array_equal(item["image"], image) for item, image in zip(data.split(name), images))
    with pytest.raises(ValueError, match="noise must be one of"):
        denoise_protocol(data, str(tmp_path / "x"), "rician_reference")


@pytest.mark.slow  # importing the benchmark
def test_the_control_variant_is_the_method_with_only_its_filter_changed():
    from robustmri.bench.profiles import METHODS, branchable

    config, overrides = METHODS["denoise"]
    assert (config, overrides) == ("configs/denoise.json", {})
    assert METHODS["denoise_control"] == (config, {"denoise_filter": "blur"})  # same epochs, recipe and options
    assert not branchable("denoise") and not branchable("denoise_control")  # both train from scratch alike


@pytest.mark.slow
def test_denoise_and_its_control_run_end_to_end(tmp_path):
    from helpers import TINY, run_in_process

    histories = {}
    for filter in ("nlm", "blur"):
        dirs = ["--ckpt_dir", str(tmp_path / filter / "models"), "--output_dir", str(tmp_path / filter / "eval")]
        run_in_process("training", "configs/denoise.json", "--epochs", "2", "--denoise_filter", filter, *TINY, *dirs)
        assert (tmp_path / filter / "models" / "model.pt").is_file()
        summary = json.loads((tmp_path / filter / "eval" / "denoise_summary.json").read_text())
        assert summary["filter"] == filter and summary["n_items"]["test"] > 0
        assert summary["mean_sigma_hat"]["train"] > 0.5 * MATCH_SIGMA  # the embedded set's training images are noisy
        histories[filter] = json.loads((tmp_path / filter / "eval" / "history.json").read_text())
    assert len(histories["nlm"]) == len(histories["blur"]) == 2

    # evaluating with the evaluate overlay filters the test images the same way
    dirs = ["--ckpt_dir", str(tmp_path / "nlm" / "models"), "--output_dir", str(tmp_path / "nlm" / "eval")]
    run_in_process("evaluating", ["configs/denoise.json", "configs/evaluate.json"], *TINY, *dirs)
    metrics = json.loads((tmp_path / "nlm" / "eval" / "test" / "best" / "metrics.json").read_text())
    assert metrics["n"] == summary["n_items"]["test"]


def test_the_measurement_matches_the_blur_at_the_training_level_and_reports_every_level():
    from robustmri.methods.denoise import markdown, measure

    clean = np.stack([phantom(), phantom()[::-1]])
    result = measure(clean, sigmas=(16 / 255, 32 / 255), seed=1)
    rows = {(row["noise"], row["sigma_255"]): row for row in result["rows"]}
    assert set(rows) == {(noise, sigma) for noise in ("gaussian", "rician") for sigma in (16.0, 32.0, 0.0)}
    for noise in ("gaussian", "rician"):
        matched, at_match = result["matched_blur_width"][noise], rows[(noise, 32.0)]
        assert at_match["gain_nlm"] > 4.0 and at_match["blur_width"] == matched["width"]
        # either the blur gains what NLM gains, or no width does and the control is the blur's best
        if matched["matched"]:
            assert at_match["gain_blur"] == pytest.approx(at_match["gain_nlm"], abs=0.05)
        else:
            assert at_match["gain_blur"] == pytest.approx(matched["peak_gain"])
            assert matched["peak_gain"] < at_match["gain_nlm"]
        assert rows[(noise, 16.0)]["sigma_hat_mean_255"] == pytest.approx(16.0, rel=0.1)
        assert rows[(noise, 0.0)]["share_sigma_hat_zero"] == 1.0 and rows[(noise, 0.0)]["nlm_mean_abs_change_255"] == 0
    table = markdown(result)
    assert table.count("| gaussian |") == 3 and table.count("| rician |") == 3
