"""foreman's settings: one table, from which the flags, the FOREMAN_* variables, Config and the README come.

Each setting is one field of `Config`, declared with `setting()`: its default
as a person writes it, the parser that reads that text (and so the type), and
its help. The flag is `--` and the name with dashes, the variable `FOREMAN_`
and the name in capitals, unless the entry names others. `cli.py` builds
`foreman serve`'s flags from `SETTINGS`, and a test holds README's
Configuration table to `markdown_table()`.

The parsers that read a setting's text live in `setting_values`. Adding a setting is
one line in `Config`; every duration takes `duration` (or
`positive_duration`), so it reads `90`, `90s`, `15m`, `12h`, `7d` and `1h30m`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foreman.durations import duration, positive_duration
from foreman.job import Priority
from foreman.setting_values import (
    DEFAULT_PORT,
    OLLAMA_PORT,
    Address,
    choice,
    default_db_path,
    names,
    optional,
    optional_keep_alive,
    optional_path,
    origin_list,
    parse_bytes,
    parse_db,
    parse_keep_alive,
    parse_listen,
    parse_upstream,
    parse_webhook_secret,
    positive_int,
    priority,
    webhook_endpoints,
)

# sysexits' EX_CONFIG: systemd's RestartPreventExitStatus stops retrying a
# start that cannot succeed until a person looks.
EXIT_CONFIG = 78


# ---- the table


@dataclass(frozen=True, slots=True)
class Setting:
    """One row of the table: a field of Config, with its flag, variable, default and help."""

    name: str  # the Config field
    parse: Callable[[str], Any]  # the text of the flag or variable → the field's value
    default: str  # as a person writes it; Config's default is parse(default)
    help: str
    flag: str
    env: str
    # Where the default depends on the machine: from the environment and
    # whether stdout is a terminal. `default` then says in words what it is.
    default_from: Callable[[Mapping[str, str], bool], str] | None = None

    def default_text(self, environ: Mapping[str, str], isatty: bool) -> str:
        """The default on this machine, as a flag would give it."""
        return self.default_from(environ, isatty) if self.default_from else self.default


_FROM_TEXT: Any = object()


def setting(
    default: str,
    parse: Callable[[str], Any],
    help: str,
    *,
    flag: str | None = None,
    default_from: Callable[[Mapping[str, str], bool], str] | None = None,
    value: Any = _FROM_TEXT,
    required: bool = False,
) -> Any:
    """Declare a Config field as a setting (see the module docstring).

    `value` is Config's own default where `default` describes one in words;
    `required` leaves Config without one.
    """
    entry = {"default": default, "parse": parse, "help": help, "flag": flag, "default_from": default_from}
    metadata = {"setting": entry}
    if required:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=parse(default) if value is _FROM_TEXT else value, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Config:
    """What `foreman serve` runs with: one field per setting, in the order README lists them."""

    # Required, so that a test or an embedding never writes to the user's own queue by accident.
    # A path is a SQLite file; a postgresql:// URL (a str) is a queue shared with every node given it.
    db_path: Path | str = setting(
        "`$STATE_DIRECTORY/foreman.db` under systemd, else `$XDG_STATE_HOME/foreman/foreman.db`"
        " (`~/.local/state/foreman/foreman.db`)",
        parse_db,
        "the queue: a SQLite file, or a `postgresql://` URL shared by several nodes"
        " (see [Several hosts](several-hosts.md)); any other `scheme://` is refused",
        flag="--db",
        default_from=lambda environ, _: str(default_db_path(environ)),
        required=True,
    )
    node: str | None = setting(
        "",
        optional,
        "this node's name among the nodes sharing a PostgreSQL queue (empty: `hostname:port`)",
    )
    node_timeout: float = setting(
        "15s",
        positive_duration,
        "how long a node may go without a heartbeat before it counts as dead and its running jobs go"
        " back in line (PostgreSQL)",
    )
    listen: Address = setting(
        f"127.0.0.1:{DEFAULT_PORT}",
        parse_listen,
        "listen address, in `OLLAMA_HOST`'s forms (`host:port`, `host`, `:port`, `http://host:port`);"
        " the client commands look for the daemon there",
        flag="--host",
    )
    upstream: str = setting(
        f"http://127.0.0.1:{OLLAMA_PORT}", parse_upstream, "Ollama's base URL (or `host:port`)"
    )
    log_format: str = setting(
        "`console` on a terminal, `json` otherwise",
        choice("console", "json"),
        "log rendering: `console` or `json`",
        default_from=lambda _, isatty: "console" if isatty else "json",
        value="console",
    )
    log_level: str = setting(
        "info", choice("debug", "info", "warning", "error"), "`debug`, `info`, `warning` or `error`"
    )
    max_attempts: int = setting("8", positive_int, "tries per job on transient failures")
    backoff_initial: float = setting("0.5s", duration, "the first backoff step; each step doubles")
    backoff_max: float = setting("30s", duration, "the longest backoff step")
    stall_timeout: float = setting(
        "5m",
        duration,
        "how long Ollama may send nothing (before a reply's first byte or between two chunks) before foreman"
        " gives the request up and retries the job; a swap's load gets its learned load time on top;"
        " `0` waits for ever (see [Reliability](reliability.md#a-wedged-ollama))",
    )
    ollama_restart: str | None = setting(
        "",
        optional,
        "a shell command that restarts Ollama (such as `systemctl restart ollama`), run after"
        " `FOREMAN_RESTART_AFTER_STALLS` stalls in a row, once per incident, then with backoff",
    )
    restart_after_stalls: int = setting(
        "3", positive_int, "stalls in a row after which foreman runs `FOREMAN_OLLAMA_RESTART`"
    )
    # keep_alive values as sent to Ollama: a number of seconds or a duration string.
    pin_keep_alive: float | str = setting(
        "-1",
        parse_keep_alive,
        "`keep_alive` that pins the loaded model while work waits (seconds or a duration like `24h`)",
    )
    # None: a released model gets Ollama's own default (OLLAMA_KEEP_ALIVE), which
    # foreman reads off the first model it loads; a value overrides it.
    release_keep_alive: float | str | None = setting(
        "",
        optional_keep_alive,
        "`keep_alive` a model foreman loaded or pinned ends with when the client gave none; unset, it is"
        " Ollama's own default, which foreman reads off the first model it loads (see [Pinning](how-it-works.md#the-worker))",
    )
    max_body: int = setting(str(32 * 1024 * 1024), positive_int, "largest queued request body, in bytes")
    # Node's fetch gives up on headers after 300 s; an early 200 keeps such clients waiting.
    early_headers: float = setting(
        "1m",
        duration,
        "how long a streaming client waits in the queue before foreman sends 200 and its headers",
    )
    retention: float = setting(
        "7d",
        positive_duration,
        "how long what ended is kept: finished jobs and their output, ended batches and their files,"
        " delivered or given-up webhooks (see [Batches](batches.md#retention))",
    )
    max_wait: float = setting(
        "10m",
        duration,
        "how long a job may wait before its model is served next, even at the cost of a swap (see [Scheduling](scheduling.md))",
    )
    min_residency: float = setting(
        "0s",
        duration,
        "how long a freshly loaded model keeps the worker before the wait bound may swap it away",
    )
    parallel: int = setting(
        "1",
        positive_int,
        "jobs in flight at once, all for the one loaded model; set it to Ollama's `OLLAMA_NUM_PARALLEL`",
    )
    cloud_parallel: int = setting(
        "4",
        positive_int,
        "jobs for cloud models (`:cloud`, `-cloud`) in flight at once, beside the worker; they load nothing here",
    )
    sync_priority: Priority = setting(
        "interactive",
        priority,
        "class of a request that sends no `X-Foreman-Priority` header: `interactive` or `batch`",
    )
    async_priority: Priority = setting(
        "batch",
        priority,
        "class of an async submission (`Prefer: respond-async`) that sends no `X-Foreman-Priority` header",
    )
    warm: str = setting(
        "auto",
        choice("auto", "off"),
        "`auto`: read the next model's blob into the page cache while the loaded one drains,"
        " where foreman can read it; `off`: never",
    )
    sync: str = setting(
        "normal",
        choice("normal", "full"),
        "`normal` survives a crash of foreman; `full` also survives power loss: a job's record is fsynced"
        " before its answer (see [Reliability](reliability.md))",
    )
    loop: str = setting(
        "uvloop",
        choice("uvloop", "asyncio"),
        "the event loop: `uvloop` (libuv's, faster; see [Performance](performance.md)) or `asyncio`"
        " (the standard library's)",
    )
    max_queue: int = setting(
        "100000",
        positive_int,
        'most jobs that may wait at once; beyond it a request gets 503 with Ollama\'s "server busy" wording'
        " and `Retry-After`",
    )
    shutdown_grace: float = setting(
        "30s", duration, "how long running jobs get to finish on SIGTERM before they go back to the queue"
    )
    token: str | None = setting(
        "",
        optional,
        "when set, every endpoint but `/healthz` and the live page's files needs `Authorization: Bearer <token>`; the client commands send it",
    )
    allowed_hosts: tuple[str, ...] = setting(
        "",
        names,
        "comma-separated `Host` names accepted beside those Ollama accepts (see [Who gets in](reliability.md#who-gets-in))",
    )
    origins: tuple[str, ...] = setting(
        "",
        origin_list,
        "comma-separated browser origins allowed beside Ollama's defaults and `OLLAMA_ORIGINS`,"
        " one `*` each, like `OLLAMA_ORIGINS`",
    )
    read_timeout: float = setting(
        "1m", duration, "how long a client may take to send its request body (then 408)"
    )
    routes: Path | None = setting(
        "",
        optional_path,
        "TOML file of model aliases and intent routes; SIGHUP reloads it (see [Model routing](routing.md))",
    )
    # Embeddings (docs/embeddings.md).
    embed_batch: int = setting(
        "64",
        positive_int,
        "most inputs one coalesced `/api/embed` call carries; `1` turns coalescing off (see [Embeddings](embeddings.md))",
    )
    embed_cache: int = setting(
        "512M",
        parse_bytes,
        "bytes of embeddings cached in the database, least recently used out (`K`, `M`, `G`); `0` turns the cache off",
    )
    cache_refresh: float = setting(
        "60s",
        positive_duration,
        "how often Ollama's model list is read for digests changed behind foreman (`90s`, `15m`)",
    )

    # Batches and webhooks (docs/batches.md).
    file_max: int = setting(
        "200M",
        parse_bytes,
        "largest file `POST /v1/files` takes (`K`, `M`, `G`); OpenAI's limit for a batch input file"
        " (see [Batches](batches.md))",
    )
    webhook_url: tuple[tuple[str, str], ...] = setting(
        "",
        webhook_endpoints,
        "comma-separated webhook endpoints, each a URL or `name=URL`, sent signed events when a batch"
        " ends and, for async jobs that name one, when the job ends (see [Webhooks](batches.md#webhooks))",
    )
    webhook_secret: str | None = setting(
        "",
        parse_webhook_secret,
        "the Standard Webhooks key events are signed with: `whsec_` and base64, as OpenAI issues them;"
        " needed with `FOREMAN_WEBHOOK_URL`",
    )
    webhook_backoff: float = setting(
        "5s",
        duration,
        "the wait before a webhook delivery's first retry; it doubles up to an hour, and a delivery is"
        " given up a day after its event",
    )

    def __post_init__(self) -> None:
        if self.webhook_url and self.webhook_secret is None:
            raise ValueError(
                "FOREMAN_WEBHOOK_URL needs FOREMAN_WEBHOOK_SECRET (whsec_ and a base64 key) to sign events"
            )

    @property
    def db_url(self) -> str | None:
        """The PostgreSQL URL of a shared queue; None for a SQLite file."""
        return self.db_path if isinstance(self.db_path, str) else None

    @property
    def db_file(self) -> Path:
        """The SQLite file (only when `db_url` is None)."""
        assert isinstance(self.db_path, Path), "a PostgreSQL queue has no file"
        return self.db_path

    @property
    def host(self) -> str:
        return self.listen.host

    @property
    def port(self) -> int:
        return self.listen.port


def _table() -> tuple[Setting, ...]:
    rows = []
    for field in dataclasses.fields(Config):
        entry = field.metadata["setting"]
        flag = entry["flag"] or "--" + field.name.replace("_", "-")
        rows.append(
            Setting(
                name=field.name,
                parse=entry["parse"],
                default=entry["default"],
                help=entry["help"],
                flag=flag,
                env="FOREMAN_" + flag.removeprefix("--").replace("-", "_").upper(),
                default_from=entry["default_from"],
            )
        )
    return tuple(rows)


SETTINGS = _table()


def config_from(raw: Mapping[str, str]) -> Config:
    """Config from the text of each setting, by field name; raises ValueError naming the setting."""
    values = {}
    for entry in SETTINGS:
        text = raw[entry.name]
        try:
            values[entry.name] = entry.parse(text)
        except ValueError as exc:
            raise ValueError(f"{entry.flag} / {entry.env}={text!r}: {exc}") from None
    return Config(**values)


_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")


def plain(text: str) -> str:
    """A setting's help as a terminal shows it: `see [Several hosts](#several-hosts)` → `see Several hosts`."""
    return _LINK.sub(r"\1", text).replace("`", "")


def unknown_variables(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """Each FOREMAN_* variable that is no setting, with the setting's variable it most looks like.

    A misspelt variable is otherwise silently ignored: FOREMAN_MAX_WIAT=3s
    would leave the wait bound at its default with nothing to say so.
    """
    known = [entry.env for entry in SETTINGS]
    # Compared without the prefix they share, which would make every name look alike.
    suffixes = [name.removeprefix("FOREMAN_") for name in known]

    def nearest(name: str) -> str | None:
        close = difflib.get_close_matches(name.removeprefix("FOREMAN_"), suffixes, n=1, cutoff=0.6)
        return "FOREMAN_" + close[0] if close else None

    return [
        (name, nearest(name)) for name in sorted(environ) if name.startswith("FOREMAN_") and name not in known
    ]


def markdown_table(docs: str = "docs/") -> str:
    """The Configuration table, for README (`docs/`) or a page of the docs site beside the others (`""`).

    The help links to the docs' pages by their file names; `docs` is the path from the table's
    page to them.
    """
    lines = ["| flag / variable | default | meaning |", "|---|---|---|"]
    for entry in SETTINGS:
        shown = f"`{entry.default}`" if entry.default else "none"
        if entry.default_from:  # a default in words
            shown = entry.default
        meaning = _LINK_TARGET.sub(lambda m: f"]({docs}{m.group(1)})", entry.help)
        lines.append(f"| `{entry.flag}` / `{entry.env}` | {shown} | {meaning} |")
    return "\n".join(lines)


_LINK_TARGET = re.compile(r"\]\(([\w-]+\.md(?:#[\w-]+)?)\)")
