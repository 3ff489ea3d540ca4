"""The robustmri bundle as the app reads it: one config file and one set of overrides.

Each of the bundle's workflow configs stands alone (written in full, robustmri.engine.configs),
so each task reads one file. The infer task and the review score read ``inference.json``
(``preprocessing``, ``network_def``, ``inferer``, ``postprocessing``, ``checkpoint``), the
review score reads the shared influence settings (``influence_damping``) from ``isp.json``, the
config the train task runs. Every read gets the same overrides, made here and nowhere else
(:func:`bundle_overrides`):

- ``bundle_root``: the bundle folder (``--conf bundle_path``);
- ``checkpoint``: the checkpoint the tasks serve and score with, ``models/model.pt``, or the file
  of ``models/`` named by ``--conf checkpoint`` (:func:`served_checkpoint`; e.g. ``model_site.pt``,
  written by the bundle's ``calibrating`` run for this site); training always writes ``model.pt``;
- ``spatial_size`` and ``network_padding`` as that checkpoint was trained
  (``models/model_metadata.json``, read with ``trained_setting``, the function inference.json
  calls itself), ``train.json``'s defaults when nothing is recorded;
- the ``--conf`` values of :data:`CONF_OVERRIDES`: an explicit value always wins.
"""

from __future__ import annotations

import os
import re

from monai.bundle import ConfigParser

from robustmri.engine.model_metadata import SETTINGS, trained_setting
from robustmri.engine.checkpoint import load_weights

INFER_CONFIG = "inference.json"
TRAIN_CONFIG = "isp.json"
#: The checkpoint training writes, and the one the tasks serve and score with unless ``--conf checkpoint`` names
#: another (``models/``, as MONAI Label expects).
CHECKPOINT = "model.pt"
#: ``--conf`` key: the file of ``models/`` to serve and score with (e.g. ``model_site.pt``).
SERVED_CONF = "checkpoint"
#: A checkpoint file name in ``models/``: no folder part, ``.pt``.
CHECKPOINT_FILE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}\.pt")
#: ``--conf`` keys that override the bundle id of the same name, and their type.
CONF_OVERRIDES = {"spatial_size": int, "network_padding": int, "influence_damping": float}


def config_path(bundle_dir: str, name: str) -> str:
    path = os.path.join(bundle_dir, "configs", name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: bundle config not found (set --conf bundle_path)")
    return path


def conf_overrides(conf: dict) -> dict:
    """Bundle ids given with ``--conf`` (e.g. ``--conf spatial_size 64``), typed."""
    overrides = {}
    for key, kind in CONF_OVERRIDES.items():
        if conf.get(key) not in (None, ""):
            try:
                overrides[key] = kind(conf[key])
            except ValueError as err:
                raise ValueError(f"--conf {key} must be {'an integer' if kind is int else 'a number'}, "
                                 f"got {conf[key]!r}") from err
    return overrides


def served_checkpoint(bundle_dir: str, conf: dict) -> str:
    """The path of the checkpoint the tasks serve: ``models/<--conf checkpoint>``, default ``models/model.pt``.

    A name with a folder part or another suffix is refused in one line (nothing outside ``models/`` is ever
    loaded); a named file that does not exist is refused too, since serving ``model.pt`` instead would
    silently drop the site's calibration."""
    name = conf.get(SERVED_CONF) or CHECKPOINT
    if not isinstance(name, str) or not CHECKPOINT_FILE.fullmatch(name):
        raise ValueError(f"--conf {SERVED_CONF} must be a .pt file name in the bundle's models/ folder "
                         f"(e.g. model_site.pt), got {name!r}")
    path = os.path.join(bundle_dir, "models", name)
    if name != CHECKPOINT and not os.path.isfile(path):
        raise FileNotFoundError(f"--conf {SERVED_CONF} {name}: no such file in {os.path.join(bundle_dir, 'models')}")
    return path


def trained_settings(bundle_dir: str, checkpoint: str | None = None) -> dict:
    """``spatial_size``, ``network_padding`` and ``preprocess`` of ``checkpoint`` (default ``models/model.pt``;
    train.json's defaults without a checkpoint; the preprocessing is never a ``--conf`` option: a model is fed as
    it was trained)."""
    checkpoint = checkpoint or os.path.join(bundle_dir, "models", CHECKPOINT)
    defaults = ConfigParser.load_config_file(config_path(bundle_dir, "train.json"))
    return {key: trained_setting(checkpoint, key, defaults[key]) for key in SETTINGS}


def bundle_overrides(bundle_dir: str, conf: dict) -> dict:
    """The overrides of every config the app reads or runs: bundle root, served checkpoint, trained settings,
    ``--conf``."""
    checkpoint = served_checkpoint(bundle_dir, conf)
    return {"bundle_root": bundle_dir, SERVED_CONF: checkpoint, **trained_settings(bundle_dir, checkpoint),
            **conf_overrides(conf)}


def read_config(bundle_dir: str, name: str, conf: dict, extra: dict | None = None) -> ConfigParser:
    """``configs/<name>``, the bundle metadata and :func:`bundle_overrides` (then ``extra``)."""
    parser = ConfigParser()
    parser.read_config(config_path(bundle_dir, name))
    parser.read_meta(config_path(bundle_dir, "metadata.json"))
    parser.update({**bundle_overrides(bundle_dir, conf), **(extra or {})})
    return parser


def class_names(parser: ConfigParser) -> tuple:
    return tuple(str(name) for name in parser.get_parsed_content("class_names"))


def load_network(parser: ConfigParser, device="cpu"):
    """``network_def`` of ``parser`` with the config's ``checkpoint`` loaded, in eval mode."""
    network = parser.get_parsed_content("network_def", instantiate=True)
    load_weights(network, parser.get_parsed_content("checkpoint"), device)
    return network.to(device).eval()
