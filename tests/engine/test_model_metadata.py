"""What a checkpoint was trained with: the record beside it, read back for deployment."""

import json

import pytest
import torch

from robustmri import CLASS_NAMES, INTENDED_USE
from robustmri.data.preprocessing import DESCRIPTIONS
from robustmri.data.protocol import DATA_ENV
from robustmri.engine.model_metadata import (METADATA_FILE, SETTINGS, evaluation_dataset_dir, model_metadata,
                                             read_trained, recorded_dataset_dir, trained_setting,
                                             write_training_data)
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


def test_the_record_states_the_intended_use_whatever_the_bundle_metadata_says(tmp_path):
    _write(tmp_path)  # no bundle metadata at all
    assert json.loads((tmp_path / METADATA_FILE).read_text())["intended_use"] == INTENDED_USE
    stale = model_metadata({"intended_use": "Research only."}, 32, 2, PaperCNN(spatial_size=32, padding=2),
                           CLASS_NAMES)
    assert stale["intended_use"] == INTENDED_USE


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
                                                         for name in ("train.json", "parts/trained_model.json")]))
    parser["ckpt_dir"] = str(tmp_path / "absent")
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    assert {key: parser.get_parsed_content(key) for key in SETTINGS} == {key: train[key] for key in SETTINGS}


def test_a_record_whose_description_differs_from_the_library_is_refused(tmp_path):
    checkpoint = _write(tmp_path, preprocess_description="percentiles 2 to 98")
    with pytest.raises(ValueError, match="preprocessing 'head' described as 'percentiles 2 to 98'"):
        trained_setting(checkpoint, "preprocess", "head")


class _Folder:
    """What the record reads of a data set loaded from a folder (ProtocolData's fields)."""

    def __init__(self, source):
        self.source, self.settings, self.class_names = str(source), {"data_kind": "folder"}, CLASS_NAMES

    def split(self, name):
        return []


def _trained_on(folder, data):
    network = PaperCNN(spatial_size=32, padding=2)
    torch.save(network.state_dict(), folder / "model.pt")
    write_json(folder / METADATA_FILE, model_metadata(None, 32, 2, network, CLASS_NAMES, data=data, preprocess="head"))
    write_training_data(folder, data)
    return folder / "model.pt"


def test_evaluation_uses_the_data_set_the_model_was_trained_on_unless_told_otherwise(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(DATA_ENV, raising=False)
    (tmp_path / "real").mkdir()
    (tmp_path / "other").mkdir()
    checkpoint = _trained_on(tmp_path, _Folder(tmp_path / "real"))
    assert recorded_dataset_dir(checkpoint) == (True, str(tmp_path / "real"))
    assert str(tmp_path) not in (tmp_path / METADATA_FILE).read_text()  # the model metadata travels: no path in it
    with caplog.at_level("WARNING", logger="robustmri.engine.model_metadata"):
        assert evaluation_dataset_dir(checkpoint) == str(tmp_path / "real")
        assert evaluation_dataset_dir(checkpoint, str(tmp_path / "real")) == str(tmp_path / "real")
        assert caplog.records == []  # the same data: nothing to say
        assert evaluation_dataset_dir(checkpoint, str(tmp_path / "other")) == str(tmp_path / "other")
        assert evaluation_dataset_dir(checkpoint, "") == ""  # explicitly the embedded synthetic set
    assert [r.getMessage() for r in caplog.records] == [
        f"{checkpoint} was trained on {tmp_path / 'real'} but this run uses {tmp_path / 'other'} (dataset_dir)",
        f"{checkpoint} was trained on {tmp_path / 'real'} but this run uses the embedded synthetic set (dataset_dir)"]


def test_a_model_trained_on_the_synthetic_set_is_evaluated_on_it_and_a_data_variable_is_named(
        tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(DATA_ENV, raising=False)
    checkpoint = _trained_on(tmp_path, None)
    assert recorded_dataset_dir(checkpoint) == (True, None)
    assert evaluation_dataset_dir(checkpoint) == ""
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with caplog.at_level("WARNING", logger="robustmri.engine.model_metadata"):
        assert evaluation_dataset_dir(checkpoint) == ""  # build_protocol then reads the variable: said here
    assert caplog.records[0].getMessage().endswith(f"this run uses {tmp_path} (${DATA_ENV})")


def test_without_a_recorded_folder_the_given_data_set_is_used_silently(tmp_path, caplog):
    checkpoint = _write(tmp_path)  # a record from before the folder was recorded
    with caplog.at_level("WARNING", logger="robustmri.engine.model_metadata"):
        assert evaluation_dataset_dir(checkpoint) == ""
        assert evaluation_dataset_dir(checkpoint, "elsewhere") == "elsewhere"
        assert evaluation_dataset_dir(tmp_path / "none" / "model.pt", "elsewhere") == "elsewhere"  # no record at all
    assert caplog.records == []
