"""The progress bar of `foreman submit --wait`: counts, rate and time left; redrawn on a terminal, lines in a pipe."""

from __future__ import annotations

import io

from foreman.client.progress import Progress, bar, line
from tests.support.helpers import FakeClock


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_bar_shows_done_failed_total_rate_and_time_left() -> None:
    """After 10 s with 4 of 10 finished (1 failed): 0.4 a second, so 15 s for the other 6."""
    assert bar(3, 1, 10, 10.0, width=10) == "[####------] 3 done, 1 failed of 10  0.4/s  15s left"
    assert bar(0, 0, 10, 2.0, width=10) == "[----------] 0 done of 10  -/s  - left"
    assert bar(10, 0, 10, 4.0, width=10) == "[##########] 10 done of 10  2.5/s  0.0s left"
    assert line(3, 1, 10, 10.0) == "4/10 finished: 3 done, 1 failed  0.4/s  15s left"


def test_on_a_terminal_the_bar_is_redrawn_in_place() -> None:
    """Each update rewrites the one line (the rate moves even when the counts do not); close ends it."""
    clock, stream = FakeClock(), Terminal()
    progress = Progress(stream, 4, clock=clock)
    progress.update(0)
    clock.now += 2
    progress.update(1)
    clock.now += 2
    progress.update(1)
    progress.close()
    frames = stream.getvalue().split("\r")
    assert frames[0] == "" and stream.getvalue().endswith("\n")
    assert [frame.removesuffix("\n").removesuffix("\x1b[K").split("]")[1] for frame in frames[1:]] == [
        " 0 done of 4  -/s  - left",
        " 1 done of 4  0.5/s  6.0s left",
        " 1 done of 4  0.2/s  12s left",
    ]


def test_in_a_pipe_each_change_is_one_plain_line() -> None:
    """No carriage returns or escapes in a pipe, and no line for a poll that changed nothing."""
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(stream, 3, clock=clock)
    for done, failed in ((0, 0), (0, 0), (1, 0), (1, 0), (2, 1)):
        clock.now += 1
        progress.update(done, failed)
    progress.close()
    assert stream.getvalue().splitlines() == [
        "0/3 finished: 0 done  -/s  - left",
        "1/3 finished: 1 done  0.3/s  6.0s left",
        "3/3 finished: 2 done, 1 failed  0.6/s  0.0s left",
    ]
