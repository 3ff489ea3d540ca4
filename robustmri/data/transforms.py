"""The preprocessing of :mod:`robustmri.data.preprocessing` as a MONAI dictionary transform.

The bundle's ``inference.json`` lists it as its ``preprocessing`` (the standard infer id),
and the MONAI Label app reads that id: every file that is classified is read and prepared by
this one transform, exactly as the training images were.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from robustmri.data.preprocessing import DEFAULT_PREPROCESS, preprocessing_by_name, read_preprocessed

ON_ERROR = ("raise", "mark")
#: Key that holds the reason an item could not be read ("" when it was read).
ERROR_KEY = "error"


class LoadPreprocessd(MapTransform):
    """Replace each path under ``keys`` by the network input, a float tensor [1, S, S].

    ``preprocess``: the preprocessing by name (:data:`robustmri.data.preprocessing.PREPROCESSING`),
    the one the model was trained with (``inference.json`` reads it from ``model_metadata.json``).

    ``on_error="raise"`` raises ``ValueError`` naming the file and the problem. ``"mark"``
    keeps a batch going: the image becomes zeros and ``item["error"]`` the reason (it is ""
    for readable files), so that a writer can report the file as not classified instead of
    losing the other files of the batch.
    """

    def __init__(self, keys: KeysCollection, spatial_size: int, on_error: str = "raise",
                 allow_missing_keys: bool = False, preprocess: str = DEFAULT_PREPROCESS):
        super().__init__(keys, allow_missing_keys)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        preprocessing_by_name(preprocess)
        self.spatial_size, self.on_error, self.preprocess = int(spatial_size), on_error, preprocess

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        item = dict(data)
        item.setdefault(ERROR_KEY, "")
        for key in self.key_iterator(item):
            path = str(item[key])
            image, reason = read_preprocessed(path, self.spatial_size, self.preprocess)
            if image is None:
                if self.on_error == "raise":
                    raise ValueError(f"{path}: cannot classify ({reason})")
                item[ERROR_KEY] = reason
                item[key] = torch.zeros(1, self.spatial_size, self.spatial_size)
            else:
                item[key] = torch.from_numpy(image)[None]
        return item
