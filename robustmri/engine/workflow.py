"""Run a bundle workflow in this process with MONAI's own ``ConfigWorkflow``.

Used by the benchmark to train many methods on one loaded data set, and by the MONAI Label
app: the bundle's configs stay the single description of each method, MONAI reads, merges,
overrides, checks and runs them exactly as ``python -m monai.bundle run`` does, and the
protocol data (read and resized once per seed and noise) can be handed to every run instead
of being read again.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
from monai.bundle import ConfigWorkflow

from robustmri.data.protocol import ProtocolData

#: The config id of the protocol data (``data`` refers to it; N2V denoises it into ``data``).
PROTOCOL_ID = "protocol"


def load_workflow(bundle_dir: str | os.PathLike, config_files: Sequence[str], overrides: dict | None = None,
                  workflow_type: str | None = "train", drop_handlers: Sequence[str] = ()) -> ConfigWorkflow:
    """MONAI's ``ConfigWorkflow`` of ``config_files`` (relative to ``bundle_dir/configs`` unless absolute).

    ``bundle_root`` is ``bundle_dir`` and ``overrides`` are applied as command-line overrides
    would be; training handlers whose target ends with a name in ``drop_handlers`` (e.g.
    ``"ProgressBar"``) are removed. Nothing is parsed or run yet.
    """
    bundle_dir = os.path.abspath(bundle_dir)
    files = [f if os.path.isabs(f) else os.path.join(bundle_dir, "configs", f) for f in config_files]
    workflow = ConfigWorkflow(config_file=files, meta_file=os.path.join(bundle_dir, "configs", "metadata.json"),
                              logging_file=False, workflow_type=workflow_type,
                              **{"bundle_root": bundle_dir, **dict(overrides or {})})
    if drop_handlers:
        handlers = workflow.parser["train#handlers"]
        workflow.parser["train#handlers"] = [h for h in handlers if not (
            isinstance(h, dict) and str(h.get("_target_", "")).split(".")[-1] in drop_handlers)]
    return workflow


def protocol_arguments(workflow: ConfigWorkflow) -> dict:
    """The resolved arguments of the protocol node: identical for runs that must share data."""
    node = workflow.parser[PROTOCOL_ID]
    return {key: workflow.parser.get_parsed_content(f"{PROTOCOL_ID}#{key}") for key in node if not key.startswith("_")}


def copy_protocol(data: ProtocolData) -> ProtocolData:
    """A copy safe to train on: methods such as ISP rewrite training images."""
    def copy_items(items):
        return [{**item, "image": np.array(item["image"], copy=True)} for item in items]
    return replace(data, train=copy_items(data.train), val=copy_items(data.val), test=copy_items(data.test))


def inject_protocol(workflow: ConfigWorkflow, data: ProtocolData) -> None:
    """Replace the protocol node by already built data (a private copy)."""
    workflow.parser[PROTOCOL_ID] = copy_protocol(data)


def execute(workflow: ConfigWorkflow) -> None:
    """``initialize``, ``run`` and ``finalize``, as ``python -m monai.bundle run`` does."""
    workflow.initialize()
    workflow.run()
    workflow.finalize()
