"""FinalLayer, the adapter that gives influence any classifier, against independent references.

For the paper's CNN and MONAI's DenseNet121, ResNet and EfficientNetBN (2-D, one channel, three
classes, 32 x 32 inputs, eval mode): the adapter finds the output layer, its features and
logits are those of an independent forward pass, ``input_gradients`` is the autograd gradient of
its definition, and ``compute_influence`` equals g_i . (H + lambda I)^-1 v / N built by autograd
on the final layer's weight and bias (never through robustmri's closed forms). Then the networks
it must refuse, each with a message that names the problem.
"""

import numpy as np
import pytest
import torch
from monai.networks.nets import DenseNet121, EfficientNetBN, ResNet
from torch import nn

from robustmri.influence import (
    ExactSolver,
    FinalLayer,
    FinalLayerError,
    LastLayerModel,
    collect_features,
    compute_influence,
    input_gradients,
)
from robustmri.networks import PaperCNN

SIZE = 32


def _resnet():
    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[8, 16, 32, 64], spatial_dims=2,
                  n_input_channels=1, num_classes=3)


#: name -> (builder, the output layer's name, how the test gets that layer's input without the adapter)
NETWORKS = {
    "PaperCNN": (lambda: PaperCNN(spatial_size=SIZE, padding=2), "classifier", "features"),
    "DenseNet121": (lambda: DenseNet121(spatial_dims=2, in_channels=1, out_channels=3), "class_layers.out",
                    "manual"),
    "ResNet": (_resnet, "fc", "pre_hook"),
    "EfficientNetBN": (lambda: EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=1,
                                              num_classes=3), "_fc", "pre_hook"),
}


def _network(name: str, seed: int = 0) -> nn.Module:
    """A random network in eval mode, with BatchNorm statistics and a final layer as training would leave them.

    Random initialisation alone is degenerate: EfficientNetBN's features are then the same for
    every image to nine digits. So the BatchNorm layers take the statistics of the images the
    tests use (:func:`_pool`; one train-mode pass, cumulative averages; EfficientNetBN's eval-mode
    features blow up on other images) and the final layer is redrawn so that the logits are of
    order one: the softmax is neither uniform nor saturated, and every residual, curvature and
    feature matters in the checks.
    """
    torch.manual_seed(seed)
    network = NETWORKS[name][0]()
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative: the running statistics become the batch's
            module.reset_running_stats()
    calibration = _pool()[0]
    with torch.no_grad():
        network.train()(calibration)
        network.eval()
        features = _independent_features(name, network, calibration)
        layer = network.get_submodule(NETWORKS[name][1])
        scale = features.square().mean().sqrt() * features.shape[1] ** 0.5  # logits of standard deviation ~1
        layer.weight.copy_(torch.randn_like(layer.weight) / scale)
        layer.bias.copy_(0.5 * torch.randn_like(layer.bias))
    return network


def _independent_features(name: str, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The output layer's input, found without FinalLayer: the network's own parts, or a hook of the test's own."""
    _, layer_name, how = NETWORKS[name]
    if how == "features":  # PaperCNN documents features(x) as the classifier's input
        return network.features(images)
    if how == "manual":  # DenseNet121.forward is class_layers(features(x)), class_layers ending in `out`
        return network.class_layers[:-1](network.features(images))
    seen = []
    handle = network.get_submodule(layer_name).register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        network(images)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


def _images(n: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images in [0, 1] that differ in structure and contrast (smooth 4 x 4 patterns, a little noise) and
    labels 0, 1, 2, 0, ...: uniform noise images all look alike to a random network."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 4, 4, generator=g) * torch.rand(n, 1, 1, 1, generator=g)
    smooth = nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (0.9 * smooth + 0.1 * torch.rand(n, 1, SIZE, SIZE, generator=g)).to(dtype), torch.arange(n) % 3


def _pool(dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The 24 images (and labels) the maths tests draw from."""
    return _images(24, seed=99, dtype=dtype)


def _theta(layer: nn.Linear) -> torch.Tensor:
    """[W | b] flattened row-major, float64, detached: the influence parameters."""
    return torch.cat([layer.weight, layer.bias[:, None]], 1).detach().double().reshape(-1)


def _loss(theta: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the final layer with parameters theta = [W | b] (row-major) on fixed features."""
    matrix = theta.reshape(-1, features.shape[1] + 1)
    return nn.functional.cross_entropy(features @ matrix[:, :-1].T + matrix[:, -1], labels, reduction=reduction)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_final_layer_finds_the_output_layer_its_input_and_the_logits(name):
    network = _network(name)
    layer_name = NETWORKS[name][1]
    final = FinalLayer(network)
    assert final.layer_name == layer_name and final.layer is network.get_submodule(layer_name)
    assert final.network is network and isinstance(final, LastLayerModel)
    images = _pool()[0][:5]
    with torch.no_grad():
        features, logits = final(images)
        reference = _independent_features(name, network, images)
        output = network(images)
    assert features.shape == (5, final.layer.in_features) and logits.shape == (5, 3)
    assert torch.equal(features, reference)
    assert torch.equal(logits, output)
    assert features.abs().max() > 0 and logits.std() > 0  # a real signal, not an all-zero coincidence


@pytest.mark.parametrize("name", list(NETWORKS))
def test_input_gradients_equal_autograd_of_their_definition(name):
    """grad_x sum_i (p_i - y_i) . (s [h_i; 1]), one image at a time; and grad_x (grad_theta L_i . s) by double
    backward, the definition that does not use the closed form of the gradient."""
    network = _network(name).double()
    images, labels = (tensor[:3] for tensor in _pool(torch.float64))
    layer = network.get_submodule(NETWORKS[name][1])
    s = torch.randn(3, layer.in_features + 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = input_gradients(network, images, labels, s)
    assert not network.training and all(p.requires_grad for p in network.parameters())

    weight, bias = layer.weight.detach(), layer.bias.detach()
    plain, double_backward = [], []
    for i in range(len(labels)):
        x = images[i:i + 1].clone().requires_grad_(True)
        h = _independent_features(name, network, x)
        p = torch.softmax(h @ weight.T + bias, 1)
        residual = p - nn.functional.one_hot(labels[i:i + 1], 3).double()
        objective = (residual * (torch.cat([h, torch.ones(1, 1, dtype=h.dtype)], 1) @ s.T)).sum()
        plain.append(torch.autograd.grad(objective, x)[0][0])

        x = images[i:i + 1].clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(network(x), labels[i:i + 1])
        gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias], create_graph=True)
        dot = (gw * s[:, :-1]).sum() + (gb * s[:, -1]).sum()
        double_backward.append(torch.autograd.grad(dot, x)[0][0])
    plain, double_backward = torch.stack(plain), torch.stack(double_backward)

    scale = plain.abs().max()
    assert scale > 0
    assert (got - plain).abs().max() <= 1e-10 * scale
    assert (got - double_backward).abs().max() <= 1e-10 * scale
    other = input_gradients(network, images, (labels + 1) % 3, s)  # the check tells labels apart
    assert (other - plain).abs().max() > 1e-3 * scale


def _solve(theta, features, labels, v, damping):
    """(H + damping I)^-1 v, H the autograd Hessian of the mean training loss in theta.

    Small layers build H with torch.autograd.functional.hessian; wide ones (DenseNet121's 1024
    features give 3075 parameters) solve with scipy's conjugate gradients on autograd
    Hessian-vector products (double backward), which converge in rank(H) <= N C steps.
    """
    if theta.numel() <= 1000:
        hessian = torch.autograd.functional.hessian(lambda t: _loss(t, features, labels), theta)
        return torch.linalg.solve(hessian + damping * torch.eye(theta.numel(), dtype=theta.dtype), v)
    from scipy.sparse.linalg import LinearOperator, cg

    point = theta.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(_loss(point, features, labels), point, create_graph=True)

    def matvec(vector):
        vector = torch.as_tensor(np.asarray(vector).reshape(-1), dtype=theta.dtype)
        (hvp,) = torch.autograd.grad(gradient, point, vector, retain_graph=True)
        return (hvp + damping * vector).numpy()

    operator = LinearOperator((theta.numel(), theta.numel()), matvec=matvec, dtype=np.float64)
    solution, info = cg(operator, v.numpy(), rtol=1e-13, atol=0.0, maxiter=10 * len(labels) * 3)
    assert info == 0, "the reference conjugate gradients did not converge"
    return torch.from_numpy(solution)


def _reference_scores(name, network, train, val, damping):
    """g_i . (H + lambda I)^-1 v / N by autograd on [W | b], with features from the independent forward pass."""
    layer = network.get_submodule(NETWORKS[name][1])
    with torch.no_grad():
        train_features = _independent_features(name, network, train[0]).double()
        val_features = _independent_features(name, network, val[0]).double()
    theta = _theta(layer)
    point = theta.clone().requires_grad_(True)
    (v,) = torch.autograd.grad(_loss(point, val_features, val[1]), point)
    s = _solve(theta, train_features, train[1], v, damping)
    n = len(train[1])
    scores = []
    for i in range(n):
        point = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_loss(point, train_features[i:i + 1], train[1][i:i + 1]), point)
        scores.append((g @ s).item() / n)
    return torch.tensor(scores, dtype=torch.float64), v, s


def _batches(images, labels, ids, size=5):
    return [{"image": images[k:k + size], "label": labels[k:k + size], "id": ids[k:k + size]}
            for k in range(0, len(labels), size)]


@pytest.mark.parametrize("name", list(NETWORKS))
def test_compute_influence_equals_an_autograd_solve_on_the_final_layer(name):
    network = _network(name)
    images, labels = _pool()
    train, val = (images[:12], labels[:12]), (images[12:19], labels[12:19])
    ids = torch.arange(100, 112)
    damping = 0.05
    result = compute_influence(network, _batches(*train, ids), _batches(*val, torch.arange(7)), ExactSolver(damping))
    reference, v, s = _reference_scores(name, network, train, val, damping)

    assert torch.equal(result.ids, ids) and torch.equal(result.labels, train[1]) and result.damping == damping
    c, k = 3, network.get_submodule(NETWORKS[name][1]).in_features + 1
    assert result.validation_gradient.shape == result.s.shape == (c, k)
    # both sides start from float32 features: EfficientNet-b0's differ from float64 ones by 1.6e-5 of their largest
    # value, and by 3.5e-6 between two batchings of the same images, on an AVX-512 CPU (oneDNN picks kernels by
    # shape); the gradient is compared at that scale, not at float32's epsilon
    np.testing.assert_allclose(result.validation_gradient.double().reshape(-1), v, rtol=1e-5,
                               atol=1e-4 * float(v.abs().max()))
    scale = float(reference.abs().max())
    assert scale > 0
    np.testing.assert_allclose(result.scores.double(), reference, rtol=1e-4, atol=1e-4 * scale)
    assert list(np.argsort(result.scores.numpy())) == list(np.argsort(reference.numpy()))
    # the tolerance tells dampings apart: lambda 10 times larger gives other scores
    other, _, _ = _reference_scores(name, network, train, val, 10 * damping)
    assert (other - reference).abs().max() > 1e-2 * scale
    assert not network.training


# -- networks the adapter refuses, each with its own message -------------------------------------------


class _Tuple(nn.Module):
    """Returns (logits, features), as some backbones with auxiliary outputs do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = torch.flatten(x, 1)
        return self.fc(h), h


class _InPlaceAfter(nn.Module):
    """Scales its logits in place after the final layer ran: the layer's output object is returned, changed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1)).mul_(2.0)


class _TwoHeads(nn.Module):
    """The output layer ``head`` is registered before ``aux``, a head that forward never runs."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.body(x))


class _LateProjection(nn.Module):
    """The last registered linear layer runs first: the last one registered is not the output layer."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.projection = nn.Linear(16, 8)

    def forward(self, x):
        return self.head(torch.relu(self.projection(torch.flatten(x, 1))))


class _NamedLikeAnAdapter(nn.Module):
    """A plain network whose submodules are called ``network`` and ``layer`` (as the adapter's attributes)."""

    def __init__(self):
        super().__init__()
        self.network = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        self.layer = nn.Linear(8, 3)

    def forward(self, x):
        return self.layer(self.network(x))


def _small_images(n=4):
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))


def _batch(n=6):
    return [{"image": _small_images(n), "label": torch.arange(n) % 3}]


@pytest.mark.parametrize("network, message", [
    (nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.Softmax(1)), "is not the output of its last linear layer '1'"),
    (_InPlaceAfter(), "is not the output of its last linear layer 'fc'"),
    (_LateProjection(), "is not the output of its last linear layer 'projection'"),
    (_Tuple(), "_Tuple returns a tuple, not a logits tensor"),
    (_TwoHeads(), "'aux' of _TwoHeads ran 0 times in one forward pass"),
    (nn.Sequential(nn.Linear(4, 3)), r"input of Sequential.0 has shape \(6, 1, 4, 4\); influence needs one feature"),
])
def test_refused_on_the_first_forward_pass_with_the_reason(network, message):
    with pytest.raises(FinalLayerError, match=message):
        collect_features(network, _batch())


def test_softmax_after_a_monai_network_is_refused():
    network = nn.Sequential(_network("ResNet"), nn.Softmax(1)).eval()
    with pytest.raises(FinalLayerError, match=r"not the output of its last linear layer '0.fc' .*e\.g\. a softmax"):
        compute_influence(network, [{"image": _images(4, 0)[0], "label": torch.arange(4) % 3}],
                          [{"image": _images(3, 1)[0], "label": torch.arange(3)}])


def test_a_network_without_a_linear_layer_is_refused():
    network = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(FinalLayerError, match="Sequential has no nn.Linear layer: influence is computed on the final"):
        FinalLayer(network)


def test_a_final_layer_without_bias_is_refused():
    network = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3, bias=False))
    with pytest.raises(FinalLayerError, match="the final layer '3' of Sequential has no bias"):
        FinalLayer(network)


def test_a_named_layer_is_used_and_an_unknown_name_lists_the_linear_layers():
    for network_class in (_TwoHeads, _LateProjection):
        torch.manual_seed(0)
        network = network_class().eval()
        final = FinalLayer(network, layer="head")
        assert final.layer is network.head and final.layer_name == "head"
        images = _small_images()
        features, logits = final(images)
        hidden = network.body(images) if network_class is _TwoHeads else torch.relu(
            network.projection(torch.flatten(images, 1)))
        assert torch.equal(features, hidden) and torch.equal(logits, network(images))
    with pytest.raises(FinalLayerError, match=r"_TwoHeads has no nn.Linear called 'tail'; its linear layers: "
                                              r"\['body.1', 'head', 'aux'\]"):
        FinalLayer(_TwoHeads(), layer="tail")
    with pytest.raises(FinalLayerError, match="has no nn.Linear called 'body.2'"):  # a module, but not linear
        FinalLayer(_TwoHeads(), layer="body.2")


def test_a_module_named_like_the_adapter_is_still_wrapped():
    """``network`` and ``layer`` submodules satisfy the protocol's attribute check; the module is still a network."""
    torch.manual_seed(0)
    network = _NamedLikeAnAdapter().eval()
    assert isinstance(network, LastLayerModel)  # why FinalLayer.of must not trust the protocol for modules
    final = FinalLayer.of(network)
    assert isinstance(final, FinalLayer) and final.layer is network.layer and final.network is network
    features, labels, _ = collect_features(network, _batch())
    assert torch.equal(features, network.network(_small_images(6)))
    adapter = FinalLayer(network)
    assert FinalLayer.of(adapter) is adapter


def test_data_parallel_is_unwrapped_and_gives_the_same_influence():
    network = _network("ResNet")
    wrapped = nn.DataParallel(network)  # on CPU it just calls the module
    final = FinalLayer(wrapped)
    assert final.network is network and final.layer is network.fc and final.layer_name == "fc"
    assert FinalLayer(wrapped, layer="module.fc").layer is network.fc  # the name as the wrapper's state_dict has it
    train, val = _images(8, 6), _images(5, 7)
    batches = (_batches(*train, torch.arange(8)), _batches(*val, torch.arange(5)))
    plain, through = compute_influence(network, *batches), compute_influence(wrapped, *batches)
    assert torch.equal(plain.scores, through.scores) and torch.equal(plain.s, through.s)
    s = plain.s.double()
    assert torch.equal(input_gradients(wrapped, train[0][:3], train[1][:3], s),
                       input_gradients(network, train[0][:3], train[1][:3], s))


@pytest.mark.slow  # a process group and torch.compile's import: seconds
def test_distributed_data_parallel_and_torch_compile_are_unwrapped(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    network = _network("ResNet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(network)
        final = FinalLayer(wrapped)
        assert final.network is network and final.layer is network.fc
    finally:
        dist.destroy_process_group()
    compiled = torch.compile(network)  # wrapping compiles nothing yet
    assert FinalLayer(compiled).network is network and FinalLayer(compiled).layer is network.fc


def test_functional_state_is_what_the_pass_and_its_check_use():
    """ALR runs the network on other tensors (``state``): features, logits and the check all follow them."""
    network = _network("ResNet")
    state = {**dict(network.named_parameters()), **dict(network.named_buffers())}
    state["fc.weight"] = 3.0 * network.fc.weight.detach()
    state["fc.bias"] = network.fc.bias.detach() - 1.0
    images, _ = _images(4, 8)
    with torch.no_grad():
        features, logits = FinalLayer(network)(images, state=state)
        expected = torch.func.functional_call(network, state, (images,))
        plain = network(images)
    assert torch.equal(logits, expected) and not torch.allclose(logits, plain)
    assert torch.equal(features, _independent_features("ResNet", network, images))


def test_under_bf16_autocast_the_check_passes_and_the_features_leave_in_float32():
    """A network trained at bf16 (robustmri.engine.precision) runs its final layer on bf16 inputs and casts only the
    logits back: the adapter's check allows bf16's rounding, hands the features on in float32, and still refuses
    a softmax after the layer."""
    from robustmri.engine.precision import prepare_network

    images, _ = _pool()
    network = prepare_network(PaperCNN(spatial_size=SIZE, padding=2), torch.device("cpu"), "bf16", channels_last=False)
    network.train()
    features, logits = FinalLayer(network)(images[:8])
    assert features.dtype == logits.dtype == torch.float32 and features.shape == (8, network.classifier.in_features)
    reference = nn.functional.linear(features, network.classifier.weight, network.classifier.bias)
    assert 0 < float((logits - reference).abs().max()) < 0.05 * float(reference.abs().max())  # bf16, not float32
    with_softmax = prepare_network(nn.Sequential(PaperCNN(spatial_size=SIZE, padding=2), nn.Softmax(1)),
                                   torch.device("cpu"), "bf16", channels_last=False)
    with_softmax.train()
    with pytest.raises(FinalLayerError, match="not the output of its last linear layer"):
        FinalLayer(with_softmax, layer="0.classifier")(images[:8])
