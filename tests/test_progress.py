"""Progress bars are quiet when the output is not a terminal (logs, CI, this test's captured output)."""

from robustmri.progress import progress


def test_a_bar_is_quiet_off_a_terminal_and_passes_items_through():
    bar = progress(range(5), "work")
    assert bar.disable  # pytest captures the output: not a terminal
    assert list(bar) == [0, 1, 2, 3, 4]
