"""Progress bars are quiet when the output is not a terminal (logs, CI, this test's captured output)."""

from robustmri.progress import progress


def test_a_bar_is_quiet_off_a_terminal_and_passes_items_through():
    bar = progress(range(5), "work")
    assert bar.disable  # pytest captures the output: not a terminal
    assert list(bar) == [0, 1, 2, 3, 4]


def test_map_in_processes_keeps_the_order_in_one_process_and_in_several():
    from robustmri.progress import map_in_processes

    jobs = list(range(23))
    assert map_in_processes(abs, [-j for j in jobs], workers=1, show=False) == jobs
    assert map_in_processes(abs, [-j for j in jobs], workers=2, show=False, chunksize=3) == jobs
