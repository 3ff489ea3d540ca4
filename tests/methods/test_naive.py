"""Plain training: the registry's naive method is train.json itself, with no method handler."""

import json

from robustmri.methods import registry

from conftest import BUNDLE


def test_naive_is_train_json_with_no_method_handler():
    train = json.loads((BUNDLE / "configs" / registry()["naive"].config).read_text())
    assert train["method_handlers"] == [] and train["loss"]["_target_"] == "torch.nn.CrossEntropyLoss"
