"""Run a network in eval mode for a while and give it back in the mode it was in."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``with eval_mode(model):`` BatchNorm uses its running statistics, dropout is off; the
    model's previous mode (training or not) is restored afterwards, also on an error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
