import copy
import io
import json

import pytest
import torch
from torch import nn

import robustmri.engine.precision as precision
from robustmri.engine.precision import (
    LOSS_RTOL,
    MIN_SPEEDUP,
    choose,
    full_precision,
    prepare_network,
    resolve_precision,
    trainer_amp,
)
from robustmri.networks import PaperCNN

CPU = torch.device("cpu")
SIZE = 32

#: bf16 against fp32 on the same 5 SGD steps (lr 0.01, 16 images of 32 px): every step's loss within
#: this fraction of the initial fp32 loss (measured here: under 0.6 %) ...
PARITY_LOSS_RTOL = 2e-2
#: ... every final parameter within this absolute difference (measured: 1.1e-3; the weights are ~0.1) ...
PARITY_PARAM_ATOL = 5e-3
#: ... and the distance between the final parameter vectors under this fraction of how far fp32
#: moved them (measured: about 0.2; a bf16 run that did not train, or trained elsewhere, gives >= 1).
PARITY_TRAJECTORY_RTOL = 0.5


def _network(seed=0):
    torch.manual_seed(seed)
    return PaperCNN(spatial_size=SIZE, padding=2)


def _data(n=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, SIZE, SIZE, generator=generator), torch.randint(3, (n,), generator=generator)


def _classifier_input_dtypes(network):
    seen = []
    network.classifier.register_forward_hook(lambda module, args, output: seen.append(args[0].dtype))
    return seen


def _sgd(network, images, labels, steps=5):
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)
    losses = []
    network.train()
    for _ in range(steps):
        optimizer.zero_grad()
        output = network(images)
        assert output.dtype == torch.float32  # outputs come back in float32 whatever the precision
        loss = nn.functional.cross_entropy(output, labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.slow
def test_bf16_training_matches_fp32_within_tolerance():
    images, labels = _data()
    start = torch.cat([p.detach().flatten() for p in _network().parameters()])
    reference = prepare_network(_network(), CPU, "fp32", channels_last=False)
    low = prepare_network(_network(), CPU, "bf16", channels_last=False)
    seen = _classifier_input_dtypes(low)
    losses32, losses16 = _sgd(reference, images, labels), _sgd(low, images, labels)
    assert seen and set(seen) == {torch.bfloat16}  # bf16 really ran, so the comparison means something
    assert losses32[-1] < losses32[0]  # the steps do train
    for l32, l16 in zip(losses32, losses16):
        assert abs(l16 - l32) <= PARITY_LOSS_RTOL * losses32[0], (losses32, losses16)
    for (name, p32), p16 in zip(reference.named_parameters(), low.parameters()):
        assert float((p16 - p32).detach().abs().max()) <= PARITY_PARAM_ATOL, name
    final32 = torch.cat([p.detach().flatten() for p in reference.parameters()])
    final16 = torch.cat([p.detach().flatten() for p in low.parameters()])
    assert float((final16 - final32).norm()) <= PARITY_TRAJECTORY_RTOL * float((final32 - start).norm())


def test_channels_last_output_and_gradients_equal_contiguous():
    images, labels = _data(n=6)
    plain = _network()
    fast = prepare_network(copy.deepcopy(plain), CPU, "fp32", channels_last=True)
    assert fast.robustmri_channels_last and fast.robustmri_precision == "fp32"
    conv = fast.encoder[4]  # the first conv has one input channel: both layouts are the same there
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    outputs = []
    for network in (plain, fast):
        network.zero_grad()
        output = network(images)  # a contiguous input: the prepared forward makes it channels_last
        nn.functional.cross_entropy(output, labels).backward()
        outputs.append(output.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_prepared_forward_makes_inputs_channels_last():
    # several input channels (with one, both layouts are the same tensor and nothing is converted)
    network = prepare_network(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 2)), CPU, "fp32")
    assert network.robustmri_channels_last
    seen = []
    network[0].register_forward_hook(lambda module, args, output: seen.append(args[0]))
    images = torch.rand(2, 3, 8, 8)
    network(images)
    assert images.is_contiguous() and not images.is_contiguous(memory_format=torch.channels_last)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    linear_only = prepare_network(nn.Sequential(nn.Linear(3, 2)), CPU, "fp32")
    assert not linear_only.robustmri_channels_last and "forward" not in linear_only.__dict__


def test_measurement_leaves_parameters_buffers_and_mode_unchanged():
    network = _network()
    network.train()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    measured = precision.measure_cpu(network, (8, 1, SIZE, SIZE), steps=2)
    assert measured["pairs"] >= 1 and measured["fp32_s"] > 0 and measured["bf16_s"] > 0
    assert measured["input_shape"] == (min(8, precision.MEASURE_MAX_BATCH), 1, SIZE, SIZE)
    after = network.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # BatchNorm running stats and num_batches_tracked included
    assert all(p.grad is None for p in network.parameters())
    assert network.training
    assert int(network.encoder[1].num_batches_tracked) == 0


#: :func:`cpu_capabilities` of CPUs without and with native bf16, for the rule.
PLAIN = {"cpu": "Test CPU", "torch_cpu_capability": "AVX2", "amx_bf16": False, "avx512_bf16": False, "bf16": False,
         "sve_bf16": False, "amx_tile": False}
AVX512_BF16 = {**PLAIN, "torch_cpu_capability": "AVX512", "avx512_bf16": True}
AMX = {**AVX512_BF16, "amx_bf16": True, "amx_tile": True}
ARM_BF16 = {**PLAIN, "torch_cpu_capability": "DEFAULT", "bf16": True}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The measurement cache in a fresh folder (never the user's)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "robustmri" / "precision.json"


def _capabilities(monkeypatch, capabilities):
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: dict(capabilities))


def _no_measurement(monkeypatch):
    monkeypatch.setattr(precision, "measure_cpu", lambda *a, **k: pytest.fail("the capabilities decide: no measuring"))


@pytest.mark.parametrize("capabilities, expected, because", [
    (PLAIN, "fp32", "has no native bf16"), (AMX, "bf16", "AMX-BF16 tiles"),
    ({**PLAIN, "amx_bf16": True, "amx_tile": True}, "bf16", "AMX-BF16 tiles")])
def test_the_cpu_capabilities_decide_without_measuring(monkeypatch, cache, capabilities, expected, because):
    _capabilities(monkeypatch, capabilities)
    _no_measurement(monkeypatch)
    choice, why = resolve_precision("auto", CPU, _network(), (8, 1, SIZE, SIZE))
    assert choice == expected and because in why and "Test CPU" in why
    assert not cache.exists()


@pytest.mark.parametrize("capabilities", [AVX512_BF16, ARM_BF16])
def test_undecided_capabilities_are_measured_once_per_machine_and_input(monkeypatch, cache, capabilities):
    _capabilities(monkeypatch, capabilities)
    assert precision.cpu_rule(capabilities)[0] is None
    calls = []
    monkeypatch.setattr(precision, "measure_cpu", lambda network, shape, steps: calls.append(shape) or {
        "input_shape": shape, "pairs": 1, "fp32_s": 0.02, "bf16_s": 0.01, "speedup": 2.0, "fp32_loss": 1.0,
        "bf16_loss": 1.0, "loss_rel_diff": 0.0})
    first, why = resolve_precision("auto", CPU, _network(), (8, 1, SIZE, SIZE))
    assert first == "bf16" and "measured once for this machine" in why and calls == [(8, 1, SIZE, SIZE)]
    entry = next(iter(json.loads(cache.read_text()).values()))
    assert entry["precision"] == "bf16" and entry["measurement"]["speedup"] == 2.0
    # the same command again (another process, a resumed run, a busy moment): the recorded choice, not measured
    again, why = resolve_precision("auto", CPU, _network(), (8, 1, SIZE, SIZE))
    assert again == "bf16" and str(cache) in why and calls == [(8, 1, SIZE, SIZE)]
    resolve_precision("auto", CPU, _network(), (8, 1, 2 * SIZE, 2 * SIZE))  # another input: measured for it
    assert calls == [(8, 1, SIZE, SIZE), (8, 1, 2 * SIZE, 2 * SIZE)] and len(json.loads(cache.read_text())) == 2


def test_the_measured_rule_needs_speed_and_a_matching_loss(monkeypatch, cache):
    _capabilities(monkeypatch, AVX512_BF16)
    network = _network()
    for speedup, loss_diff, expected in [(MIN_SPEEDUP, LOSS_RTOL, "bf16"), (MIN_SPEEDUP * 0.99, 0.0, "fp32"),
                                         (10.0, LOSS_RTOL * 1.01, "fp32")]:
        cache.unlink(missing_ok=True)
        monkeypatch.setattr(precision, "measure_cpu", lambda *a, s=speedup, d=loss_diff, **k: {
            "input_shape": (4, 1, SIZE, SIZE), "pairs": 1, "fp32_s": 0.01, "bf16_s": 0.01 / s, "speedup": s,
            "fp32_loss": 1.0, "bf16_loss": 1.0 + d, "loss_rel_diff": d})
        assert resolve_precision("auto", CPU, network, (4, 1, SIZE, SIZE))[0] == expected


def test_an_unreadable_cache_is_measured_again_and_rewritten(monkeypatch, cache):
    _capabilities(monkeypatch, AVX512_BF16)
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    _patched_step(monkeypatch, 3.0)  # bf16 three times slower
    assert resolve_precision("auto", CPU, _network(), (4, 1, SIZE, SIZE), steps=1)[0] == "fp32"
    assert next(iter(json.loads(cache.read_text()).values()))["precision"] == "fp32"


def test_auto_on_this_machine_is_the_rule_applied_to_its_capabilities(monkeypatch, cache):
    capabilities = precision.cpu_capabilities()
    assert capabilities["cpu"] and capabilities["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    decided, because = precision.cpu_rule(capabilities)
    choice, why = resolve_precision("auto", CPU, _network(), (4, 1, SIZE, SIZE), steps=1)
    if decided is not None:
        assert (choice, why) == (decided, because) and not cache.exists()
    else:
        assert why.startswith(because) and cache.exists()


_REAL_TIMED_STEP = precision._timed_step


def _patched_step(monkeypatch, bf16_time_factor, bf16_loss_factor=1.0):
    real = _REAL_TIMED_STEP

    def timed(network, inputs, targets, dtype):
        seconds, loss = real(network, inputs, targets, dtype)
        if dtype is None:
            return 0.010, loss
        return 0.010 * bf16_time_factor, loss * bf16_loss_factor

    monkeypatch.setattr(precision, "_timed_step", timed)


def test_choose_thresholds():
    assert choose({"speedup": MIN_SPEEDUP, "loss_rel_diff": LOSS_RTOL}) == "bf16"
    assert choose({"speedup": MIN_SPEEDUP * 0.99, "loss_rel_diff": 0.0}) == "fp32"
    assert choose({"speedup": 10.0, "loss_rel_diff": LOSS_RTOL * 1.01}) == "fp32"


@pytest.mark.parametrize("name", ["fp16", "float32", "bf-16", "", None, 32])
def test_invalid_precision_names_raise(name):
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision(name, CPU, _network(), (2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="precision must be one of"):
        prepare_network(_network(), CPU, name)


def test_given_precisions_are_returned_and_undecided_auto_without_shape_is_fp32(monkeypatch, cache):
    _no_measurement(monkeypatch)
    assert resolve_precision("fp32", CPU, _network(), None) == ("fp32", "requested")
    assert resolve_precision("BF16", CPU, _network(), None) == ("bf16", "requested")
    _capabilities(monkeypatch, AVX512_BF16)
    choice, why = resolve_precision("auto", CPU, _network(), None)
    assert choice == "fp32" and "nothing to measure" in why


def test_cuda_choices_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 9000")
    cuda = torch.device("cuda:0")
    monkeypatch.setattr(precision, "_cuda_has_bf16", lambda device: False)
    with pytest.raises(ValueError, match=r"cuda:0 \(Fake GPU 9000\)"):
        resolve_precision("bf16", cuda, _network(), None)
    assert resolve_precision("auto", cuda, _network(), None) == (
        "fp16", "cuda:0 (Fake GPU 9000) has no native bf16: fp16 with the trainer's GradScaler")
    assert resolve_precision("fp32", cuda, _network(), None)[0] == "fp32"
    monkeypatch.setattr(precision, "_cuda_has_bf16", lambda device: True)
    assert resolve_precision("auto", cuda, _network(), None) == ("bf16", "cuda:0 (Fake GPU 9000) has native bf16")
    assert resolve_precision("bf16", cuda, _network(), None)[0] == "bf16"


def test_the_prepared_network_records_the_choice_why_and_what_was_asked(monkeypatch, cache, caplog):
    _capabilities(monkeypatch, PLAIN)
    with caplog.at_level("INFO", logger="robustmri.engine.precision"):
        network = prepare_network(_network(), CPU, "auto", input_shape=(4, 1, SIZE, SIZE))
    assert (network.robustmri_precision, network.robustmri_precision_requested) == ("fp32", "auto")
    assert "has no native bf16" in network.robustmri_precision_reason
    lines = [r.getMessage() for r in caplog.records if "precision" in r.getMessage()]
    assert len(lines) == 1 and "precision fp32 (requested auto: Test CPU" in lines[0]


def test_fp16_is_left_to_the_trainer_amp():
    network = _network()
    network.robustmri_precision = "fp16"
    network.robustmri_channels_last = True
    network.forward = precision._PrecisionForward(network)
    assert trainer_amp(network)
    seen = _classifier_input_dtypes(network)
    network.train()(torch.rand(2, 1, SIZE, SIZE))
    assert seen == [torch.float32]  # no autocast of its own: the trainer's autocast + GradScaler run fp16
    for name in ("fp32", "bf16"):
        assert not trainer_amp(prepare_network(_network(), CPU, name))
    assert not trainer_amp(_network())


def test_prepared_network_keeps_its_identity_and_state_dict():
    plain = _network()
    keys = list(plain.state_dict().keys())
    network = _network()
    prepared = prepare_network(network, CPU, "bf16", channels_last=True)
    assert prepared is network and type(prepared) is PaperCNN and isinstance(prepared, PaperCNN)
    assert list(prepared.state_dict().keys()) == keys
    assert prepared.robustmri_precision == "bf16" and prepared.robustmri_channels_last is True
    assert isinstance(prepared.classifier, nn.Linear) and prepared.features(torch.rand(2, 1, SIZE, SIZE)).shape == (
        2, prepared.feature_dim)
    prepared.load_state_dict(plain.state_dict())  # a plain checkpoint loads into a prepared network ...
    fresh = _network(seed=5)
    fresh.load_state_dict(prepared.state_dict())  # ... and the other way round
    for key, value in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_features_and_eval_mode_stay_float32():
    images = torch.rand(3, 1, SIZE, SIZE)
    plain = _network().eval()
    prepared = prepare_network(copy.deepcopy(plain), CPU, "bf16").eval()
    seen = _classifier_input_dtypes(prepared)
    torch.testing.assert_close(prepared(images), plain(images), rtol=1e-5, atol=1e-5)
    assert prepared.features(images).dtype == torch.float32
    prepared.train()
    prepared(images)
    with full_precision(prepared):
        prepared(images)
    prepared(images)
    assert seen == [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]  # features() skips the classifier


def test_deepcopy_and_state_dict_round_trip():
    images = torch.rand(2, 1, SIZE, SIZE)
    original = prepare_network(_network(), CPU, "bf16").eval()
    clone = copy.deepcopy(original)
    assert clone.forward.module is clone and original.forward.module is original
    assert clone.robustmri_precision == "bf16" and clone.robustmri_channels_last
    torch.testing.assert_close(clone(images), original(images))
    with torch.no_grad():
        clone.classifier.bias.add_(1.0)
    assert not torch.allclose(clone(images), original(images))  # the copy runs its own weights
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = _network(seed=3)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.eval()(images), original(images), rtol=1e-5, atol=1e-5)


def test_prepare_again_rewraps_once_and_can_undo():
    network = prepare_network(_network(), CPU, "bf16")
    wrapper = network.forward
    prepare_network(network, CPU, "bf16")
    assert network.forward is not wrapper and network.forward.inner is None  # not wrapped twice
    prepare_network(network, CPU, "fp32", channels_last=False)
    assert "forward" not in network.__dict__ and network.robustmri_precision == "fp32"
    assert network.encoder[0].weight.is_contiguous()
