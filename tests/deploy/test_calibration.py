"""Site calibration from unlabelled images: BatchNorm statistics and the abstention state, nothing else."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, EnsureTyped
from torch import nn

from robustmri import CLASS_NAMES
from robustmri.abstention import abstention_path, load_state, save_state
from robustmri.abstention.mahalanobis import MahalanobisDetector, calibrate_threshold, extract_features
from robustmri.data.synthetic import generate_slices
from robustmri.data.transforms import LoadPreprocessd
from robustmri.deploy.calibration import (
    CROSS_FIT_FOLDS,
    INPUT_DIGEST_RULE,
    SITE_IMAGES,
    adapt_batchnorm,
    batchnorm_layers,
    calibrate_network,
    calibrate_site,
    fit_site_abstention,
    fold_assignment,
    inputs_digest,
)
from robustmri.deploy.inference import file_items
from robustmri.deploy.onnx.export import checkpoint_provenance
from robustmri.engine.model_metadata import (
    METADATA_FILE,
    TRAINING_DATA_FILE,
    file_sha256,
    model_metadata,
    read_calibration,
    trained_setting,
    training_provenance,
)
from robustmri.networks import PaperCNN
from robustmri.outputs import write_json

from deploy_helpers import TINY_SIZE, tiny_network
from helpers import run_in_process, write_png

RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def shifted_images(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 1, S, S] synthetic slices with a site's contrast: darker and gamma-shifted (so BatchNorm has work)."""
    images = generate_slices(n_patients=n, size=TINY_SIZE, seed=seed, slices_per_patient=(1, 1))["images"]
    return torch.from_numpy(0.8 * images ** 1.5)[:, None].float()


def first_bn_input(network: PaperCNN, images: torch.Tensor) -> torch.Tensor:
    """The first BatchNorm's input written out: the first convolution by ``F.conv2d``."""
    conv = network.encoder[0]
    return F.conv2d(images.double(), conv.weight.double(), conv.bias.double(), padding=conv.padding)


def test_batchnorm_statistics_are_those_of_the_site_images_and_nothing_else_changes():
    network = tiny_network()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    images = shifted_images(24)
    batches = adapt_batchnorm(network, images, batch_size=len(images))  # one batch: the plain statistics
    assert batches == 1 and not network.training
    after = network.state_dict()
    for key, value in before.items():
        if key.endswith(RUNNING[:2]):
            assert not torch.allclose(after[key], value), f"{key} was not recomputed"
        elif key.endswith("num_batches_tracked"):
            assert int(after[key]) == 1
        else:
            assert torch.equal(after[key], value), f"{key} changed"
    inputs = first_bn_input(network, images)
    bn = network.encoder[1]
    torch.testing.assert_close(bn.running_mean.double(), inputs.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), inputs.var(dim=(0, 2, 3), unbiased=True), rtol=1e-4,
                               atol=1e-6)
    assert all(layer.momentum == 0.1 for layer in batchnorm_layers(network))  # put back


@pytest.mark.parametrize("n, expected", [(20, [(0, 8), (8, 16), (16, 20)]), (17, [(0, 8), (8, 17)])])
def test_batchnorm_statistics_are_the_cumulative_average_over_batches(n, expected):
    network = tiny_network()
    images = shifted_images(n)
    assert adapt_batchnorm(network, images, batch_size=8) == len(expected)
    inputs = [first_bn_input(network, images[a:b]) for a, b in expected]  # a last batch of one joins the previous
    bn = network.encoder[1]
    assert int(bn.num_batches_tracked) == len(expected)
    torch.testing.assert_close(bn.running_mean.double(), torch.stack([x.mean(dim=(0, 2, 3)) for x in inputs]).mean(0),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), torch.stack([x.var(dim=(0, 2, 3)) for x in inputs]).mean(0),
                               rtol=1e-4, atol=1e-6)


def test_only_batchnorm_runs_in_train_mode_and_a_network_without_it_is_untouched():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4), nn.Flatten(),
                            nn.Linear(4 * 30 * 30, 3))
    images = shifted_images(16)
    adapt_batchnorm(network, images, 16)
    first = network[2].running_mean.clone()
    adapt_batchnorm(network, images, 16)  # dropout in train mode would draw another mask
    assert torch.equal(network[2].running_mean, first)
    torch.testing.assert_close(first.double(), F.conv2d(images.double(), network[0].weight.double(),
                                                        network[0].bias.double()).mean(dim=(0, 2, 3)))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(TINY_SIZE * TINY_SIZE, 3))
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    assert adapt_batchnorm(plain, images) == 0
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())


def gaussian_site(n: int, d: int, seed: int):
    """Features of a site: three classes (shares 0.5, 0.35, 0.15) around distinct means, a common correlated noise."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(d, d))
    labels = rng.choice(3, size=n, p=[0.5, 0.35, 0.15])
    return rng.normal(size=(n, d)) @ mixing + 4.0 * np.eye(3, d)[labels] @ mixing, labels


def test_the_cross_fitted_threshold_accepts_the_target_share_of_new_site_images_and_in_sample_would_not():
    d = 30
    features, labels = gaussian_site(300, d, seed=1)
    new, _ = gaussian_site(20000, d, seed=2)
    fit = fit_site_abstention(features, labels, 3, groups=[""] * len(features), target_acceptance=0.95)
    accepted = float(np.mean(fit["detector"].score(new) <= fit["threshold"]))
    assert 0.93 <= accepted <= 0.985, accepted  # 300 out-of-fold scores: the 95 % quantile is known to about 1.3 points
    assert fit["acceptance"] >= 0.95 and fit["folds"] == CROSS_FIT_FOLDS and fit["fold_groups"] == "image"
    # the in-sample threshold (fit and threshold on the same images) is optimistic: it refuses far more new images
    in_sample, _ = calibrate_threshold(fit["detector"].score(features), 0.95)
    assert float(np.mean(fit["detector"].score(new) <= in_sample)) < accepted - 0.05
    # the detector written is the one fitted on all the images with their pseudo-labels
    reference = MahalanobisDetector.fit(features, labels, 3)
    np.testing.assert_allclose(fit["detector"].means, reference.means)
    np.testing.assert_allclose(fit["detector"].precision_factor, reference.precision_factor)


def test_a_class_predicted_for_too_few_images_gets_no_centre():
    features, labels = gaussian_site(300, 6, seed=3)
    labels[labels == 2] = 0
    labels[:4] = 2  # four images: fewer than min_class_images
    fit = fit_site_abstention(features, labels, 3, groups=[""] * len(features), min_class_images=10)
    assert fit["classes"] == [0, 1] and fit["detector"].means.shape == (2, 6)
    kept = labels < 2
    np.testing.assert_allclose(fit["detector"].means,
                               MahalanobisDetector.fit(features[kept], labels[kept], 2).means)
    with pytest.raises(ValueError, match="no class was predicted for 400 or more"):
        fit_site_abstention(features, labels, 3, groups=[""] * len(features), min_class_images=400)


def test_the_means_refit_keeps_the_models_covariance_and_refits_the_centres_by_hand():
    features, labels = gaussian_site(300, 6, seed=4)
    home = MahalanobisDetector.fit(*gaussian_site(500, 6, seed=5), 3)
    fit = fit_site_abstention(features, labels, 3, groups=[""] * len(features), refit="means", home=home)
    np.testing.assert_array_equal(fit["detector"].precision_factor, home.precision_factor)
    np.testing.assert_allclose(fit["detector"].means, np.stack([features[labels == c].mean(0) for c in range(3)]))
    # out of fold by hand: each fold scored by the centres of the other four, under the model's own covariance
    fold = fold_assignment([""] * len(features), CROSS_FIT_FOLDS, 0)
    held_out = fold == 0
    centres = np.stack([features[~held_out & (labels == c)].mean(0) for c in range(3)])
    projected, projected_centres = features[held_out] @ home.precision_factor, centres @ home.precision_factor
    by_hand = ((projected[:, None] - projected_centres[None]) ** 2).sum(-1).min(1)
    np.testing.assert_allclose(fit["out_of_fold_scores"][held_out], by_hand)
    assert fit["threshold"] == calibrate_threshold(fit["out_of_fold_scores"], 0.95)[0]


def test_the_threshold_refit_keeps_the_models_detector_and_sets_only_the_quantile():
    features, labels = gaussian_site(300, 6, seed=6)
    home = MahalanobisDetector.fit(*gaussian_site(500, 6, seed=7), 3)
    fit = fit_site_abstention(features, labels, 3, groups=[""] * len(features), refit="threshold", home=home)
    assert fit["detector"] is home and fit["folds"] == 0 and fit["fold_groups"] is None
    scores = np.sort(home.score(features))
    assert fit["threshold"] == scores[int(np.ceil(0.95 * 300)) - 1]  # the 285th smallest of 300
    assert fit["acceptance"] == pytest.approx(285 / 300)
    with pytest.raises(ValueError, match="none was given"):
        fit_site_abstention(features, labels, 3, groups=[""] * len(features), refit="means")
    with pytest.raises(ValueError, match="unknown site_refit 'all'"):
        fit_site_abstention(features, labels, 3, groups=[""] * len(features), refit="all", home=home)


def test_folds_keep_a_folder_together_when_there_are_enough_folders():
    groups = [f"patient{k // 3}" for k in range(30)]  # ten folders of three slices
    fold = fold_assignment(groups, 5, seed=0)
    assert all(len(set(fold[[g == name for g in groups]])) == 1 for name in set(groups))
    assert sorted(np.bincount(fold).tolist()) == [6] * 5
    flat = fold_assignment(["site"] * 23, 5, seed=0)  # one folder: image by image
    assert sorted(np.bincount(flat).tolist()) == [4, 4, 5, 5, 5]
    assert not np.array_equal(flat, fold_assignment(["site"] * 23, 5, seed=1))


def test_the_inputs_digest_depends_on_the_contents_only(tmp_path):
    files = [write_png(tmp_path / "a" / f"{k}.png", np.full((8, 8), 10 * k)) for k in range(3)]
    by_hand = hashlib.sha256("\n".join(sorted(hashlib.sha256(f.read_bytes()).hexdigest() for f in files))
                             .encode()).hexdigest()
    assert inputs_digest([str(f) for f in files]) == by_hand
    renamed = [shutil.copy(f, tmp_path / f"other{k}.png") for k, f in enumerate(reversed(files))]
    assert inputs_digest(renamed) == by_hand
    write_png(tmp_path / "other0.png", np.full((8, 8), 11))
    assert inputs_digest(renamed) != by_hand
    assert "no paths" in INPUT_DIGEST_RULE


# -- calibrate_site on files ---------------------------------------------------------------------------------------


def write_site(folder, n: int, seed: int, broken: int = 0):
    """``n`` synthetic slices of a site as PNGs (one pseudo-patient each) and ``broken`` files that cannot be read."""
    images = shifted_images(n, seed)[:, 0].numpy()
    files = [write_png(folder / f"slice{k:03d}.png", 255 * image) for k, image in enumerate(images)]
    for k in range(broken):
        (folder / f"broken{k}.png").write_bytes(b"not a png")
    return files


def site_loader(folder, batch_size: int = 16) -> DataLoader:
    """File inference's data loader (``configs/inference.json``): the files read and prepared as the model was."""
    transform = Compose([LoadPreprocessd(keys="image", spatial_size=TINY_SIZE, preprocess="minmax", on_error="mark"),
                         EnsureTyped(keys="image", track_meta=False)])
    return DataLoader(Dataset(file_items(str(folder)), transform=transform), batch_size=batch_size, shuffle=False)


def home_state(network: nn.Module, checkpoint):
    """The abstention state training fits beside ``checkpoint``: Mahalanobis on unshifted synthetic slices."""
    from robustmri.abstention.fit import fit_state

    data = generate_slices(n_patients=120, size=TINY_SIZE, seed=30, slices_per_patient=(1, 1))
    images = data["images"][:, None].astype(np.float32)
    state = fit_state(network, images[:90], data["labels"][:90], images[90:], checkpoint)
    save_state(state, checkpoint)
    return state


def trained_model(folder, network: nn.Module | None = None, preprocess: str = "minmax", state: bool = True):
    """``model.pt`` and the ``model_metadata.json`` (and training-data record) training writes beside it, and
    with ``state`` its abstention state."""
    folder.mkdir(parents=True, exist_ok=True)
    network = network if network is not None else tiny_network()
    torch.save(network.state_dict(), folder / "model.pt")
    if state:
        home_state(network, folder / "model.pt")
    content = model_metadata(None, TINY_SIZE, 2, network, CLASS_NAMES, preprocess=preprocess)
    content["provenance"] = training_provenance()
    content["provenance"]["training"].update(completed=True, final_checkpoint={
        "file": "model.pt", "sha256": file_sha256(folder / "model.pt")})
    content["provenance"]["metrics"]["validation"] = {"n": 10, "last_epoch": {"val_accuracy": 0.5}}
    write_json(folder / METADATA_FILE, content)
    write_json(folder / TRAINING_DATA_FILE, {"dataset_dir": None})
    return folder / "model.pt"


def loaded(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny model calibrated on 150 site slices (and 2 unreadable files) beside its source."""
    root = tmp_path_factory.mktemp("calibrated")
    checkpoint = trained_model(root / "models")
    files = write_site(root / "site", 150, seed=10, broken=2)
    record = calibrate_site(tiny_network(seed=5), str(checkpoint), site_loader(root / "site"), CLASS_NAMES,
                            min_images=100, min_class_images=5, batch_size=32)
    return root, checkpoint, files, record


def test_calibration_writes_model_site_with_only_batchnorm_statistics_changed(calibrated):
    root, checkpoint, _, record = calibrated
    site = root / "models" / "model_site.pt"
    source, adapted = loaded(checkpoint), loaded(site)
    assert source.keys() == adapted.keys()
    changed = [key for key in source if not torch.equal(source[key], adapted[key])]
    assert changed and all(key.endswith(RUNNING) for key in changed)
    assert all(not torch.equal(source[k], adapted[k]) for k in source if k.endswith(RUNNING[:2]))
    batches = record["batchnorm"]["batches"]
    assert record["batchnorm"]["batch_size"] == 32 and batches == 150 // 32 + 1
    assert all(int(adapted[k]) == batches for k in adapted if k.endswith("num_batches_tracked"))
    assert record["batchnorm"]["layers"] == 5
    network = tiny_network()
    network.load_state_dict(adapted)  # a plain state_dict that loads like any checkpoint


def test_the_in_memory_calibration_is_the_one_the_files_get(calibrated):
    root, checkpoint, files, record = calibrated
    images = torch.stack([image for batch in site_loader(root / "site")
                          for image, error in zip(batch["image"], batch["error"]) if not error])
    assert len(images) == len(files)
    network = tiny_network()
    network.load_state_dict(loaded(checkpoint))
    fit = calibrate_network(network, images, 3, [str(root / "site")] * len(files), min_class_images=5, batch_size=32,
                            home=load_state(checkpoint))
    assert all(torch.equal(v, loaded(root / "models" / "model_site.pt")[k]) for k, v in network.state_dict().items())
    assert fit["threshold"] == record["abstention"]["threshold"] and fit["batches"] == record["batchnorm"]["batches"]


def test_calibration_is_recorded_beside_the_source_without_paths(calibrated):
    root, checkpoint, files, record = calibrated
    site = root / "models" / "model_site.pt"
    metadata = json.loads((root / "models" / METADATA_FILE).read_text())
    assert metadata["calibrations"]["model_site.pt"] == record == read_calibration(site)
    assert read_calibration(checkpoint) is None
    assert record["images"] == {"n": 150, "n_unreadable": 2, "sha256": inputs_digest([str(f) for f in files]),
                                "digest_rule": INPUT_DIGEST_RULE}
    assert record["sha256"] == file_sha256(site) and record["file"] == "model_site.pt"
    assert record["source_checkpoint"] == {"file": "model.pt", "sha256": file_sha256(checkpoint)}
    assert sum(record["abstention"]["pseudo_labels"].values()) == 150
    assert str(root) not in json.dumps(metadata)
    # every setting the deployment configs read is the source's
    for key in ("spatial_size", "network_padding", "preprocess"):
        assert trained_setting(str(site), key, None) == trained_setting(str(checkpoint), key, None)
    # export takes the training run's provenance for it, marked as not that run's final model
    provenance = checkpoint_provenance(site)
    assert provenance["checkpoint"] == {"file": "model_site.pt", "sha256": file_sha256(site), "bound": False,
                                        "selection": provenance["checkpoint"]["selection"]}
    assert "validation" not in provenance["metrics"] and checkpoint_provenance(checkpoint)["checkpoint"]["bound"]


def test_the_abstention_state_is_tied_to_model_site_and_accepts_the_target_share_of_new_site_images(calibrated,
                                                                                                      tmp_path):
    root, _, files, record = calibrated
    site = root / "models" / "model_site.pt"
    assert abstention_path(site).endswith("model_site_abstention.pt")
    state = load_state(site, checkpoint_sha256=file_sha256(site))
    with pytest.raises(ValueError, match="fitted for other weights"):
        load_state(site, checkpoint_sha256="0" * 64)
    source = {"kind": SITE_IMAGES, "n": 150, "sha256": record["images"]["sha256"], "date": record["date"]}
    assert state.score == "mahalanobis" and state.fitted_on == source == state.calibrated_on
    assert state.target_acceptance == 0.95 and state.acceptance >= 0.95
    assert state.threshold == record["abstention"]["threshold"]
    # new slices of the same site (other pseudo-patients), through the calibrated network and the state
    write_site(tmp_path / "new", 400, seed=11)
    images = torch.cat([batch["image"] for batch in site_loader(tmp_path / "new")])
    network = tiny_network()
    network.load_state_dict(loaded(site))
    detector = MahalanobisDetector(state.arrays["means"], state.arrays["precision_factor"], state.settings["ridge"], 0)
    accepted = float(np.mean(state.accepts(detector.score(extract_features(network, images.numpy())))))
    assert 0.90 <= accepted <= 0.995, accepted
    # the model's own state keeps its detector (the product's refit) but not its threshold, which the calibrated
    # network's features of the site's slices leave far from the target
    home = load_state(root / "models" / "model.pt")
    np.testing.assert_array_equal(home.arrays["means"], state.arrays["means"])
    at_home_threshold = float(np.mean(home.accepts(detector.score(extract_features(network, images.numpy())))))
    assert abs(at_home_threshold - 0.95) > 0.2, (at_home_threshold, accepted)


def test_calibration_into_another_folder_copies_the_metadata_with_its_calibration(calibrated, tmp_path):
    root, checkpoint, _, _ = calibrated
    out = tmp_path / "site_model"
    record = calibrate_site(tiny_network(), str(checkpoint), site_loader(root / "site"), CLASS_NAMES,
                            output_dir=str(out), min_images=100, min_class_images=5, batch_size=32)
    metadata = json.loads((out / METADATA_FILE).read_text())
    source = json.loads((root / "models" / METADATA_FILE).read_text())
    assert metadata["calibration"] == record == read_calibration(out / "model_site.pt")
    assert "calibrations" not in metadata
    assert {k: v for k, v in metadata.items() if k != "calibration"} == {
        k: v for k, v in source.items() if k != "calibrations"}
    assert json.loads((out / TRAINING_DATA_FILE).read_text()) == {"dataset_dir": None}
    assert (out / "model_site_abstention.pt").is_file() and not (out / "model.pt").exists()
    # the same images and settings give the same weights wherever they are written
    assert all(torch.equal(v, loaded(root / "models" / "model_site.pt")[k])
               for k, v in loaded(out / "model_site.pt").items())
    # weights replaced after calibration: the record and the state describe other weights
    torch.save(tiny_network(seed=7).state_dict(), out / "model_site.pt")
    with pytest.raises(ValueError, match="records a calibration of other weights than model_site.pt"):
        read_calibration(out / "model_site.pt")
    with pytest.raises(ValueError, match="fitted for other weights"):
        load_state(out / "model_site.pt", file_sha256(out / "model_site.pt"))
    # a folder holding another model's metadata is not overwritten
    other = tmp_path / "other"
    trained_model(other, preprocess="head", state=False)
    with pytest.raises(FileExistsError, match="another model's model_metadata.json"):
        calibrate_site(tiny_network(), str(checkpoint), site_loader(root / "site"), CLASS_NAMES,
                       output_dir=str(other), min_images=100, min_class_images=5)
    assert sorted(p.name for p in other.iterdir()) == ["model.pt", METADATA_FILE, TRAINING_DATA_FILE]


def test_calibration_refuses_its_own_output_too_few_images_and_no_readable_image(calibrated, tmp_path, caplog):
    root, _, _, _ = calibrated
    site = root / "models" / "model_site.pt"
    with pytest.raises(ValueError, match="would be overwritten"):
        calibrate_site(tiny_network(), str(site), site_loader(root / "site"), CLASS_NAMES)
    with pytest.raises(ValueError, match=r"^150 readable site image\(s\), fewer than the 200 calibration needs"):
        calibrate_site(tiny_network(), str(root / "models" / "model.pt"), site_loader(root / "site"), CLASS_NAMES,
                       min_images=200)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.png").write_bytes(b"nothing")
    (tmp_path / "broken" / "b.png").write_bytes(b"nothing either")
    with pytest.raises(ValueError, match="none of the 2 input file"):
        calibrate_site(tiny_network(), str(root / "models" / "model.pt"), site_loader(tmp_path / "broken"),
                       CLASS_NAMES)
    assert "2 of 2 input file(s) could not be read and are left out: 2 x not a readable image" in caplog.text
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save(tiny_network().state_dict(), bare / "model.pt")
    with pytest.raises(FileNotFoundError, match="no model_metadata.json beside"):
        calibrate_site(tiny_network(), str(bare / "model.pt"), site_loader(root / "site"), CLASS_NAMES)


# -- the bundle's run id -------------------------------------------------------------------------------------------


def test_the_calibrating_run_id_writes_model_site_that_file_inference_reads_like_any_checkpoint(tmp_path):
    network = PaperCNN(in_channels=1, num_classes=3, spatial_size=TINY_SIZE, padding=2)
    checkpoint = trained_model(tmp_path / "models", network, preprocess="head")
    write_site(tmp_path / "site", 30, seed=20, broken=1)
    # no size, padding or preprocessing given: each run reads them from the model_metadata.json beside its checkpoint
    common = ["--ckpt_dir", str(tmp_path / "models"), "--input_files", str(tmp_path / "site"),
              "--min_site_images", "20", "--min_class_images", "2"]
    run_in_process("calibrating", "configs/calibrate.json", *common)
    site = tmp_path / "models" / "model_site.pt"
    record = read_calibration(site)
    assert record["images"]["n_unreadable"] == 1 and 20 <= record["images"]["n"] <= 30
    assert load_state(site, file_sha256(site)).fitted_on["n"] == record["images"]["n"]
    assert record["batchnorm"]["batch_size"] == 32 and record["batchnorm"]["layers"] == 5
    source = loaded(checkpoint)
    assert all(torch.equal(v, source[k]) for k, v in loaded(site).items() if not k.endswith(RUNNING))
    out = tmp_path / "out"
    run_in_process("calibrating", "configs/calibrate.json", *common, "--output_dir", str(out))
    assert read_calibration(out / "model_site.pt")["images"] == record["images"]
    run_in_process("inference", "configs/inference.json", "--checkpoint", str(out / "model_site.pt"),
                   "--input_files", str(tmp_path / "site"), "--output_dir", str(tmp_path / "eval"))
    predictions = json.loads((tmp_path / "eval" / "predictions.json").read_text())
    assert predictions["n_assessable"] + predictions["n_not_assessable"] == record["images"]["n"]
    assert predictions["n_failed"] == 1
    site_state = load_state(out / "model_site.pt", file_sha256(out / "model_site.pt"))  # applied, not refitted
    assert predictions["abstention"]["calibrated_on"]["kind"] == "site images"
    assert predictions["abstention"]["threshold"] == site_state.threshold
    with pytest.raises(Exception) as caught:  # MONAI wraps the error of the expression it evaluates
        run_in_process("calibrating", "configs/calibrate.json", "--ckpt_dir", str(tmp_path / "models"),
                       "--input_files", str(tmp_path / "site"))
    causes = [caught.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    assert "fewer than the 100 calibration needs" in str(causes[-1])


def _state_beside(checkpoint, score: str, arrays=None) -> None:
    from robustmri.abstention import AbstentionState, save_state

    save_state(AbstentionState(score=score, arrays=arrays or {}, threshold=1.0, target_acceptance=0.95,
                               acceptance=0.95, checkpoint_sha256=file_sha256(checkpoint)), checkpoint)


def test_the_site_keeps_the_models_score_and_a_parameter_free_one_gets_only_its_threshold(tmp_path):
    from robustmri.abstention.fit import scores_of
    from robustmri.deploy.calibration import QUANTILE_RULE

    checkpoint = trained_model(tmp_path / "models")
    _state_beside(checkpoint, "energy")
    write_site(tmp_path / "site", 120, seed=12)
    record = calibrate_site(tiny_network(seed=5), str(checkpoint), site_loader(tmp_path / "site"), CLASS_NAMES,
                            min_images=100, batch_size=32)
    site = tmp_path / "models" / "model_site.pt"
    state = load_state(site, checkpoint_sha256=file_sha256(site))
    assert state.score == "energy" == record["abstention"]["score"] and state.arrays == {}
    assert record["abstention"]["rule"] == QUANTILE_RULE and "energy score's threshold" in record["adapted"][1]
    network = tiny_network()
    network.load_state_dict(loaded(site))
    images = torch.cat([batch["image"] for batch in site_loader(tmp_path / "site")]).numpy()
    assert state.threshold == calibrate_threshold(scores_of(state, network, images), 0.95)[0]


@pytest.mark.parametrize("name", ["mahalanobis+max_softmax", "mahalanobis_gate+max_softmax"])
def test_a_combined_score_is_ranked_on_the_site_images_out_of_fold(tmp_path, name):
    from scipy.special import softmax

    from robustmri.abstention.fit import scores_of
    from robustmri.abstention.mahalanobis import network_outputs
    from robustmri.deploy.calibration import COMBINATION_RULE, fit_site_abstention

    checkpoint = trained_model(tmp_path / "models")
    _state_beside(checkpoint, name)
    write_site(tmp_path / "site", 120, seed=12)
    record = calibrate_site(tiny_network(seed=5), str(checkpoint), site_loader(tmp_path / "site"), CLASS_NAMES,
                            min_images=100, batch_size=32, site_refit="full")  # the site's own refit, ranked
    site = tmp_path / "models" / "model_site.pt"
    state = load_state(site, checkpoint_sha256=file_sha256(site))
    assert state.score == name == record["abstention"]["score"]
    assert record["abstention"]["rule"] == COMBINATION_RULE and "components ranked" in record["adapted"][1]
    network = tiny_network()
    network.load_state_dict(loaded(site))
    batches = list(site_loader(tmp_path / "site"))
    images = torch.cat([batch["image"] for batch in batches]).numpy()
    groups = [os.path.dirname(f) for batch in batches for f in batch["file"]]
    features, logits = network_outputs(network, images, 32)  # calibration's batches: the same floats
    # the max-softmax part ranks on every site image's 1 - max p, computed here from the logits
    max_softmax = 1.0 - softmax(logits.astype(np.float64), axis=1).max(axis=1)
    np.testing.assert_allclose(state.arrays["max_softmax.cdf_reference"], np.sort(max_softmax), rtol=1e-6, atol=1e-9)
    # the Mahalanobis part is the site's own refit, ranked on its out-of-fold scores
    maha = fit_site_abstention(features, logits.argmax(1), len(CLASS_NAMES), groups)
    np.testing.assert_allclose(state.arrays["mahalanobis.means"], maha["detector"].means, rtol=1e-6)
    np.testing.assert_allclose(state.arrays["mahalanobis.cdf_reference"], np.sort(maha["out_of_fold_scores"]),
                               rtol=1e-6)
    # the threshold accepts the target share of the combined out-of-fold scores, by hand: mean of the two ranks,
    # or the softmax rank with the Mahalanobis part's top 1 % (above the midpoint around 99 %) put above it
    ranks = [np.searchsorted(np.sort(ref), values, side="right") / len(ref) for ref, values in
             ((maha["out_of_fold_scores"], maha["out_of_fold_scores"]), (max_softmax, max_softmax))]
    combined = np.mean(ranks, axis=0)
    if "_gate" in name:
        ordered, m = np.sort(maha["out_of_fold_scores"]), int(0.99 * len(max_softmax))
        combined = np.where(maha["out_of_fold_scores"] > (ordered[m - 1] + ordered[m]) / 2, 1 + ranks[0], ranks[1])
        assert (combined > 1).sum() == len(max_softmax) - m
    assert np.mean(combined <= state.threshold) >= 0.95 > np.mean(combined < state.threshold) - 1e-12
    assert state.acceptance == pytest.approx(np.mean(combined <= state.threshold))
    # and the state applies like any other: the site's own images, scored in-sample, are accepted at least as often
    expected = scores_of(state, network, images)
    assert np.mean(expected <= state.threshold) >= state.acceptance - 0.05
    # the exported graph carries the site's combination: its threshold, and its score within one reference step
    from robustmri.deploy.onnx.export import export_onnx
    from robustmri.deploy.onnx.runtime import OnnxClassifier

    result = export_onnx(network, tmp_path / "site.onnx", CLASS_NAMES, TINY_SIZE, checkpoint=site, preprocess="minmax",
                         parity_images=images, abstention=state)
    classifier = OnnxClassifier(tmp_path / "site.onnx", device="cpu")
    assert result["parity"]["passed"] and classifier.detector["name"] == name
    assert classifier.ood_threshold == pytest.approx(state.threshold, rel=1e-12)
    _, exported = classifier.predict_with_scores(images)
    assert np.abs(exported - expected).max() <= 1e-4 + 1.0 / len(images)


def test_an_unknown_score_is_refused_before_anything_is_written(tmp_path):
    checkpoint = trained_model(tmp_path / "models")
    _state_beside(checkpoint, "mahalanobis+energy")
    write_site(tmp_path / "site", 120, seed=12)
    with pytest.raises(ValueError, match="'mahalanobis\\+energy' is not one site calibration refits"):
        calibrate_site(tiny_network(seed=5), str(checkpoint), site_loader(tmp_path / "site"), CLASS_NAMES,
                       min_images=100, batch_size=32)
    assert not (tmp_path / "models" / "model_site.pt").exists()


def test_the_threshold_refit_writes_the_models_own_detector_with_the_sites_threshold(tmp_path):
    from robustmri.abstention.fit import scores_of

    checkpoint = trained_model(tmp_path / "models")
    home = load_state(checkpoint)
    write_site(tmp_path / "site", 120, seed=12)
    record = calibrate_site(tiny_network(seed=5), str(checkpoint), site_loader(tmp_path / "site"), CLASS_NAMES,
                            min_images=100, batch_size=32)  # the product's refit
    site = tmp_path / "models" / "model_site.pt"
    state = load_state(site, checkpoint_sha256=file_sha256(site))
    assert record["abstention"]["site_refit"] == "threshold"
    assert record["adapted"][1] == "abstention: nothing of the Mahalanobis score itself, threshold"
    for key in ("means", "precision_factor"):
        np.testing.assert_array_equal(state.arrays[key], home.arrays[key])
    network = tiny_network()
    network.load_state_dict(loaded(site))
    images = torch.cat([batch["image"] for batch in site_loader(tmp_path / "site")]).numpy()
    assert state.threshold == calibrate_threshold(scores_of(state, network, images), 0.95)[0]
    assert state.threshold != home.threshold


def test_a_refit_that_keeps_the_models_state_refuses_a_checkpoint_without_one(tmp_path):
    checkpoint = trained_model(tmp_path / "models", state=False)
    write_site(tmp_path / "site", 120, seed=12)
    with pytest.raises(FileNotFoundError, match="no abstention state .*site_refit 'means' keeps parts of"):
        calibrate_site(tiny_network(seed=5), str(checkpoint), site_loader(tmp_path / "site"), CLASS_NAMES,
                       min_images=100, batch_size=32, site_refit="means")
    with pytest.raises(ValueError, match="unknown site_refit 'some'"):
        calibrate_site(tiny_network(seed=5), str(checkpoint), site_loader(tmp_path / "site"), CLASS_NAMES,
                       site_refit="some")
    assert not (tmp_path / "models" / "model_site.pt").exists()
