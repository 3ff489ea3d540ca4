"""Label review (robustmri.review.label_review): label files, the catalog, self-influence, scoring in a review order."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from robustmri.data.catalog import scan_dataset
from robustmri.data.synthetic import generate_slices
from robustmri.influence import influence_ranking, self_influence_scores
from robustmri.networks import PaperCNN
from robustmri.review.orders import ReviewOrderError
from robustmri.review.label_review import (
    LabelFileError,
    LabelledImage,
    load_images,
    read_label_file,
    score_labelled_images,
    write_label_file,
    write_training_catalog,
)


def test_label_files_give_class_indices_and_name_the_file_on_error(tmp_path):
    path = tmp_path / "a.label.json"
    write_label_file(str(path), "Glioma", group="p7")
    assert read_label_file(str(path)) == (1, "p7")
    path.write_text(json.dumps({"label": 2}))
    assert read_label_file(str(path)) == (2, None)
    for content, reason in [("not json", "not JSON"), ('{"class": "glioma"}', '"label" key'),
                            ('{"label": "astrocytoma"}', "unknown class"), ('{"label": 3}', "outside 0..2")]:
        path.write_text(content)
        with pytest.raises(LabelFileError, match=reason) as err:
            read_label_file(str(path))
        assert str(path) in str(err.value)


def test_training_catalog_is_read_back_by_the_bundle_catalog(tmp_path):
    items = []
    for k, label in enumerate([0, 1, 2, 1]):
        image = tmp_path / f"img{k}.png"
        image.write_bytes(b"")
        items.append(LabelledImage(f"img{k}", str(image), label, group="patient-x" if k < 2 else None))
    write_training_catalog(items, str(tmp_path / "catalog"))
    catalog = scan_dataset(tmp_path / "catalog")
    assert [r.label for r in catalog.records] == [0, 1, 2, 1]
    assert [r.file for r in catalog.records] == [item.file for item in items]
    groups = [r.group for r in catalog.records]
    assert groups[0] == groups[1] and len(set(groups)) == 3  # shared pseudonym kept together, never written as given
    assert "patient-x" not in (tmp_path / "catalog" / "labels.csv").read_text()


def _small_cnn(size=32):
    torch.manual_seed(0)
    return PaperCNN(spatial_size=size, padding=2, channels=(4, 4, 4, 4, 3)).eval()


def test_self_influence_equals_explicit_autograd_solve():
    network = _small_cnn()
    images = torch.rand(20, 1, 32, 32, generator=torch.Generator().manual_seed(1)).numpy()
    labels = np.arange(20) % 3
    damping = 0.05
    scores = self_influence_scores(network, images, labels, damping=damping)

    with torch.no_grad():
        features = network.features(torch.from_numpy(images)).double()
    theta = torch.cat([network.classifier.weight, network.classifier.bias[:, None]], 1).detach().double().reshape(-1)
    target = torch.from_numpy(labels)

    def loss(flat, rows=slice(None)):
        matrix = flat.reshape(3, -1)
        return nn.functional.cross_entropy(features[rows] @ matrix[:, :-1].T + matrix[:, -1], target[rows])

    hessian = torch.autograd.functional.hessian(loss, theta) + damping * torch.eye(theta.numel(), dtype=torch.float64)
    reference = []
    for i in range(20):
        flat = theta.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(flat, slice(i, i + 1)), flat)
        reference.append(-(gradient @ torch.linalg.solve(hessian, gradient)).item() / 20)
    np.testing.assert_allclose(scores, reference, rtol=1e-6, atol=1e-12)
    assert (scores <= 0).all()
    assert list(influence_ranking(scores)) == list(np.argsort(reference, kind="stable"))


def _train(images, labels, epochs=12, lam=0.01):
    """A briefly trained CNN whose last layer is then fitted to its regularised optimum (as influence assumes)."""
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    torch.manual_seed(0)
    network = PaperCNN(spatial_size=64, padding=2, channels=(8, 8, 16, 16, 16))
    optimiser = torch.optim.Adam(network.parameters(), lr=0.01)
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        network.train()
        for batch in torch.randperm(len(y), generator=order).split(8):
            optimiser.zero_grad()
            nn.functional.cross_entropy(network(x[batch]), y[batch]).backward()
            optimiser.step()
    network.eval()
    with torch.no_grad():
        features = network.features(x)
    layer = network.classifier
    lbfgs = torch.optim.LBFGS(layer.parameters(), max_iter=500, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        lbfgs.zero_grad()
        value = nn.functional.cross_entropy(layer(features), y) + 0.5 * lam * sum(p.square().sum() for p in layer.parameters())
        value.backward()
        return value

    lbfgs.step(closure)
    return network


@pytest.mark.slow
def test_deliberately_mislabelled_study_is_among_the_first_to_review():
    data = generate_slices(n_patients=24, size=64, seed=0)
    images, labels = data["images"][:, None].astype(np.float32), data["labels"]
    n = len(labels)
    assert n == 56
    ranks = []
    for seed in range(4):  # four separate runs, one wrong label each (true class + 1)
        victim = int(np.random.default_rng(seed).integers(n))
        noisy = labels.copy()
        noisy[victim] = (labels[victim] + 1) % 3
        network = _train(images, noisy)
        scores = self_influence_scores(network, images, noisy, damping=0.01)
        ranks.append(int(np.flatnonzero(influence_ranking(scores) == victim)[0]) + 1)
    # random review order would put it at rank 28.5 of 56 on average
    assert max(ranks) <= 10, ranks
    assert sum(rank <= 3 for rank in ranks) >= 3, ranks


def _labelled_pngs(folder, n=9):
    rng = np.random.default_rng(0)
    items = []
    for k in range(n):
        path = folder / f"img{k}.png"
        Image.fromarray((rng.random((32, 32)) * 255).astype(np.uint8)).save(path)
        items.append(LabelledImage(f"img{k}", str(path), k % 3))
    return items


def test_labelled_images_are_scored_in_the_chosen_order_with_the_models_view(tmp_path):
    items = _labelled_pngs(tmp_path)
    network = _small_cnn()
    images, kept, _ = load_images(items, 32)
    labels = np.array([item.label for item in kept])
    with torch.no_grad():
        probabilities = torch.softmax(network(torch.from_numpy(images)), dim=1).numpy()

    by_loss = score_labelled_images(network, items, 32, order="loss")
    assert by_loss["order"] == "loss" and by_loss["skipped"] == []
    entries = [by_loss["scores"][item.image_id] for item in kept]
    losses = -np.log(probabilities[np.arange(len(labels)), labels])
    np.testing.assert_allclose([e["score"] for e in entries], losses, rtol=1e-4)
    assert [e["rank"] for e in entries] == (np.argsort(np.argsort(-losses)) + 1).tolist()
    np.testing.assert_allclose([e["probabilities"] for e in entries], probabilities, atol=1e-5)
    assert [e["predicted"] for e in entries] == probabilities.argmax(axis=1).tolist()

    by_self = score_labelled_images(network, items, 32, damping=0.05, order="self_influence")
    expected = self_influence_scores(network, images, labels, damping=0.05)
    np.testing.assert_allclose([by_self["scores"][item.image_id]["score"] for item in kept], expected, rtol=1e-6)
    assert [by_self["scores"][item.image_id]["rank"] for item in kept] == \
        (np.argsort(influence_ranking(expected)) + 1).tolist()


def test_an_order_that_needs_a_validation_set_is_refused_before_any_work(tmp_path):
    with pytest.raises(ReviewOrderError, match="'influence' needs a trusted validation set.*use one of random, loss"):
        score_labelled_images(_small_cnn(), [LabelledImage("x", str(tmp_path / "missing.png"), 0)], 32,
                              order="influence")
