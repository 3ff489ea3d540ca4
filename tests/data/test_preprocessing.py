"""The library's preprocessing defaults are the product's."""

import inspect
import json

import pytest

from conftest import BUNDLE
from robustmri.data.preprocessing import DEFAULT_PREPROCESS, PREPROCESSING, read_preprocessed
from robustmri.data.protocol import build_protocol
from robustmri.data.transforms import LoadPreprocessd
from robustmri.engine.model_metadata import ModelMetadataWriter, model_metadata
from robustmri.review.label_review import load_images, score_labelled_images


def test_the_default_preprocessing_is_the_one_the_bundle_trains_with():
    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    assert DEFAULT_PREPROCESS == train["preprocess"] and DEFAULT_PREPROCESS in PREPROCESSING


@pytest.mark.parametrize("function, argument", [
    (build_protocol, "preprocess"), (LoadPreprocessd.__init__, "preprocess"), (read_preprocessed, "name"),
    (model_metadata, "preprocess"), (ModelMetadataWriter.__init__, "preprocess"), (load_images, "preprocess"),
    (score_labelled_images, "preprocess")])
def test_public_signatures_default_to_the_products_preprocessing(function, argument):
    assert inspect.signature(function).parameters[argument].default == DEFAULT_PREPROCESS
