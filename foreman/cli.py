"""The `foreman` command: `serve` and `demo` run a daemon; the others talk to a running one.

This is the only module that reads sys.argv and os.environ.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foreman import __version__
from foreman.config import (
    DEFAULT_PORT,
    Config,
    client_url,
    default_db_path,
    parse_duration,
    parse_keep_alive,
    parse_listen,
    parse_upstream,
)
from foreman.jobs import MAX_PAGE
from foreman.models import JobState, Priority

DEFAULT_HOST = f"127.0.0.1:{DEFAULT_PORT}"


@dataclass(frozen=True, slots=True)
class Setting:
    """One `foreman serve` flag with its environment variable and default."""

    flag: str
    env: str
    default: str
    parse: Callable[[str], Any]
    help: str


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"must be at least 1, got {number}")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError(f"must not be negative, got {number}")
    return number


def _choice(*choices: str) -> Callable[[str], str]:
    """A parser that takes one of `choices`, in any case."""

    def parse(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"must be {', '.join(choices[:-1])} or {choices[-1]}")
        return value.lower()

    return parse


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _priority(value: str) -> Priority:
    try:
        return Priority(value.lower())
    except ValueError:
        raise ValueError(f"must be one of {', '.join(p.value for p in Priority)}") from None


def serve_settings(environ: Mapping[str, str], isatty: bool) -> list[Setting]:
    return [
        Setting(
            "--host",
            "FOREMAN_HOST",
            DEFAULT_HOST,
            parse_listen,
            "address to listen on, in OLLAMA_HOST's forms",
        ),
        Setting(
            "--upstream", "FOREMAN_UPSTREAM", "http://127.0.0.1:11434", parse_upstream, "Ollama's base URL"
        ),
        Setting(
            "--db",
            "FOREMAN_DB",
            str(default_db_path(environ)),
            os.path.expanduser,
            "SQLite database that holds the queue",
        ),
        Setting(
            "--log-format",
            "FOREMAN_LOG_FORMAT",
            "console" if isatty else "json",
            _choice("console", "json"),
            "console or json (default: console on a terminal, json otherwise)",
        ),
        Setting(
            "--log-level",
            "FOREMAN_LOG_LEVEL",
            "info",
            _choice("debug", "info", "warning", "error"),
            "debug, info, warning or error",
        ),
        Setting(
            "--max-attempts",
            "FOREMAN_MAX_ATTEMPTS",
            "8",
            _positive_int,
            "tries per job before it fails on transient errors",
        ),
        Setting(
            "--backoff-initial",
            "FOREMAN_BACKOFF_INITIAL",
            "0.5",
            _seconds,
            "seconds to wait after the first transient failure",
        ),
        Setting("--backoff-max", "FOREMAN_BACKOFF_MAX", "30", _seconds, "longest wait between tries"),
        Setting(
            "--pin-keep-alive",
            "FOREMAN_PIN_KEEP_ALIVE",
            "-1",
            parse_keep_alive,
            "keep_alive that pins the loaded model while work for it waits",
        ),
        Setting(
            "--release-keep-alive",
            "FOREMAN_RELEASE_KEEP_ALIVE",
            "5m",
            parse_keep_alive,
            "keep_alive that releases the pin when a client gave none (match OLLAMA_KEEP_ALIVE)",
        ),
        Setting(
            "--max-body",
            "FOREMAN_MAX_BODY",
            str(32 * 1024 * 1024),
            _positive_int,
            "largest request body in bytes for queued endpoints",
        ),
        Setting(
            "--retention",
            "FOREMAN_RETENTION",
            "7d",
            parse_duration,
            "how long finished jobs and their output are kept (90s, 15m, 12h, 7d)",
        ),
        Setting(
            "--sync",
            "FOREMAN_SYNC",
            "normal",
            _choice("normal", "full"),
            "normal (survives a crash) or full (and power loss)",
        ),
        Setting(
            "--loop",
            "FOREMAN_LOOP",
            "uvloop",
            _choice("uvloop", "asyncio"),
            "event loop: uvloop (faster) or asyncio (the standard library's)",
        ),
        Setting(
            "--max-queue", "FOREMAN_MAX_QUEUE", "100000", _positive_int, "most jobs that may wait at once"
        ),
        Setting("--token", "FOREMAN_TOKEN", "", str, "bearer token every client must send (off when empty)"),
        Setting(
            "--allowed-hosts",
            "FOREMAN_ALLOWED_HOSTS",
            "",
            _names,
            "comma-separated Host names accepted beside the bind address and localhost",
        ),
        Setting(
            "--origins",
            "FOREMAN_ORIGINS",
            "",
            _names,
            "comma-separated extra CORS origins, like OLLAMA_ORIGINS",
        ),
        Setting(
            "--read-timeout",
            "FOREMAN_READ_TIMEOUT",
            "60",
            _seconds,
            "seconds a client may take to send its body",
        ),
        Setting(
            "--shutdown-grace",
            "FOREMAN_SHUTDOWN_GRACE",
            "30",
            _seconds,
            "seconds running jobs get to finish on SIGTERM before they go back to the queue",
        ),
        Setting(
            "--early-headers",
            "FOREMAN_EARLY_HEADERS",
            "60",
            _seconds,
            "seconds a streaming client waits before foreman sends 200 and starts the stream",
        ),
        Setting(
            "--max-wait",
            "FOREMAN_MAX_WAIT",
            "600",
            _seconds,
            "seconds a job may wait before its model is served next, even at the cost of a swap",
        ),
        Setting(
            "--min-residency",
            "FOREMAN_MIN_RESIDENCY",
            "0",
            _seconds,
            "seconds a loaded model stays before the wait bound may swap it away",
        ),
        Setting(
            "--parallel",
            "FOREMAN_PARALLEL",
            "1",
            _positive_int,
            "jobs in flight at once, all for the one loaded model (match OLLAMA_NUM_PARALLEL)",
        ),
        Setting(
            "--sync-priority",
            "FOREMAN_SYNC_PRIORITY",
            "interactive",
            _priority,
            "class of a request that sends no X-Foreman-Priority: interactive or batch",
        ),
        Setting(
            "--async-priority",
            "FOREMAN_ASYNC_PRIORITY",
            "batch",
            _priority,
            "class of an async submission (Prefer: respond-async) that sends no X-Foreman-Priority",
        ),
        Setting(
            "--warm",
            "FOREMAN_WARM",
            "auto",
            _choice("auto", "off"),
            "read the next model's file into the page cache while the loaded one drains: auto or off",
        ),
    ]


def _add_settings(
    parser: argparse.ArgumentParser, settings: Sequence[Setting], environ: Mapping[str, str]
) -> None:
    for setting in settings:
        raw = environ.get(setting.env, setting.default)
        parser.add_argument(
            setting.flag,
            default=raw,
            metavar=setting.env,
            help=f"{setting.help} [env {setting.env}, default {setting.default}]",
        )


def _parse_settings(
    parser: argparse.ArgumentParser, args: argparse.Namespace, settings: Sequence[Setting]
) -> dict[str, Any]:
    values = {}
    for setting in settings:
        name = setting.flag.removeprefix("--").replace("-", "_")
        raw = getattr(args, name)
        try:
            values[name] = setting.parse(raw)
        except ValueError as exc:
            parser.error(f"{setting.flag} / {setting.env}={raw!r}: {exc}")
    return values


def config_from(values: Mapping[str, Any]) -> Config:
    host, port = values["host"]
    return Config(
        db_path=Path(values["db"]),
        host=host,
        port=port,
        upstream=values["upstream"],
        log_format=values["log_format"],
        log_level=values["log_level"],
        max_attempts=values["max_attempts"],
        backoff_initial=values["backoff_initial"],
        backoff_max=values["backoff_max"],
        pin_keep_alive=values["pin_keep_alive"],
        release_keep_alive=values["release_keep_alive"],
        max_body=values["max_body"],
        early_headers=values["early_headers"],
        retention=values["retention"],
        sync=values["sync"],
        loop=values["loop"],
        max_queue=values["max_queue"],
        token=values["token"] or None,
        allowed_hosts=values["allowed_hosts"],
        origins=values["origins"],
        read_timeout=values["read_timeout"],
        shutdown_grace=values["shutdown_grace"],
        max_wait=values["max_wait"],
        min_residency=values["min_residency"],
        parallel=values["parallel"],
        sync_priority=values["sync_priority"],
        async_priority=values["async_priority"],
        warm=values["warm"],
    )


def build_parser(environ: Mapping[str, str], isatty: bool) -> tuple[argparse.ArgumentParser, list[Setting]]:
    parser = argparse.ArgumentParser(
        prog="foreman", description="A durable, model-aware queue in front of Ollama."
    )
    parser.add_argument("--version", action="version", version=f"foreman {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    settings = serve_settings(environ, isatty)
    serve = commands.add_parser("serve", help="run the daemon in front of Ollama")
    _add_settings(serve, settings, environ)
    demo = commands.add_parser("demo", help="run a stub Ollama and foreman, and watch a mixed workload drain")
    demo.add_argument("--requests", type=_positive_int, default=12, help="how many requests to send")
    demo.add_argument(
        "--load-delay", type=_seconds, default=1.0, help="seconds the stub takes to load a model"
    )
    _add_client_commands(commands, environ)
    return parser, settings


def _page_size(value: str) -> int:
    number = _positive_int(value)
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
        "--interval", type=_seconds, default=0.5, help="seconds between checks while waiting (default 0.5)"
    )

    watch = commands.add_parser(
        "watch", parents=[daemon], help="a live view of the queue draining, until Ctrl-C"
    )
    watch.add_argument("--interval", type=_seconds, default=1.0, help="seconds between refreshes (default 1)")
    watch.add_argument("--count", type=_positive_int, help="stop after this many refreshes")


def _check_submit(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.prompt is not None and not args.model:
        parser.error("submit --prompt needs --model")
    if args.file is not None and (args.model or args.generate):
        parser.error("--model and --generate go with --prompt; in a file each request names its model")


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    environ = os.environ if environ is None else environ
    parser, settings = build_parser(environ, sys.stdout.isatty())
    args = parser.parse_args(argv)
    if args.command == "serve":
        from foreman.serve import serve

        return serve(config_from(_parse_settings(parser, args, settings)))
    if args.command == "demo":
        from foreman.demo import demo

        return demo(requests=args.requests, load_delay=args.load_delay)
    if args.command == "submit":
        _check_submit(parser, args)
    from foreman.ctl import run

    return run(args, sys.stdout, sys.stderr)
