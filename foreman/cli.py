"""The `foreman` command: `serve` and `demo` run a daemon; the others talk to a running one.

This is the only module that reads sys.argv and os.environ.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from foreman import __version__
from foreman.config import (
    EXIT_CONFIG,
    SETTINGS,
    Config,
    config_from,
    plain,
    unknown_variables,
)
from foreman.durations import duration
from foreman.job import MAX_PAGE, JobState
from foreman.setting_values import DEFAULT_PORT, client_url, origin_list, positive_int

DEFAULT_HOST = f"127.0.0.1:{DEFAULT_PORT}"


def _add_settings(parser: argparse.ArgumentParser, environ: Mapping[str, str], isatty: bool) -> None:
    """`foreman serve`'s flags, one per row of the settings table; a variable beats the default."""
    for setting in SETTINGS:
        default = setting.default_text(environ, isatty)
        shown = f"default {default}" if default else "unset by default"
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            default=environ.get(setting.env, default),
            metavar=setting.env,
            # argparse reads % as a format; the table's help is Markdown, the terminal wants plain text.
            help=f"{plain(setting.help)} [env {setting.env}, {shown}]".replace("%", "%%"),
        )


def serve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Config from `foreman serve`'s parsed flags; raises ValueError naming a bad setting.

    OLLAMA_ORIGINS, when set in foreman's environment, adds its origins as it does to Ollama's.
    """
    config = config_from({setting.name: getattr(args, setting.name) for setting in SETTINGS})
    raw = environ.get("OLLAMA_ORIGINS", "")
    try:
        extra = origin_list(raw)
    except ValueError as exc:
        raise ValueError(f"OLLAMA_ORIGINS={raw!r}: {exc}") from None
    return dataclasses.replace(config, origins=(*config.origins, *extra))


def build_parser(environ: Mapping[str, str], isatty: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foreman", description="A durable, model-aware queue in front of Ollama."
    )
    parser.add_argument("--version", action="version", version=f"foreman {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the daemon in front of Ollama")
    _add_settings(serve, environ, isatty)
    demo = commands.add_parser("demo", help="run a stub Ollama and foreman, and watch a mixed workload drain")
    demo.add_argument("--requests", type=_arg(positive_int), default=12, help="how many requests to send")
    demo.add_argument(
        "--load-delay",
        type=_arg(duration),
        default="1s",
        help="how long the stub takes to load a model (default 1s)",
    )
    _add_client_commands(commands, environ)
    return parser


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` for argparse, whose message then names the option and says why:
    `argument --limit: must be at least 1, got 0`, not `invalid _page_size value: '0'`."""

    def checked(value: str) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            reason = str(exc)
            if reason.startswith("invalid literal for int()"):
                reason = f"not a whole number: {value!r}"
            raise argparse.ArgumentTypeError(reason) from None

    return checked


@_arg
def _page_size(value: str) -> int:
    number = positive_int(value)
    if number > MAX_PAGE:
        raise ValueError(f"must be at most {MAX_PAGE}, got {number}")
    return number


def _daemon_url(value: str) -> str:
    try:
        return client_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (from --host or FOREMAN_HOST)") from exc


def _add_client_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], environ: Mapping[str, str]
) -> None:
    daemon = argparse.ArgumentParser(add_help=False)
    daemon.add_argument(
        "--host",
        type=_daemon_url,
        default=environ.get("FOREMAN_HOST", DEFAULT_HOST),
        metavar="FOREMAN_HOST",
        help=f"the daemon's address, in OLLAMA_HOST's forms [env FOREMAN_HOST, default {DEFAULT_HOST}]",
    )
    # Sent as a bearer token when set; only from the environment, as a flag would show in `ps`.
    daemon.set_defaults(token=environ.get("FOREMAN_TOKEN") or None)
    raw = argparse.ArgumentParser(add_help=False)
    raw.add_argument("--json", action="store_true", help="print the daemon's JSON as it is")
    both = [daemon, raw]

    commands.add_parser(
        "status", parents=both, help="the queue by model in drain order, the resident model, the running job"
    )
    jobs = commands.add_parser("jobs", parents=both, help="a table of jobs, newest first")
    jobs.add_argument("--state", choices=[state.value for state in JobState], help="only jobs in this state")
    jobs.add_argument("--model", help="only jobs for this model (llama3 means llama3:latest)")
    jobs.add_argument(
        "--limit", type=_page_size, default=20, help=f"how many jobs to show (at most {MAX_PAGE})"
    )
    jobs.add_argument("--after", metavar="ID", help="the page after this job, as a listing's last line says")
    job = commands.add_parser("job", parents=both, help="one job, with its result's text")
    job.add_argument("id", metavar="ID")
    cancel = commands.add_parser(
        "cancel", parents=[daemon], help="cancel a queued job or abort a running one"
    )
    cancel.add_argument("id", metavar="ID")

    submit = commands.add_parser(
        "submit", parents=both, help="queue async jobs from a prompt or a JSONL file and print their ids"
    )
    what = submit.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", metavar="TEXT", help="one prompt for --model, sent to /api/chat")
    what.add_argument(
        "--file",
        metavar="FILE",
        help='JSONL, a request body per line with an optional "endpoint" (default /api/chat);'
        " running the same file again submits nothing twice",
    )
    submit.add_argument("--model", help="the model for --prompt")
    submit.add_argument("--generate", action="store_true", help="send --prompt to /api/generate instead")
    submit.add_argument(
        "--wait", action="store_true", help="show progress until all are done, then the results"
    )
    submit.add_argument(
        "--interval",
        type=_arg(duration),
        default="0.5s",
        help="time between checks while waiting (default 0.5s)",
    )

    from foreman.client.batch_args import add_parser as add_batch_parser

    add_batch_parser(commands, both, daemon, _arg(duration))

    watch = commands.add_parser(
        "watch", parents=[daemon], help="a live view of the queue draining, until Ctrl-C"
    )
    watch.add_argument(
        "--interval", type=_arg(duration), default="1s", help="time between refreshes (default 1s)"
    )
    watch.add_argument("--count", type=_arg(positive_int), help="stop after this many refreshes")


def _check_submit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.prompt is not None and not args.model:
        parser.error("submit --prompt needs --model")
    if args.file is not None and (args.model or args.generate):
        parser.error("--model and --generate go with --prompt; in a file each request names its model")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    try:
        code = _main(argv, environ)
        sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
        return code
    except BrokenPipeError:
        # The reader went away (`foreman jobs | head`): stop quietly, as Unix tools do. Python would
        # otherwise flush stdout again at exit, into the closed pipe, and print a second traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13  # what a shell reports for a command ended by SIGPIPE


def _main(argv: Sequence[str] | None, environ: Mapping[str, str]) -> int:
    parser = build_parser(environ, sys.stdout.isatty())
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            config = serve_config(args, environ)
        except ValueError as exc:
            # One line and EX_CONFIG, like a database foreman refuses: no usage text, no traceback.
            print(f"foreman serve: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        from foreman.serve import serve

        return serve(config, unknown=unknown_variables(environ))
    if args.command == "demo":
        from foreman.demo import demo

        return demo(requests=args.requests, load_delay=args.load_delay)
    if args.command == "submit":
        _check_submit(parser, args)
    from foreman.client.commands import run

    return run(args, sys.stdout, sys.stderr)
