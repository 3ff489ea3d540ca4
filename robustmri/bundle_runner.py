"""Run a bundle workflow in this process, the way ``python -m monai.bundle run`` would.

Used by the benchmark to train many methods on one loaded data set: the bundle's configs
stay the single description of each method, and the protocol data (read and resized
once per seed and noise) is handed to every run instead of being read again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import torch
from monai.bundle import ConfigParser

from .evaluation import load_weights
from .metrics import classification_report
from .protocol import ProtocolData
from .sample_predictions import predict_items

#: Targets of the config node that builds the protocol data (plain, or wrapped by N2V).
PROTOCOL_TARGET = "robustmri.protocol.build_protocol"


@contextlib.contextmanager
def working_directory(path: str):
    """Bundle configs refer to each other by paths relative to the bundle folder."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def load_workflow(bundle_dir: str, config_files: Sequence[str], overrides: dict | None = None,
                  drop_handlers: Sequence[str] = ()) -> ConfigParser:
    """Read and merge ``config_files`` (relative to ``bundle_dir``), apply ``overrides`` and
    resolve macros; training handlers whose target ends with a name in ``drop_handlers``
    (e.g. ``"ProgressBar"``) are removed."""
    with working_directory(bundle_dir):
        parser = ConfigParser()
        parser.read_config([os.path.join(bundle_dir, f) for f in config_files])
        parser.update(dict(overrides or {}))
        parser.resolve_macro_and_relative_ids()
    if drop_handlers:
        handlers = parser["train"]["handlers"]
        parser["train"]["handlers"] = [h for h in handlers if not (
            isinstance(h, dict) and str(h.get("_target_", "")).split(".")[-1] in drop_handlers)]
    return parser


def protocol_node(parser: ConfigParser) -> str:
    """The config id of the node that builds the protocol data (``data``, or ``data#data`` for N2V)."""
    for node_id in ("data", "data#data"):
        try:
            node = parser[node_id]
        except KeyError:
            continue
        if isinstance(node, dict) and node.get("_target_") == PROTOCOL_TARGET:
            return node_id
    raise KeyError(f"no config node builds {PROTOCOL_TARGET} (looked at 'data' and 'data#data')")


def protocol_arguments(parser: ConfigParser) -> dict:
    """The resolved arguments of the protocol node: identical for runs that must share data."""
    node = protocol_node(parser)
    return {key: parser.get_parsed_content(f"{node}#{key}") for key in parser[node] if not key.startswith("_")}


def copy_protocol(data: ProtocolData) -> ProtocolData:
    """A copy safe to train on: methods such as ISP rewrite training images."""
    def copy_items(items):
        return [{**item, "image": np.array(item["image"], copy=True)} for item in items]
    return replace(data, train=copy_items(data.train), val=copy_items(data.val), test=copy_items(data.test))


def inject_protocol(parser: ConfigParser, data: ProtocolData) -> None:
    """Replace the protocol node by already built data (a private copy)."""
    parser[protocol_node(parser)] = copy_protocol(data)


def run_training(parser: ConfigParser, bundle_dir: str) -> None:
    """``initialize`` then ``training`` then ``finalize``, as ``monai.bundle run training`` does."""
    with working_directory(bundle_dir):
        for section in ("initialize", "training", "finalize"):
            if section in parser:
                parser.get_parsed_content(section, lazy=True)


def evaluate_checkpoints_on(network: torch.nn.Module, checkpoints: dict[str, str], items: list[dict],
                            class_names) -> dict[str, dict]:
    """Classification report per checkpoint tag on ``items`` (the run's own test split)."""
    device = next(network.parameters()).device
    reports = {}
    for tag, path in checkpoints.items():
        load_weights(network, path, device)
        logits, labels, _ = predict_items(network, items, device=device)
        reports[tag] = classification_report(labels.numpy(), torch.softmax(logits, dim=1).numpy(), class_names)
    return reports
