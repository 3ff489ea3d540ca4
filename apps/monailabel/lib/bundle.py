"""The robustmri bundle as the app sees it: merged configs, the network and its weights.

The bundle's inference.json and isp.json sit on top of train.json (they are merged, never
copied), so every task reads the same list of config files and applies the same overrides
(``spatial_size``, ``network_padding``) given with ``--conf``.
"""

import os

from monai.bundle import ConfigParser

import robustmri
from robustmri.evaluation.checkpoints import load_weights

#: train.json first: inference.json and isp.json refer to its ids.
INFER_CONFIGS = ("train.json", "inference.json")
OVERRIDE_KEYS = ("spatial_size", "network_padding")


def bundle_overrides(conf: dict) -> dict:
    """Integer overrides from the app's ``--conf`` (e.g. ``--conf spatial_size 64``)."""
    overrides = {}
    for key in OVERRIDE_KEYS:
        if conf.get(key) not in (None, ""):
            try:
                overrides[key] = int(conf[key])
            except ValueError as err:
                raise ValueError(f"--conf {key} must be an integer, got {conf[key]!r}") from err
    return overrides


def read_bundle_config(bundle_path: str, config_names=INFER_CONFIGS, overrides: dict | None = None) -> ConfigParser:
    paths = [os.path.join(bundle_path, "configs", name) for name in config_names]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"bundle config not found: {', '.join(missing)} (--conf bundle_path {bundle_path})")
    parser = ConfigParser()
    parser.read_config(paths)
    parser.config.update({"bundle_root": bundle_path, **(overrides or {})})
    return parser


def load_network(bundle_path: str, overrides: dict, checkpoint: str = "model.pt", device="cpu"):
    """The bundle's network with ``models/<checkpoint>`` loaded, in eval mode; and the parsed config."""
    parser = read_bundle_config(bundle_path, overrides=overrides)
    network = parser.get_parsed_content("network_def", instantiate=True)
    load_weights(network, os.path.join(bundle_path, "models", checkpoint), device)
    return network.to(device).eval(), parser


def class_names(parser: ConfigParser) -> tuple:
    names = parser.get_parsed_content("class_names")
    return tuple(names) if names else tuple(robustmri.CLASS_NAMES)
