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
    """The network inside ``DataParallel`` / ``DistributedDataParallel`` wrappers."""
    while isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        network = network.module
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

    ``FinalLayer.of(x)`` returns ``x`` when it already is one, so functions accept either a
    network or an adapter. The adapter holds no state of its own besides the layer found.
    """

    def __init__(self, network: nn.Module, layer: str | None = None):
        self.network = unwrap(network)
        self.layer_name, self.layer = find_final_linear(self.network, layer)
        if self.layer.bias is None:
            raise FinalLayerError(f"the final layer {self.layer_name!r} of {type(self.network).__name__} has no bias: "
                                  "the influence parameters are its weight and bias")
        self._checked = False

    @classmethod
    def of(cls, model: nn.Module | LastLayerModel) -> LastLayerModel:
        return model if isinstance(model, LastLayerModel) else cls(model)

    def __call__(self, images: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, logits)`` of one forward pass of the network on ``images``.

        ``state`` (parameters and buffers by name) runs the network functionally with them
        (``torch.func.functional_call``), leaving the network's own tensors untouched.
        """
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        handle = self.layer.register_forward_hook(lambda module, inputs, output: captured.append((inputs[0], output)))
        try:
            logits = self.network(images) if state is None else functional_call(self.network, state, (images,))
        finally:
            handle.remove()
        if len(captured) != 1:
            raise FinalLayerError(f"the final layer {self.layer_name!r} of {type(self.network).__name__} ran "
                                  f"{len(captured)} times in one forward pass; expected once")
        features, output = captured[0]
        if not self._checked:
            self._check(features, output, logits)
        return features, logits

    def _check(self, features: torch.Tensor, output: torch.Tensor, logits: torch.Tensor) -> None:
        name = f"{type(self.network).__name__}.{self.layer_name}"
        if features.ndim != 2:
            raise FinalLayerError(f"the input of {name} has shape {tuple(features.shape)}; influence needs one feature "
                                  "vector per image ([N, d])")
        if not (logits is output or (logits.shape == output.shape and torch.equal(logits, output))):
            raise FinalLayerError(f"the output of {type(self.network).__name__} is not the output of its last linear "
                                  f"layer {self.layer_name!r} (something follows it, e.g. a softmax): influence needs "
                                  "the logits of one final nn.Linear; name that layer with FinalLayer(network, layer=...)")
        self._checked = True
