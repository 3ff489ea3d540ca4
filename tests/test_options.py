"""Plain option values from a bundle's command line."""

import numpy as np
import pytest

from robustmri.options import as_flag


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (np.bool_(True), True), (1, True),
                                             (0, False), ("false", False), ("False", False), ("no", False),
                                             ("", False), ("none", False), ("true", True), ("Yes", True)])
def test_flags_from_text_and_values(value, expected):
    assert as_flag(value, "allow_incomplete") is expected


def test_anything_else_is_an_error_naming_the_option():
    with pytest.raises(ValueError, match="allow_incomplete must be true or false, got 'maybe'"):
        as_flag("maybe", "allow_incomplete")
