"""The client commands: `foreman status`, `jobs`, `job`, `cancel`, `submit` and `watch`.

Each command is a coroutine that talks to the daemon through `Daemon` and
writes to the streams it is given; `layout` decides how things look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

from foreman.client import layout
from foreman.client.daemon import Daemon, DaemonError, Json, Rejected
from foreman.client.progress import Progress
from foreman.client.submit import BadInput, SubmitRequest, from_jsonl, from_prompt
from foreman.job import JobState

Command = Callable[[Daemon, argparse.Namespace, TextIO, TextIO], Awaitable[int]]

# ANSI: cursor to the top left, clear to the end of the line / of the screen, hide and show the cursor.
_HOME, _CLEAR_LINE, _CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"
_HIDE_CURSOR, _SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"

# Up to this many jobs pending, fetching each is cheaper than listing the queue.
_FETCH_EACH = 8


def run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run a client command on its own event loop; returns the process exit code."""
    try:
        return asyncio.run(run_command(args, out, err))
    except KeyboardInterrupt:
        if args.command == "watch":
            return 0  # Ctrl-C is how a watch ends.
        if args.command == "submit":
            print("foreman submit: interrupted; the jobs submitted so far stay in the queue", file=err)
        return 130


async def run_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Run the client command `args.command` against the daemon at `args.host`."""
    try:
        async with Daemon.connect(args.host, args.token) as daemon:
            return await COMMANDS[args.command](daemon, args, out, err)
    except (DaemonError, BadInput) as exc:
        print(f"foreman {args.command}: {exc}", file=err)
        return 1


async def status(daemon: Daemon, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    _show(out, await daemon.status(), args.json, layout.format_status)
    return 0


async def jobs(daemon: Daemon, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    page = await daemon.jobs(state=args.state, model=args.model, limit=args.limit, after=args.after)
    _show(out, page, args.json, layout.format_jobs)
    return 0


async def job(daemon: Daemon, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    _show(out, await daemon.job(args.id), args.json, layout.format_job)
    return 0


async def cancel(daemon: Daemon, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    ended = await daemon.cancel(args.id)
    print(f"{ended['id']} {ended['state']}", file=out)
    return 0


async def submit(daemon: Daemon, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Queue async jobs in order and print their ids; with --wait, follow them and print the results."""
    submissions = _submissions(args)
    accepted: list[tuple[SubmitRequest, Json]] = []
    for submission in submissions:
        try:
            answer = await daemon.submit(submission.endpoint, submission.body, submission.key)
        except Rejected as exc:
            # The rest of a file still goes in; fixing the line and running the file again
            # submits only that line, as the others keep their idempotency keys.
            where = f"{submission.source}: " if submission.source else ""
            print(f"foreman submit: {where}{exc}", file=err)
            continue
        accepted.append((submission, answer))
        if not (args.wait and args.json):
            line = json.dumps(answer) if args.json else layout.format_submission(answer, submission.source)
            out.write(line + "\n")
    failed = len(submissions) - len(accepted)
    if args.wait and accepted:
        out.flush()  # the ids first, in case the wait is cut short
        ids = [answer["id"] for _, answer in accepted]
        ended = await wait_for(daemon, ids, args.interval, Progress(err, len(ids)))
        for submission, answer in accepted:
            view = ended[answer["id"]]
            out.write(
                (json.dumps(view) if args.json else layout.format_outcome(view, submission.source)) + "\n"
            )
            failed += view["state"] != JobState.DONE
    return 1 if failed else 0


async def watch(daemon: Daemon, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """Redraw the status every `--interval` seconds until Ctrl-C (or `--count` frames)."""
    screen = Screen(out)
    frames = 0
    try:
        while True:
            try:
                view = await daemon.status()
            except DaemonError as exc:
                if frames == 0:
                    raise
                # The daemon may be restarting: say so and keep trying.
                frame = f"foreman: {exc}\nretrying every {args.interval:g}s"
            else:
                frame = layout.watch_frame(view, daemon.url, time.strftime("%H:%M:%S"), time.time())
            screen.draw(frame)
            frames += 1
            if args.count is not None and frames >= args.count:
                return 0
            await asyncio.sleep(args.interval)
    finally:
        screen.close()


async def wait_for(daemon: Daemon, ids: list[str], interval: float, progress: Progress) -> dict[str, Json]:
    """Each job's final view, polling every `interval` seconds until all have ended.

    With many jobs pending, a round lists the queue once and fetches only the
    jobs that have left it (the running one, and those that ended since), so
    a batch of 500 costs a few requests a round rather than 500.
    """
    ended: dict[str, Json] = {}
    pending = set(ids)
    try:
        while True:
            queued = await daemon.queued_ids(min(pending)) if len(pending) > _FETCH_EACH else set()
            for job_id in sorted(pending - queued):
                view = await daemon.job(job_id)
                if JobState(view["state"]).terminal:
                    ended[job_id] = view
                    pending.discard(job_id)
            failed = sum(view["state"] != JobState.DONE for view in ended.values())
            progress.update(len(ended) - failed, failed)
            if not pending:
                return ended
            await asyncio.sleep(interval)
    finally:
        progress.close()


class Screen:
    """Frames drawn over each other on a terminal, or appended as snapshots to a file or pipe."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.drawn = False

    def draw(self, frame: str) -> None:
        if self.tty:
            # Overwrite line by line rather than clearing the screen first, which flickers.
            start = _HIDE_CURSOR + "\x1b[2J" + _HOME if not self.drawn else _HOME
            # Cut at the terminal's width: a wrapped line would push the frame off the top.
            width = shutil.get_terminal_size().columns
            lines = "".join(line[:width] + _CLEAR_LINE + "\n" for line in frame.splitlines())
            self.stream.write(start + lines + _CLEAR_BELOW)
        else:
            self.stream.write(frame + "\n\n")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.tty and self.drawn:
            self.stream.write(_SHOW_CURSOR)
            self.stream.flush()


def _show(out: TextIO, data: Json, as_json: bool, render: Callable[[Json, float], str]) -> None:
    out.write((json.dumps(data, indent=2) if as_json else render(data, time.time())) + "\n")


def _submissions(args: argparse.Namespace) -> list[SubmitRequest]:
    if args.file is None:
        return [from_prompt(args.model, args.prompt, generate=args.generate)]
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInput(f"cannot read {path}: {exc}") from exc
    return from_jsonl(path.name, text)


async def batch(daemon: Daemon, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from foreman.client import batch

    return await batch.run(daemon, args, out, err)


COMMANDS: dict[str, Command] = {
    "batch": batch,
    "status": status,
    "jobs": jobs,
    "job": job,
    "cancel": cancel,
    "submit": submit,
    "watch": watch,
}
