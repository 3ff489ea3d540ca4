"""Allow-list of the train request: the fields that reach the bundle's settings, and their plain-value patterns.

MONAI Label's stock bundle trainer copies request fields into bundle overrides
(``tracking_uri``, ``tracking_experiment_name``, ``tracking_run_name``, ``max_epochs`` ...), and
MONAI evaluates a bundle value that starts with ``$`` (an expression), resolves ``@`` (a
reference) and ``%`` (a macro naming a file and an id). A request is therefore checked before
any task starts: every field must be one of :data:`TRAIN_FIELDS`, and its value must be of the
field's type and match its plain-value pattern (a list, as clients send the trainer's option
lists back, element by element; no value starting with ``$``, ``%`` or ``@``, no
``#`` of a nested id, nothing but the characters a name, a number or a URI needs). A rejected
request raises :class:`TrainRequestRejected` (HTTP 422) naming the field and the reason, and
nothing of it is evaluated or run.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable

from fastapi import HTTPException

#: A name (experiment, run): letters, digits, ``_ . -`` and spaces, starting with a letter or a digit.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_. -]{0,127}")
#: A tracking URI (``file:///srv/mlruns``, ``http://host:5000``): no ``$ % @ #``, quotes, spaces or brackets.
URI = re.compile(r"[A-Za-z0-9/][A-Za-z0-9_.:/+~-]{0,511}")
#: A checkpoint file name in the bundle's ``models/`` folder (no folder part).
CHECKPOINT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}\.pt")
DEVICE = re.compile(r"cpu|cuda(:[0-9]{1,2})?")
GPUS = re.compile(r"all|[0-9]{1,2}(,[0-9]{1,2}){0,15}")
#: ``tracking`` values besides the server's own settings file (``--conf tracking_settings``).
TRACKING_WORDS = ("", "none", "None", "mlflow")


class TrainRequestRejected(HTTPException, ValueError):
    """A train request field outside the allow-list: HTTP 422 with the field and the reason."""

    def __init__(self, field: str, reason: str):
        super().__init__(status_code=422, detail=f"train request: {field}: {reason}")
        self.field, self.reason = field, reason

    def __str__(self) -> str:
        return self.detail


def _integer(low: int, high: int) -> Callable[[Any], str | None]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
        return None if low <= value <= high else f"must lie in {low}..{high}, got {value}"
    return check


def _number(low: float, high: float) -> Callable[[Any], str | None]:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"must be a number, got {value!r}"
        return None if low <= value <= high else f"must lie in [{low}, {high}], got {value}"
    return check


def _boolean(value) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def _text(pattern: re.Pattern, what: str, optional: bool = False) -> Callable[[Any], str | None]:
    def check(value):
        if isinstance(value, list) and 0 < len(value) <= 16:  # the option lists of config(), sent back as they are
            return next((reason for reason in map(check, value) if reason), None)
        if not isinstance(value, str):
            return f"must be {what} (a string), got {type(value).__name__}"
        if optional and value == "":
            return None
        if value[:1] in ("$", "%", "@"):
            return f"must be a plain value, not a bundle expression or reference (starts with {value[0]!r})"
        if "#" in value:
            return "must be a plain value, not a nested config id ('#')"
        return None if pattern.fullmatch(value) else f"must be {what}, got {value[:80]!r}"
    return check


def train_fields(models: tuple[str, ...]) -> dict[str, Callable[[Any], str | None]]:
    """The train request's allowed fields and the check of each (``None``: accepted, else the reason)."""
    model_pattern = re.compile("|".join(re.escape(m) for m in models))
    return {
        "model": _text(model_pattern, f"one of {', '.join(models)}"),
        "max_epochs": _integer(1, 100_000),
        "influence_epoch": _integer(0, 100_000),
        "val_split": _number(-1.0, 0.99),
        "pretrained": _boolean,
        "multi_gpu": _boolean,
        "force_multi_gpu": _boolean,
        "device": _text(DEVICE, "cpu, cuda or cuda:<index>"),
        "gpus": _text(GPUS, "'all' or comma-separated GPU indices"),
        "run_id": _text(re.compile("run"), "'run' (the bundle's training entry)", optional=True),
        "model_filename": _text(CHECKPOINT_NAME, "a .pt file name in the bundle's models/ folder"),
        "tracking_uri": _text(URI, "a URI", optional=True),
        "tracking_experiment_name": _text(NAME, "a name (letters, digits, '_ . -', spaces)", optional=True),
        "tracking_run_name": _text(NAME, "a name (letters, digits, '_ . -', spaces)", optional=True),
    }


def validate_train_request(request: Any, models: tuple[str, ...], tracking_settings: str = "") -> dict:
    """``request`` if every field is allowed and plain, else raise :class:`TrainRequestRejected`.

    ``tracking`` may be ``mlflow``, ``none`` or empty, or the server's own tracking settings
    file (``tracking_settings``, from ``--conf tracking_settings``): a client cannot name a file
    whose ``$`` expressions MONAI would evaluate.
    """
    if request is None:
        return {}
    if not isinstance(request, dict):
        raise TrainRequestRejected("body", f"must be a JSON object, got {type(request).__name__}")
    fields = train_fields(models)
    for field, value in request.items():
        if field == "tracking":
            allowed = (*TRACKING_WORDS, *((tracking_settings,) if tracking_settings else ()))
            values = value if isinstance(value, list) and 0 < len(value) <= 16 else [value]
            for item in values:
                if not isinstance(item, str) or item not in allowed:
                    shown = ", ".join(repr(v) for v in allowed if v)
                    raise TrainRequestRejected(field, f"must be one of {shown}, got {str(item)[:80]!r}")
            continue
        check = fields.get(field)
        if check is None:
            raise TrainRequestRejected(field, f"not an accepted field (accepted: {', '.join(sorted([*fields, 'tracking']))})")
        reason = check(value)
        if reason:
            raise TrainRequestRejected(field, reason)
    return request
