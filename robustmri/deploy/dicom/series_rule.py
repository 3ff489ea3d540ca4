"""Which series of a study match the model's training domain: a configurable rule, recorded with the model.

The classifier was trained on 2-D T1-weighted post-contrast MR slices. No single DICOM attribute
says "T1 post-contrast", so :class:`SeriesRule` weighs the signals that scanners fill:

* ``Modality`` must be one of :attr:`SeriesRule.modalities`;
* ``ImageType`` must not contain an excluded value (``LOCALIZER``, ``DERIVED``: scouts, reformats,
  subtractions, maps);
* ``ScanningSequence`` must not contain an excluded value (``EP``: echo-planar, i.e. diffusion and
  perfusion);
* ``SeriesDescription`` must not name another sequence (T2, FLAIR, DWI, ADC, a pre-contrast
  acquisition, a localiser, ...; :attr:`SeriesRule.other_sequence`);
* **contrast**: ``ContrastBolusAgent`` is present, or ``SeriesDescription`` has a post-contrast term;
* **T1 weighting**: by timing when ``EchoTime`` and ``RepetitionTime`` are present (TE at most
  :attr:`~SeriesRule.max_echo_time_ms` and TR at most :attr:`~SeriesRule.max_repetition_time_ms`, or,
  with an ``InversionTime`` below :attr:`~SeriesRule.max_inversion_time_ms` (MPRAGE, T1-FLAIR), TR at
  most :attr:`~SeriesRule.max_inversion_repetition_time_ms`); timing that contradicts T1 weighting
  rules the series out whatever its description says; without timing, a T1 term in the description.

A series matches when it passes every check; its *evidence* is the number of independent positive
signals (contrast agent attribute, contrast term, T1 term, T1 timing). :meth:`SeriesRule.rank`
orders the matching series of one study: most evidence, then most slices, then the highest
SeriesNumber (post-contrast series come after the pre-contrast ones), then the UID.

The rule is plain data (:meth:`SeriesRule.to_json` / :meth:`SeriesRule.from_json`): the bundle's
``series_rule`` option holds it, export writes it into the ONNX metadata, and DICOM inference uses
the model's rule unless the operator gives another, which the reports then say. Reasons name
attributes, the rule's own terms and numbers from the header; they never quote free text of the
header (a SeriesDescription can hold a patient's name).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Sequence

#: The metadata key of the exported model that holds the rule (JSON of :meth:`SeriesRule.to_json`).
METADATA_KEY = "series_rule"


def _words(*terms: str) -> str:
    """A case-insensitive pattern matching any of ``terms`` as whole words (letters and digits)."""
    return r"(?<![a-z0-9])(?:" + "|".join(terms) + r")(?![a-z0-9])"


@dataclass(frozen=True)
class SeriesRule:
    """A series of the model's training domain (default: T1-weighted post-contrast MR); see the module doc."""

    name: str = "T1-weighted post-contrast MR"
    modalities: tuple[str, ...] = ("MR",)
    excluded_image_types: tuple[str, ...] = ("LOCALIZER", "DERIVED")
    excluded_scanning_sequences: tuple[str, ...] = ("EP",)
    other_sequence: str = _words("t2", "t2w", "t2\\*", "flair", "dwi", "diffusion", "adc", "trace", "dti", "swi",
                                 "pd", "stir", "perf", "perfusion", "dsc", "dce", "tof", "mra", "loc", "localiser",
                                 "localizer", "scout", "survey", "pre", "precontrast", "pre-contrast", "non-contrast",
                                 "noncontrast", "without")
    #: T1-FLAIR is T1-weighted: this term, when present, lifts "flair" from :attr:`other_sequence`.
    t1_flair: str = _words("t1 ?flair", "t1flair", "t1-flair")
    contrast_terms: str = (_words("post", "postcontrast", "post-contrast", "gad", "gado", "gadolinium", "gd",
                                  "contrast", "ce", "c\\+", "enh", "enhanced", "mdc") + r"|\+ ?c(?![a-z0-9])|\+ ?gd")
    t1_terms: str = _words("t1", "t1w", "t1-w", "mprage", "mp-rage", "bravo", "spgr", "fspgr", "vibe", "flash",
                           "tfl", "tfe", "t1-tfe", "3d t1", "t1 ?flair", "t1flair", "t1-flair")
    max_echo_time_ms: float = 30.0
    max_repetition_time_ms: float = 1000.0
    max_inversion_time_ms: float = 1500.0
    max_inversion_repetition_time_ms: float = 3500.0
    _compiled: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("modalities", "excluded_image_types", "excluded_scanning_sequences"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"series rule: {name} must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(v.strip().upper() for v in value))
        compiled = {}
        for name in ("other_sequence", "t1_flair", "contrast_terms", "t1_terms"):
            try:
                compiled[name] = re.compile(getattr(self, name), re.IGNORECASE)
            except (re.error, TypeError) as err:
                raise ValueError(f"series rule: {name} is not a valid regular expression ({err})") from None
        for name in ("max_echo_time_ms", "max_repetition_time_ms", "max_inversion_time_ms",
                     "max_inversion_repetition_time_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"series rule: {name} must be a positive number, got {value!r}")
        object.__setattr__(self, "_compiled", compiled)

    # -- plain data ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self) if f.init}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict | None) -> "SeriesRule":
        """A rule from plain values (missing keys take the defaults); ValueError names an unknown key."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"series rule: unknown key(s) {unknown}; known: {sorted(known)}")
        for name in ("modalities", "excluded_image_types", "excluded_scanning_sequences"):
            if name in values and isinstance(values[name], list):
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> "SeriesRule":
        try:
            values = json.loads(text)
        except ValueError as err:
            raise ValueError(f"series rule: not JSON ({err})") from None
        if not isinstance(values, dict):
            raise ValueError("series rule: expected a JSON object")
        return cls.from_dict(values)

    # -- the decision -------------------------------------------------------------------------
    def assess(self, header, n_slices: int = 0) -> "SeriesAssessment":
        """Whether a series (``header``: one of its datasets) matches, with its evidence or the reason it does not."""
        text = lambda keyword: str(header.get(keyword, "") or "").strip()  # noqa: E731
        modality = text("Modality").upper()
        if self.modalities and modality not in self.modalities:
            return SeriesAssessment(False, f"Modality {modality or '(none)'} is not one of {list(self.modalities)}")
        image_type = {v.strip().upper() for v in _values(header.get("ImageType"))}
        excluded = sorted(image_type & set(self.excluded_image_types))
        if excluded:
            return SeriesAssessment(False, f"ImageType is {'/'.join(excluded)} (a localiser, reformat or map)")
        sequence = {v.strip().upper() for v in _values(header.get("ScanningSequence"))}
        excluded = sorted(sequence & set(self.excluded_scanning_sequences))
        if excluded:
            return SeriesAssessment(False, f"ScanningSequence is {'/'.join(excluded)} (echo-planar: diffusion or "
                                           "perfusion)")
        description = text("SeriesDescription")
        other = [m.group(0).lower() for m in self._compiled["other_sequence"].finditer(description)]
        if other and self._compiled["t1_flair"].search(description):
            other = [term for term in other if term != "flair"]
        if other:
            return SeriesAssessment(False, f"SeriesDescription names another sequence or a pre-contrast "
                                           f"acquisition (rule term {other[0]!r})")
        evidence = []
        if text("ContrastBolusAgent"):
            evidence.append("ContrastBolusAgent present")
        if self._compiled["contrast_terms"].search(description):
            evidence.append("post-contrast term in SeriesDescription")
        if not evidence:
            return SeriesAssessment(False, "no sign of contrast: no ContrastBolusAgent and no post-contrast term in "
                                           "SeriesDescription")
        timing = self._timing(header)
        if timing is not None:
            weighted, numbers = timing
            if not weighted:
                return SeriesAssessment(False, f"timing is not T1-weighted ({numbers})")
            evidence.append(f"T1-weighted timing ({numbers})")
        if self._compiled["t1_terms"].search(description):
            evidence.append("T1 term in SeriesDescription")
        elif timing is None:
            return SeriesAssessment(False, "no sign of T1 weighting: no EchoTime/RepetitionTime and no T1 term in "
                                           "SeriesDescription")
        return SeriesAssessment(True, None, tuple(evidence), n_slices)

    def _timing(self, header) -> tuple[bool, str] | None:
        te, tr = _number(header, "EchoTime"), _number(header, "RepetitionTime")
        if te is None or tr is None:
            return None
        ti = _number(header, "InversionTime")
        numbers = f"TE {te:g} ms, TR {tr:g} ms" + (f", TI {ti:g} ms" if ti else "")
        if te > self.max_echo_time_ms:
            return False, numbers + f"; TE above {self.max_echo_time_ms:g} ms"
        if ti and ti <= self.max_inversion_time_ms:
            limit = self.max_inversion_repetition_time_ms
        else:
            limit = self.max_repetition_time_ms
        if tr > limit:
            return False, numbers + f"; TR above {limit:g} ms"
        return True, numbers

    @staticmethod
    def rank(candidates: Sequence[tuple[object, "SeriesAssessment", int, str]]) -> list:
        """``(item, assessment, series_number, uid)`` of matching series, best first (see the module doc)."""
        return [c[0] for c in sorted(candidates, key=lambda c: (-len(c[1].evidence), -c[1].n_slices, -c[2], c[3]))]


@dataclass(frozen=True)
class SeriesAssessment:
    matches: bool
    reason: str | None = None
    evidence: tuple[str, ...] = ()
    n_slices: int = 0


def _values(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.split("\\") if v]
    try:
        return [str(v) for v in value]
    except TypeError:
        return [str(value)]


def _number(header, keyword: str) -> float | None:
    value = header.get(keyword, None)
    try:
        number = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return number if number is not None and number == number and number >= 0 else None


DEFAULT_RULE = SeriesRule()


def rule_of_model(metadata: dict) -> tuple[SeriesRule, str]:
    """The model's rule and where it came from (the model's metadata, or the library default for older models)."""
    text = metadata.get(METADATA_KEY)
    if text:
        return SeriesRule.from_json(text), "the model's metadata"
    return DEFAULT_RULE, "the library's default (the model records no rule)"
