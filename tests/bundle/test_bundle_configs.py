"""The bundle's configs as users and the model zoo's CI use them: every method config run from the
repository root with nested overrides, MONAI's property check, a model-zoo style multi-GPU overlay,
and no config copying another by macro."""

import json
import math
import re

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from robustmri.methods import registry
from robustmri.networks import PaperCNN

from conftest import BUNDLE, ROOT
from helpers import EVERY_METHOD, NOISY, TINY, as_kwargs, output_dirs, run_in_process, write_abstention_state

CONFIGS = BUNDLE / "configs"
METHODS = registry()
#: A macro that copies from another file (``"%configs/train.json#train"``), the old way of extending one.
FILE_MACRO = re.compile(r"^%[^#]*\.(json|ya?ml)(#|$)", re.IGNORECASE)


def strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for item in node.values():
            yield from strings(item)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_every_method_runs_from_the_repository_root_with_a_nested_override(method, tmp_path):
    config = (BUNDLE / method.config_path).relative_to(ROOT)  # bundle/configs/<config>
    # --epochs 3 sets every schedule derived from it; the nested id then stops the trainer after 2
    run_in_process("training", config, "--bundle_root", "bundle", *TINY, *NOISY, *EVERY_METHOD, *output_dirs(tmp_path),
                   "--epochs", "3", "--train#trainer#max_epochs", "2", cwd=ROOT)
    history = json.loads((tmp_path / "eval" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert (tmp_path / "models" / "model.pt").is_file()
    if method.summary is not None:
        summary = tmp_path / "eval" / method.summary
        assert summary.is_file(), f"{method.name} did not write {method.summary}"
        if summary.suffix == ".json":
            assert json.loads(summary.read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.json")))
def test_no_config_copies_another_file_by_macro(name):
    assert [s for s in strings(json.loads((CONFIGS / name).read_text())) if FILE_MACRO.match(s)] == []


def test_the_macro_check_finds_the_old_way_of_extending_a_config():
    old_isp = {"train": "%configs/train.json#train", "nested": [{"a": "%train.json#network_def"}], "ok": "%train#x"}
    assert [s for s in strings(old_isp) if FILE_MACRO.match(s)] == ["%configs/train.json#train",
                                                                     "%train.json#network_def"]


#: (config, workflow type): plain training, every method of the registry, inference and site calibration
PROPERTY_CHECKS = list(dict.fromkeys(
    [("train.json", "train")] + [(m.config, "train") for m in METHODS.values()]
    + [("inference.json", "infer"), ("calibrate.json", "infer")]))


@pytest.mark.parametrize("config, workflow_type", PROPERTY_CHECKS, ids=[c for c, _ in PROPERTY_CHECKS])
def test_monai_finds_every_required_property_and_no_wrong_optional_id(config, workflow_type, tmp_path):
    overrides = as_kwargs([*TINY, *NOISY, *EVERY_METHOD, *output_dirs(tmp_path)])
    if workflow_type == "infer":  # an inference workflow loads the checkpoint: an untrained one of this size
        (tmp_path / "models").mkdir()
        network = PaperCNN(in_channels=1, num_classes=3, spatial_size=overrides["spatial_size"],
                           padding=overrides["network_padding"])
        torch.save(network.state_dict(), tmp_path / "models" / "model.pt")
        write_abstention_state(tmp_path / "models" / "model.pt", network, overrides["spatial_size"], "head")
    workflow = ConfigWorkflow(config_file=str(CONFIGS / config), workflow_type=workflow_type, logging_file=False,
                              bundle_root=str(BUNDLE), **overrides)
    workflow.initialize()
    assert workflow.check_properties() == []


#: Shaped like the MONAI model zoo's multi_gpu_train.json (an overlay merged after the training config).
#: The model zoo's trainer line keeps a slice of train#handlers; this bundle's trainer also takes
#: @method_handlers (the method's own handler, which every rank must run), so an overlay for it keeps those.
MULTI_GPU_TRAIN = {
    "device": "$torch.device('cuda:' + os.environ['LOCAL_RANK'])",
    "network": {
        "_target_": "torch.nn.parallel.DistributedDataParallel",
        "module": "$@network_def.to(@device)",
        "device_ids": ["@device"],
    },
    "train#sampler": {"_target_": "DistributedSampler", "dataset": "@train#dataset", "even_divisible": True,
                      "shuffle": True},
    "train#dataloader#sampler": "@train#sampler",
    "train#dataloader#shuffle": False,
    "train#trainer#train_handlers": "$(@train#handlers if dist.get_rank() == 0 else @train#handlers[:2])"
                                    " + @method_handlers",
    "validate#sampler": {"_target_": "DistributedSampler", "dataset": "@validate#dataset", "even_divisible": False,
                         "shuffle": False},
    "validate#dataloader#sampler": "@validate#sampler",
    "validate#evaluator#val_handlers": "$None if dist.get_rank() > 0 else @validate#handlers",
    "initialize": [
        "$import torch.distributed as dist",
        "$dist.is_initialized() or dist.init_process_group(backend='nccl')",
        "$torch.cuda.set_device(@device)",
        "$monai.utils.set_determinism(seed=123)",
    ],
    "run": ["$@train#trainer.run()"],
    "finalize": ["$dist.is_initialized() and dist.destroy_process_group()"],
}


def test_a_model_zoo_multi_gpu_overlay_merges_onto_isp(tmp_path, monkeypatch):
    overlay = tmp_path / "multi_gpu_train.json"
    overlay.write_text(json.dumps(MULTI_GPU_TRAIN, indent=4))
    monkeypatch.chdir(tmp_path)  # neither file is found relative to the working directory
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "isp.json"), str(overlay)])  # --config_file "['<isp.json>','<overlay>']"

    # the overlay's ids, nested ones merged into train.json's nodes rather than replacing them
    assert parser["network#_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert parser["train#sampler#_target_"] == "DistributedSampler"
    assert parser["train#dataloader"] == {"_target_": "DataLoader", "dataset": "@train#dataset",
                                          "batch_size": "@batch_size", "sampler": "@train#sampler", "shuffle": False,
                                          "num_workers": "@num_workers",
                                          "collate_fn": "$robustmri.data.in_memory.collate_batch"}
    assert parser["validate#dataloader#sampler"] == "@validate#sampler"
    assert parser["train#trainer#train_handlers"] == MULTI_GPU_TRAIN["train#trainer#train_handlers"]
    assert parser["train#trainer#max_epochs"] == "@epochs"
    assert parser["initialize"] == MULTI_GPU_TRAIN["initialize"]
    # and still ISP: the shared influence settings and the method's handler
    assert parser["method_handlers"] == ["@isp"]
    assert parser["isp#_target_"] == "robustmri.methods.isp.ISPHandler"
    shared = json.loads((CONFIGS / "parts" / "influence.json").read_text())
    assert parser["influence_epoch"] == shared["influence_epoch"]

    # the training sampler and data loader resolve on one process: torch.distributed is not
    # initialised, so the sampler is told its share (what the process group would tell it)
    parser.update({**as_kwargs(TINY), "bundle_root": str(BUNDLE), "train#sampler#num_replicas": 2,
                   "train#sampler#rank": 0})
    dataset = parser.get_parsed_content("train#dataset")
    sampler = parser.get_parsed_content("train#sampler")
    loader = parser.get_parsed_content("train#dataloader")
    assert loader.sampler is sampler and loader.dataset is dataset
    assert len(sampler) == math.ceil(len(dataset) / 2) < len(dataset)
    assert type(parser.get_parsed_content("isp")).__name__ == "ISPHandler"
