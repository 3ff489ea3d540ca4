"""The series rule: which series match the model's training domain (T1-weighted post-contrast MR)."""

import json

import pytest
from pydicom.dataset import Dataset

from robustmri.deploy.dicom.series_rule import DEFAULT_RULE, METADATA_KEY, SeriesRule, rule_of_model


def header(description="AX T1 POST GD", te="9.5", tr="550", ti=None, agent=None, modality="MR",
           image_type=("ORIGINAL", "PRIMARY", "M", "ND"), sequence="SE"):
    ds = Dataset()
    ds.Modality, ds.SeriesDescription, ds.ImageType, ds.ScanningSequence = modality, description, list(image_type), sequence
    if te is not None:
        ds.EchoTime = te
    if tr is not None:
        ds.RepetitionTime = tr
    if ti is not None:
        ds.InversionTime = ti
    if agent is not None:
        ds.ContrastBolusAgent = agent
    return ds


@pytest.mark.parametrize("kwargs, evidence", [
    ({}, ["post-contrast term in SeriesDescription", "T1-weighted timing (TE 9.5 ms, TR 550 ms)",
          "T1 term in SeriesDescription"]),
    ({"description": "SAG 3D", "agent": "GADOVIST"}, ["ContrastBolusAgent present", "T1-weighted timing (TE 9.5 ms, TR 550 ms)"]),
    ({"description": "Ax T1+C", "te": None, "tr": None}, ["post-contrast term in SeriesDescription",
                                                         "T1 term in SeriesDescription"]),
    ({"description": "MPRAGE POST", "te": "2.3", "tr": "2000", "ti": "900", "sequence": "GR\\IR"},
     ["post-contrast term in SeriesDescription", "T1-weighted timing (TE 2.3 ms, TR 2000 ms, TI 900 ms)",
      "T1 term in SeriesDescription"]),
    ({"description": "AX T1 FLAIR +C", "te": "12", "tr": "2200", "ti": "800", "sequence": "SE\\IR"},
     ["post-contrast term in SeriesDescription", "T1-weighted timing (TE 12 ms, TR 2200 ms, TI 800 ms)",
      "T1 term in SeriesDescription"]),
])
def test_t1_post_contrast_series_match_with_their_evidence(kwargs, evidence):
    assessment = DEFAULT_RULE.assess(header(**kwargs), n_slices=20)
    assert assessment.matches and assessment.reason is None and list(assessment.evidence) == evidence


@pytest.mark.parametrize("kwargs, reason", [
    ({"modality": "CT"}, "Modality CT is not one of ['MR']"),
    ({"image_type": ("DERIVED", "SECONDARY", "MPR")}, "ImageType is DERIVED (a localiser, reformat or map)"),
    ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "ImageType is LOCALIZER"),
    ({"description": "AX DWI B1000 POST", "sequence": "EP"}, "ScanningSequence is EP (echo-planar"),
    ({"description": "AX T2 FSE POST GD", "te": "95", "tr": "4000"}, "names another sequence or a pre-contrast "
                                                                    "acquisition (rule term 't2')"),
    ({"description": "AX FLAIR POST", "te": "120", "tr": "9000", "ti": "2500"}, "(rule term 'flair')"),
    ({"description": "AX T1 PRE"}, "(rule term 'pre')"),
    ({"description": "AX T1 SE"}, "no sign of contrast: no ContrastBolusAgent and no post-contrast term"),
    ({"description": "AX POST GD", "te": "80", "tr": "3000"}, "timing is not T1-weighted (TE 80 ms, TR 3000 ms; "
                                                              "TE above 30 ms)"),
    ({"description": "AX POST GD", "te": "10", "tr": "4000"}, "TR above 1000 ms"),
    ({"description": "AX POST GD", "te": None, "tr": None}, "no sign of T1 weighting"),
])
def test_other_series_do_not_match_and_say_why(kwargs, reason):
    assessment = DEFAULT_RULE.assess(header(**kwargs))
    assert not assessment.matches and reason in assessment.reason


def test_reasons_never_quote_the_description():
    assessment = DEFAULT_RULE.assess(header(description="T2 Mueller-Xu Zoë"))
    assert not assessment.matches and "Mueller" not in assessment.reason and "Zoë" not in assessment.reason


def test_ranking_prefers_evidence_then_slices_then_series_number():
    rule = DEFAULT_RULE
    a = ("a", rule.assess(header(), 20), 5, "1.1")
    b = ("b", rule.assess(header(agent="GD"), 10), 4, "1.2")  # one more signal
    c = ("c", rule.assess(header(), 30), 6, "1.3")  # more slices than a
    d = ("d", rule.assess(header(), 30), 7, "1.4")  # same as c, later series
    assert SeriesRule.rank([a, b, c, d]) == ["b", "d", "c", "a"]


def test_rule_is_plain_data_and_round_trips():
    changed = SeriesRule.from_dict({"max_repetition_time_ms": 800, "modalities": ["mr"]})
    assert changed.modalities == ("MR",) and changed.max_repetition_time_ms == 800
    assert SeriesRule.from_json(changed.to_json()) == changed and changed != DEFAULT_RULE
    assert json.loads(DEFAULT_RULE.to_json())["name"] == "T1-weighted post-contrast MR"
    assert rule_of_model({METADATA_KEY: changed.to_json()}) == (changed, "the model's metadata")
    assert rule_of_model({})[0] == DEFAULT_RULE and "default" in rule_of_model({})[1]


@pytest.mark.parametrize("values, message", [
    ({"max_tr": 5}, "unknown key(s) ['max_tr']"),
    ({"t1_terms": "(unclosed"}, "t1_terms is not a valid regular expression"),
    ({"max_echo_time_ms": -1}, "max_echo_time_ms must be a positive number"),
    ({"modalities": "MR"}, "modalities must be a list of strings"),
])
def test_invalid_rules_are_refused_with_the_key(values, message):
    with pytest.raises(ValueError, match="series rule: ") as err:
        SeriesRule.from_dict(values)
    assert message in str(err.value)
