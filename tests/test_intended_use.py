"""The intended use is one text (``robustmri.INTENDED_USE``), and the docs quote it word for word."""

import re

import pytest

from robustmri import INTENDED_USE

from conftest import ROOT


def test_the_text_says_what_the_model_does_and_does_not():
    for words in ("tumour type", "known to contain", "does not detect tumours", "without a tumour",
                  "not for clinical use"):
        assert words in INTENDED_USE, words


@pytest.mark.parametrize("page", ["README.md", "docs/deployment.md", "bundle/docs/README.md"])
def test_the_docs_quote_it_word_for_word(page):
    text = (ROOT / page).read_text()
    # a Markdown quote wraps the sentence over lines that start with "> "; read it as one line
    quoted = " ".join(" ".join(re.findall(r"^> (.*)$", text, flags=re.MULTILINE)).split())
    assert INTENDED_USE in quoted, page
