"""The abstention state a checkpoint carries beside it: ``<stem>_abstention.pt`` next to ``<stem>.pt``.

``models/model.pt`` has ``models/model_abstention.pt``; a site calibration's ``model_site.pt`` has
``model_site_abstention.pt``. The file is a plain ``torch.save`` of a dict of tensors, numbers and
strings (read back with ``weights_only=True``: loading it runs no code), holding
:class:`AbstentionState`. Its ``checkpoint_sha256`` names the weights it was fitted for, so a state
left beside retrained or recalibrated weights is refused instead of silently applied.
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from robustmri.outputs import write_bytes

#: Suffix added to a checkpoint's stem for its abstention state.
STATE_SUFFIX = "_abstention.pt"
#: Version of the file's layout; a reader refuses other versions.
STATE_VERSION = 1


@dataclass
class AbstentionState:
    """A fitted abstention score and its threshold (higher score = less assessable).

    ``score``: the score's name (a strategy of :mod:`robustmri.abstention`); ``arrays``: its fitted
    parameters by name (float64 arrays); ``threshold``: a slice scoring above it is not assessable;
    ``target_acceptance`` and ``acceptance``: the share of the calibration slices meant to be and
    actually accepted; ``fitted_on`` and ``calibrated_on``: what the parameters and the threshold were
    computed from (``{"kind": "training split" | "validation split" | "site images", "n": int,
    "sha256": digest of the inputs, "date": ISO date}``, no paths and no patient data);
    ``checkpoint_sha256``: the weights it belongs to.
    """

    score: str
    arrays: dict[str, np.ndarray]
    threshold: float
    target_acceptance: float
    acceptance: float
    checkpoint_sha256: str
    fitted_on: dict = field(default_factory=dict)
    calibrated_on: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def accepts(self, scores) -> np.ndarray:
        """Boolean [N]: which scores are assessable (``score <= threshold``)."""
        return np.asarray(scores, dtype=np.float64).reshape(-1) <= self.threshold

    def to_dict(self) -> dict:
        record = dataclasses.asdict(self)
        record["arrays"] = {k: torch.as_tensor(np.asarray(v, dtype=np.float64)) for k, v in self.arrays.items()}
        record["version"] = STATE_VERSION
        return record

    @classmethod
    def from_dict(cls, record: dict) -> AbstentionState:
        record = dict(record)
        version = record.pop("version", None)
        if version != STATE_VERSION:
            raise ValueError(f"abstention state version {version!r} is not {STATE_VERSION}: refit it")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise ValueError(f"abstention state holds unknown fields {unknown}")
        record["arrays"] = {k: torch.as_tensor(v).double().numpy() for k, v in record.get("arrays", {}).items()}
        return cls(**record)


def abstention_path(checkpoint: str | os.PathLike) -> str:
    """``<dir>/<stem>_abstention.pt`` for ``<dir>/<stem>.<ext>``."""
    path = os.fspath(checkpoint)
    stem, _ = os.path.splitext(path)
    return stem + STATE_SUFFIX


def save_state(state: AbstentionState, checkpoint: str | os.PathLike) -> str:
    """Write ``state`` beside ``checkpoint`` atomically; the path written."""
    buffer = io.BytesIO()
    torch.save(state.to_dict(), buffer)
    path = abstention_path(checkpoint)
    write_bytes(path, buffer.getvalue())
    return path


def load_state(checkpoint: str | os.PathLike, checkpoint_sha256: str | None = None) -> AbstentionState | None:
    """The state beside ``checkpoint``, or None when there is none.

    With ``checkpoint_sha256`` (the weights about to be used), a state fitted for other weights raises
    ``ValueError``: applying it would accept or refuse slices by another model's features.
    """
    path = abstention_path(checkpoint)
    if not os.path.isfile(path):
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn or foreign file: say which
        raise ValueError(f"{os.path.basename(path)}: not a readable abstention state ({type(error).__name__})") from error
    if not isinstance(record, dict):
        raise ValueError(f"{os.path.basename(path)}: not an abstention state")
    state = AbstentionState.from_dict(record)
    if checkpoint_sha256 is not None and state.checkpoint_sha256 != checkpoint_sha256:
        raise ValueError(f"{os.path.basename(path)} was fitted for other weights than "
                         f"{os.path.basename(os.fspath(checkpoint))}: refit it")
    return state
