"""A progress bar for a command that waits on many jobs: redrawn in place on a terminal, lines in a pipe.

`foreman submit --wait` and `foreman batch submit --wait` use it the same way:

    progress = Progress(sys.stderr, total=len(ids))
    try:
        while ...:
            progress.update(done, failed)
    finally:
        progress.close()

Only the stream is written to, and time comes from `clock`, so a test can drive it as it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

_CLEAR_LINE = "\x1b[K"  # ANSI: clear to the end of the line
_WIDTH = 30


def bar(done: int, failed: int, total: int, elapsed: float, width: int = _WIDTH) -> str:
    """`[#########---------------------] 9 done, 1 failed of 30  2.5/s  8.0s left`

    The rate is of finished jobs (done or failed) since the wait began; time
    left is what that rate needs for the rest, unknown (`-`) until one finishes.
    """
    finished = done + failed
    filled = width * finished // total if total else width
    counts = f"{done} done" + (f", {failed} failed" if failed else "") + f" of {total}"
    return f"[{'#' * filled}{'-' * (width - filled)}] {counts}  {_rate_and_left(finished, total, elapsed)}"


def line(done: int, failed: int, total: int, elapsed: float) -> str:
    """The same as `bar`, without the bar: what a pipe or a log file gets, one line per change."""
    finished = done + failed
    counts = f"{finished}/{total} finished: {done} done" + (f", {failed} failed" if failed else "")
    return f"{counts}  {_rate_and_left(finished, total, elapsed)}"


def _rate_and_left(finished: int, total: int, elapsed: float) -> str:
    if finished == 0 or elapsed <= 0:
        return "-/s  - left"
    rate = finished / elapsed
    return f"{rate:.1f}/s  {_duration((total - finished) / rate)} left"


def _duration(seconds: float) -> str:
    """`0.4s`, `42s`, `3m05s`, `2h10m`."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes == 0:
        return f"{secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{minutes}m{secs:02d}s" if hours == 0 else f"{hours}h{minutes:02d}m"


class Progress:
    """Progress towards `total` jobs on `stream`: a bar redrawn in place on a terminal, else plain lines.

    On a terminal every update redraws (the rate and time left move even when
    the counts do not); in a pipe a line is written only when the counts change,
    so a log of a long wait stays short.
    """

    def __init__(
        self,
        stream: TextIO,
        total: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ) -> None:
        self.stream = stream
        self.total = total
        self.clock = clock
        self.started = clock()
        self.tty = stream.isatty() if tty is None else tty
        self.counts: tuple[int, int] | None = None

    def update(self, done: int, failed: int = 0) -> None:
        """`done` jobs succeeded and `failed` did not, of `total`."""
        elapsed = self.clock() - self.started
        if self.tty:
            self.stream.write(f"\r{bar(done, failed, self.total, elapsed)}{_CLEAR_LINE}")
        elif (done, failed) != self.counts:
            self.stream.write(line(done, failed, self.total, elapsed) + "\n")
        else:
            return
        self.stream.flush()
        self.counts = (done, failed)

    def close(self) -> None:
        """End the bar's line on a terminal, so what follows starts on a line of its own."""
        if self.tty and self.counts is not None:
            self.stream.write("\n")
            self.stream.flush()
