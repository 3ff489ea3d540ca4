"""What a checkpoint was trained with: the record beside it, read back for deployment."""

import json

import pytest
import torch

from robustmri import CLASS_NAMES
from robustmri.data.preprocessing import DESCRIPTIONS
from robustmri.engine.model_metadata import METADATA_FILE, SETTINGS, model_metadata, read_trained, trained_setting
from robustmri.networks import PaperCNN
from robustmri.outputs import write_json

from conftest import BUNDLE


def _write(folder, **changes):
    network = PaperCNN(spatial_size=32, padding=2)
    torch.save(network.state_dict(), folder / "model.pt")
    record = model_metadata(None, 32, 2, network, CLASS_NAMES, preprocess="head")
    record["trained_with"].update(changes)
    record["trained_with"] = {k: v for k, v in record["trained_with"].items() if v is not None}
    write_json(folder / METADATA_FILE, record)
    return folder / "model.pt"


def test_the_record_names_the_preprocessing_and_describes_it(tmp_path):
    checkpoint = _write(tmp_path)
    record = json.loads((tmp_path / METADATA_FILE).read_text())["trained_with"]
    assert record["preprocess"] == "head" and record["preprocess_description"] == DESCRIPTIONS["head"]
    assert trained_setting(checkpoint, "preprocess", "head") == "head"
    with pytest.raises(ValueError, match="unknown preprocessing 'square'"):
        model_metadata(None, 32, 2, PaperCNN(spatial_size=32, padding=2), CLASS_NAMES, preprocess="square")


def test_records_and_checkpoints_from_before_the_option_mean_minmax(tmp_path):
    # a record written before the option existed: no preprocess, no description
    checkpoint = _write(tmp_path, preprocess=None, preprocess_description=None)
    assert read_trained(checkpoint)["preprocess"] == "minmax"
    # a checkpoint with no record at all was trained with min-max scaling too
    (tmp_path / METADATA_FILE).unlink()
    assert trained_setting(checkpoint, "preprocess", "head") == "minmax"
    # no checkpoint yet (a model still to train, e.g. from MONAI Label): the default the caller passes
    assert trained_setting(tmp_path / "absent" / "model.pt", "preprocess", "head") == "head"


def test_without_a_checkpoint_the_deployment_configs_take_train_json_defaults(tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser(ConfigParser.load_config_files([str(BUNDLE / "configs" / name)
                                                         for name in ("train.json", "trained_model.json")]))
    parser["ckpt_dir"] = str(tmp_path / "absent")
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    assert {key: parser.get_parsed_content(key) for key in SETTINGS} == {key: train[key] for key in SETTINGS}


def test_a_record_whose_description_differs_from_the_library_is_refused(tmp_path):
    checkpoint = _write(tmp_path, preprocess_description="percentiles 2 to 98")
    with pytest.raises(ValueError, match="preprocessing 'head' described as 'percentiles 2 to 98'"):
        trained_setting(checkpoint, "preprocess", "head")
