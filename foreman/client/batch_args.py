"""`foreman batch`'s arguments: argparse only, so building the parser stays light (see cli.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: list[argparse.ArgumentParser],
    daemon: argparse.ArgumentParser,
    interval: Callable[[str], Any],
) -> None:
    """`foreman batch` and its subcommands."""
    batch = commands.add_parser(
        "batch", help="OpenAI-style batches: submit a JSONL file, follow it, fetch its output"
    )
    sub = batch.add_subparsers(dest="batch_command", required=True, metavar="SUBCOMMAND")
    submit = sub.add_parser(
        "submit", parents=parents, help="upload FILE.jsonl and create a batch of its lines"
    )
    submit.add_argument("file", metavar="FILE.jsonl")
    submit.add_argument(
        "--endpoint",
        help="the batch's endpoint (default: the url of the file's first line, else /v1/chat/completions)",
    )
    submit.add_argument("--wait", action="store_true", help="show progress until the batch ends")
    submit.add_argument(
        "--interval", type=interval, default="0.5s", help="time between checks while waiting (default 0.5s)"
    )
    listing = sub.add_parser("list", parents=parents, help="batches, newest first")
    listing.add_argument("--limit", type=int, default=20, help="how many (1-100, default 20)")
    show = sub.add_parser("show", parents=parents, help="one batch: status, counts, files, times")
    show.add_argument("id", metavar="ID")
    cancel = sub.add_parser("cancel", parents=[daemon], help="cancel a batch's waiting lines")
    cancel.add_argument("id", metavar="ID")
    results = sub.add_parser("results", parents=[daemon], help="a batch's output lines (JSONL)")
    results.add_argument("id", metavar="ID")
    results.add_argument("-o", "--output", metavar="FILE", help="write them to FILE instead of stdout")
    results.add_argument("--errors", action="store_true", help="the error file's lines instead")
