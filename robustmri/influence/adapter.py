"""What influence needs of a classifier, and the adapter that gets it from any network.

Influence is computed on the final linear layer alone: its weight and bias are the
parameters, and its input (the penultimate features) is all that is cached. So the one
contract is :class:`LastLayerModel`: ``forward(images) -> (features, logits)`` and the
final ``nn.Linear`` as ``layer``, with ``logits == layer(features)``.

:class:`FinalLayer` gives that contract for any classifier whose logits are the output of
one ``nn.Linear``: it finds the network's last registered ``nn.Linear`` (or the one named
``layer``) and captures that layer's input with a forward hook during an ordinary forward
pass. The paper's CNN (``classifier``), MONAI's ``DenseNet121`` (``class_layers.out``),
``ResNet`` (``fc``) and ``EfficientNetBN`` (``_fc``) work unchanged, so every influence method
works through ``network_def`` alone. The first pass checks that the layer's output is the
network's output; a network that applies anything after its last linear layer (a softmax,
another layer) is refused with a message, since the closed forms assume logits.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.func import functional_call


class FinalLayerError(ValueError):
    """The network does not end in one ``nn.Linear`` whose output is its output."""


@runtime_checkable
class LastLayerModel(Protocol):
    """The contract of every influence computation in :mod:`robustmri.influence`."""

    layer: nn.Linear  # the final layer: logits = layer(features)
    network: nn.Module  # the whole classifier (its mode, device and parameters are the caller's)

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [N, d], logits [N, C])`` of one forward pass; gradients flow through both."""
        ...


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside ``DataParallel`` / ``DistributedDataParallel`` wrappers and ``torch.compile``.

    Influence runs the plain module: its hook must see the final layer run, and the wrappers
    add nothing to one forward pass on one device.
    """
    while True:
        if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            network = network.module
        elif isinstance(getattr(network, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            network = network._orig_mod
        else:
            return network


def find_final_linear(network: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """``(name, module)`` of the network's last registered ``nn.Linear``, or of the one called ``name``."""
    linears = [(module_name, module) for module_name, module in network.named_modules()
               if isinstance(module, nn.Linear)]
    if name is not None:
        found = dict(linears).get(name)
        if found is None:
            raise FinalLayerError(f"{type(network).__name__} has no nn.Linear called {name!r}; its linear layers: "
                                  f"{[n for n, _ in linears] or 'none'}")
        return name, found
    if not linears:
        raise FinalLayerError(f"{type(network).__name__} has no nn.Linear layer: influence is computed on the final "
                              "linear layer of a classifier (weights and bias)")
    return linears[-1]


class FinalLayer:
    """Any classifier ending in one ``nn.Linear`` as a :class:`LastLayerModel`.

    ``FinalLayer.of(x)`` returns ``x`` when it already is an adapter, so functions accept either a
    network or an adapter. The adapter holds no state of its own besides the layer found.
    """

    def __init__(self, network: nn.Module, layer: str | None = None):
        wrapped = network
        self.network = unwrap(network)
        if layer is not None and self.network is not wrapped:  # a name as the wrapper's state_dict spells it
            while layer.startswith("module.") and layer not in dict(self.network.named_modules()):
                layer = layer[len("module."):]
        self.layer_name, self.layer = find_final_linear(self.network, layer)
        if self.layer.bias is None:
            raise FinalLayerError(f"the final layer {self.layer_name!r} of {type(self.network).__name__} has no bias: "
                                  "the influence parameters are its weight and bias")
        self._checked = False

    @classmethod
    def of(cls, model: nn.Module | LastLayerModel) -> LastLayerModel:
        """``model`` itself when it is an adapter, else ``FinalLayer(model)``.

        Every ``nn.Module`` is treated as a network and wrapped, even one whose submodules happen
        to be called ``network`` and ``layer`` (it would pass the protocol's attribute check).
        """
        if isinstance(model, FinalLayer) or (not isinstance(model, nn.Module) and isinstance(model, LastLayerModel)):
            return model
        return cls(model)

    def __call__(self, images: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, logits)`` of one forward pass of the network on ``images``.

        ``state`` (parameters and buffers by name) runs the network functionally with them
        (``torch.func.functional_call``), leaving the network's own tensors untouched.
        """
        captured: list[tuple] = []

        def capture(module, args, kwargs, output):
            features = args[0] if args else kwargs.get("input")
            captured.append((features, output, module.weight, module.bias))  # the weights this pass used

        handle = self.layer.register_forward_hook(capture, with_kwargs=True)
        try:
            logits = self.network(images) if state is None else functional_call(self.network, state, (images,))
        finally:
            handle.remove()
        if len(captured) != 1:
            raise FinalLayerError(f"the final layer {self.layer_name!r} of {type(self.network).__name__} ran "
                                  f"{len(captured)} times in one forward pass; expected once (name the output layer "
                                  "with FinalLayer(network, layer=...))")
        features, output, weight, bias = captured[0]
        if not self._checked:
            self._check(features, output, logits, weight, bias)
        if torch.is_tensor(features) and features.is_floating_point() and features.dtype != logits.dtype:
            # a forward under bf16/fp16 autocast (robustmri.engine.precision) hands the layer low-precision inputs
            # and casts only its output back: the features leave in the logits' dtype too
            features = features.to(logits.dtype)
        return features, logits

    def _check(self, features, output, logits, weight, bias) -> None:
        """The layer's input is one vector per image and the network's output is that layer's output.

        The layer is recomputed from its captured input, so a softmax or another layer after it,
        and an in-place change of its output or input after it ran, are all refused.
        """
        network = type(self.network).__name__
        name = f"{network}.{self.layer_name}"
        if not torch.is_tensor(logits):
            raise FinalLayerError(f"{network} returns a {type(logits).__name__}, not a logits tensor: influence needs "
                                  "a classifier whose output is the logits [N, C] of its final nn.Linear")
        if not torch.is_tensor(features) or features.ndim != 2:
            shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise FinalLayerError(f"the input of {name} has shape {shape}; influence needs one feature vector per "
                                  "image ([N, d])")
        with torch.no_grad():
            # in the wider of the two dtypes: under autocast the features are bf16 (or fp16), the weights float32
            wide = torch.promote_types(features.dtype, weight.dtype)
            recomputed = nn.functional.linear(features.to(wide), weight.to(wide), None if bias is None else bias.to(wide))
            same = (logits.shape == output.shape == recomputed.shape
                    and _close(logits, recomputed, features, weight, bias, output))
        if not same:
            raise FinalLayerError(f"the output of {network} is not the output of its last linear layer "
                                  f"{self.layer_name!r} (something follows it, e.g. a softmax): influence needs the "
                                  "logits of one final nn.Linear; name that layer with FinalLayer(network, layer=...)")
        self._checked = True


def _close(logits: torch.Tensor, recomputed: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
           bias: torch.Tensor | None, output: torch.Tensor | None = None) -> bool:
    """Equal up to the rounding of one matrix product run twice (its terms' magnitudes set the scale).

    A layer that ran in a low precision (its input or ``output`` bf16 or fp16, under autocast) rounded its
    weights and its output to that precision: at most about one unit of it of each term's sum, so the
    tolerance is 4 units of the low precision over the terms' largest sum (float32 alone: unchanged)."""
    if not logits.is_floating_point():
        return False
    eps = max(torch.finfo(logits.dtype).eps, torch.finfo(recomputed.dtype).eps)
    low = max(torch.finfo(t.dtype).eps for t in (features, output, logits) if torch.is_tensor(t) and t.is_floating_point())
    wide = torch.promote_types(features.dtype, weight.dtype)
    terms = features.abs().to(wide) @ weight.abs().to(wide).T  # sum_k |h_k w_ck|: what rounding is relative to
    if bias is not None:
        terms = terms + bias.abs().to(wide)
    finite = terms[torch.isfinite(terms)]
    tolerance = (max(16 * eps * math.sqrt(features.shape[1]), 4 * low)
                 * (float(finite.max()) if finite.numel() else 0.0))
    recomputed = recomputed.to(logits.dtype)
    same = ((logits - recomputed).abs() <= tolerance) | (logits == recomputed) | (logits.isnan() & recomputed.isnan())
    return bool(same.all())  # a diverged network's NaN logits are still its final layer's output
