"""Flags, FOREMAN_* variables and their defaults become one Config."""

from __future__ import annotations

from pathlib import Path

import pytest

from foreman.cli import build_parser, main, serve_config
from foreman.config import (
    SETTINGS,
    Config,
    markdown_table,
    unknown_variables,
)
from foreman.durations import duration
from foreman.retry import RetryPolicy
from foreman.scheduling.policy import Policy
from foreman.setting_values import client_url, default_db_path, parse_keep_alive, parse_listen, parse_upstream

README = Path(__file__).resolve().parents[2] / "README.md"


def config_for(argv: list[str], environ: dict[str, str]) -> Config:
    args = build_parser(environ, isatty=False).parse_args(["serve", *argv])
    return serve_config(args, environ)


def test_defaults_match_the_documented_ones(tmp_path: Path) -> None:
    """With nothing set, foreman listens on 11435 in front of Ollama on 11434."""
    config = config_for([], {"XDG_STATE_HOME": str(tmp_path)})
    assert (config.host, config.port) == ("127.0.0.1", 11435)
    assert config.upstream == "http://127.0.0.1:11434"
    assert config.db_path == tmp_path / "foreman" / "foreman.db"
    assert config.log_format == "json"  # not a terminal
    assert config.max_attempts == 8 and config.pin_keep_alive == -1 and config.release_keep_alive is None
    assert (config.max_wait, config.min_residency, config.parallel) == (600, 0, 1)
    assert config.sync_priority == "interactive" and config.warm == "auto"


def test_the_command_line_and_config_agree_on_every_default(tmp_path: Path) -> None:
    """The flags' defaults and Config's own (which tests and the demo use) cannot drift apart."""
    config = config_for([], {"XDG_STATE_HOME": str(tmp_path)})
    assert config == Config(db_path=config.db_path, log_format=config.log_format)


def test_scheduling_settings_come_from_flags_and_variables() -> None:
    """FOREMAN_MAX_WAIT, _MIN_RESIDENCY, _PARALLEL, _SYNC_PRIORITY and _WARM reach the Config."""
    environ = {
        "FOREMAN_MAX_WAIT": "120",
        "FOREMAN_MIN_RESIDENCY": "30",
        "FOREMAN_SYNC_PRIORITY": "batch",
        "FOREMAN_WARM": "off",
    }
    config = config_for(["--parallel", "4"], environ)
    assert (config.max_wait, config.min_residency, config.parallel) == (120, 30, 4)
    assert config.sync_priority == "batch" and config.warm == "off"
    with pytest.raises(ValueError, match="FOREMAN_SYNC_PRIORITY"):
        config_for([], {"FOREMAN_SYNC_PRIORITY": "urgent"})


def test_embedding_settings_come_from_flags_and_variables() -> None:
    """FOREMAN_EMBED_BATCH, _EMBED_CACHE (bytes, with K/M/G) and _CACHE_REFRESH reach the Config; bad ones are refused."""
    defaults = config_for([], {})
    assert (defaults.embed_batch, defaults.embed_cache, defaults.cache_refresh) == (64, 512 * 2**20, 60)
    environ = {"FOREMAN_EMBED_BATCH": "1", "FOREMAN_EMBED_CACHE": "2G", "FOREMAN_CACHE_REFRESH": "5m"}
    config = config_for(["--embed-cache", "0"], environ)
    assert (config.embed_batch, config.embed_cache, config.cache_refresh) == (1, 0, 300)
    assert config_for([], {"FOREMAN_EMBED_CACHE": "1048576"}).embed_cache == 2**20
    for name, value in (
        ("FOREMAN_EMBED_BATCH", "0"),
        ("FOREMAN_EMBED_CACHE", "lots"),
        ("FOREMAN_CACHE_REFRESH", "0"),
    ):
        with pytest.raises(ValueError, match=name):
            config_for([], {name: value})


def test_environment_sets_and_flags_override() -> None:
    """FOREMAN_* variables set values; a flag beats its variable."""
    environ = {
        "FOREMAN_HOST": "0.0.0.0:9000",
        "FOREMAN_UPSTREAM": "gpu-box:11434",
        "FOREMAN_MAX_ATTEMPTS": "3",
        "FOREMAN_PIN_KEEP_ALIVE": "24h",
        "FOREMAN_LOG_FORMAT": "console",
        "FOREMAN_DB": "/tmp/q.db",
    }
    config = config_for(["--max-attempts", "5"], environ)
    assert (config.host, config.port) == ("0.0.0.0", 9000)
    assert config.upstream == "http://gpu-box:11434"
    assert config.max_attempts == 5
    assert config.pin_keep_alive == "24h" and config.log_format == "console"
    assert config.db_path == Path("/tmp/q.db")


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"FOREMAN_PIN_KEEP_ALIVE": "forever"}, "FOREMAN_PIN_KEEP_ALIVE"),
        ({"FOREMAN_MAX_WAIT": "3x"}, "FOREMAN_MAX_WAIT"),
        ({"FOREMAN_RETENTION": "0"}, "FOREMAN_RETENTION"),
        ({"FOREMAN_READ_TIMEOUT": "-5s"}, "FOREMAN_READ_TIMEOUT"),
        ({"FOREMAN_PARALLEL": "0"}, "FOREMAN_PARALLEL"),
    ],
)
def test_a_bad_setting_stops_serve_with_one_line_and_exit_78(
    environ: dict[str, str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad value is one line on stderr naming the variable, and EX_CONFIG, before anything starts."""
    code = main(["serve", "--db", str(tmp_path / "q.db")], environ=environ)
    assert code == 78
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("foreman serve: ") and named in line
    assert not (tmp_path / "q.db").exists()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("0.5", 0.5),
        ("0", 0),
        ("90s", 90),
        ("15m", 900),
        ("12h", 43200),
        ("7d", 604800),
        ("1h30m", 5400),
        ("1m30.5s", 90.5),
        ("500ms", 0.5),
        ("1.5h", 5400),
        (" 10M ", 600),
    ],
)
def test_durations_take_seconds_units_and_go_forms(text: str, seconds: float) -> None:
    """Every time setting reads `90`, `90s`, `15m`, `12h`, `7d` and Go's `1h30m`, as keep_alive does."""
    assert duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "3x", "s", "1h 30m", "10 minutes", "-5s", "nan", "1y"])
def test_durations_refuse_what_they_cannot_read(text: str) -> None:
    """A malformed or negative duration is an error that shows the accepted forms or the rule."""
    with pytest.raises(ValueError, match=r"not a duration|negative"):
        duration(text)


@pytest.mark.parametrize(
    "name",
    [
        "max_wait",
        "min_residency",
        "early_headers",
        "read_timeout",
        "shutdown_grace",
        "backoff_initial",
        "backoff_max",
        "retention",
    ],
)
def test_every_time_setting_takes_the_duration_forms(name: str) -> None:
    """FOREMAN_MAX_WAIT=3s works like FOREMAN_RETENTION=7d; `1h30m` works for each of them."""
    env = next(s.env for s in SETTINGS if s.name == name)
    assert getattr(config_for([], {env: "3s"}), name) == 3
    assert getattr(config_for([], {env: "1h30m"}), name) == 5400


def test_time_defaults_are_written_with_units(capsys: pytest.CaptureFixture[str]) -> None:
    """README and `foreman serve --help` show `10m`, not `600`."""
    defaults = {s.name: s.default for s in SETTINGS}
    assert defaults["max_wait"] == "10m" and defaults["retention"] == "7d"
    assert defaults["early_headers"] == "1m" and defaults["shutdown_grace"] == "30s"
    with pytest.raises(SystemExit):
        main(["serve", "--help"], environ={})
    shown = " ".join(capsys.readouterr().out.split())
    assert "[env FOREMAN_MAX_WAIT, default 10m]" in shown
    assert "[env FOREMAN_RETENTION, default 7d]" in shown


def test_serve_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    """`foreman serve --help` has no Markdown links or backticks, and no `default ]` for an unset one."""
    with pytest.raises(SystemExit):
        main(["serve", "--help"], environ={})
    shown = " ".join(capsys.readouterr().out.split())
    assert "](" not in shown and "`" not in shown and "default ]" not in shown
    assert "shared by several nodes (see Several hosts)" in shown
    assert "[env FOREMAN_NODE, unset by default]" in shown


def test_unknown_variables_are_named_with_the_nearest_setting() -> None:
    """A misspelt FOREMAN_* variable is found with the setting it most looks like; others are left alone."""
    environ = {"FOREMAN_MAX_WIAT": "3s", "FOREMAN_PARALLEL": "2", "FOREMAN_ZZZ": "1", "HOME": "/root"}
    assert unknown_variables(environ) == [("FOREMAN_MAX_WIAT", "FOREMAN_MAX_WAIT"), ("FOREMAN_ZZZ", None)]


def test_the_configuration_tables_are_the_settings_table() -> None:
    """README's and the docs site's Configuration tables are what `markdown_table()` renders."""
    readme = README.read_text()
    assert markdown_table() in readme, "README's table differs; paste foreman.config.markdown_table()"
    page = (README.parent / "docs" / "configuration.md").read_text()
    assert markdown_table(docs="") in page, "docs/configuration.md's table differs; paste markdown_table('')"


def test_retry_and_scheduling_defaults_are_configs() -> None:
    """RetryPolicy has no defaults of its own, and Policy's are Config's (the worker falls back to them)."""
    config = Config(db_path=Path("q.db"))
    assert Policy() == Policy(max_wait=config.max_wait, min_residency=config.min_residency)
    with pytest.raises(TypeError):
        RetryPolicy()  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:11435", ("127.0.0.1", 11435)),
        ("localhost", ("localhost", 11435)),
        (":8080", ("0.0.0.0", 8080)),
        ("http://0.0.0.0:11500", ("0.0.0.0", 11500)),
        ("[::1]:11435", ("::1", 11435)),
        ('"127.0.0.1:1"', ("127.0.0.1", 1)),
    ],
)
def test_listen_address_takes_ollama_host_forms(value: str, expected: tuple[str, int]) -> None:
    """FOREMAN_HOST reads like OLLAMA_HOST."""
    assert parse_listen(value) == expected


def test_https_listen_is_refused() -> None:
    """foreman serves plain HTTP and says so."""
    with pytest.raises(ValueError, match="plain http"):
        parse_listen("https://0.0.0.0:443")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("http://127.0.0.1:11434/", "http://127.0.0.1:11434"),
        ("127.0.0.1", "http://127.0.0.1:11434"),
        ("0.0.0.0:11434", "http://127.0.0.1:11434"),
        ("https://ollama.example", "https://ollama.example"),
    ],
)
def test_upstream_takes_urls_and_ollama_host_forms(value: str, expected: str) -> None:
    """FOREMAN_UPSTREAM may be a URL or an OLLAMA_HOST-style address."""
    assert parse_upstream(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:11435", "http://127.0.0.1:11435"),
        (":9000", "http://127.0.0.1:9000"),
        ("0.0.0.0:9000", "http://127.0.0.1:9000"),
        ("gpu-box", "http://gpu-box:11435"),
        ("http://gpu-box:9000", "http://gpu-box:9000"),
        ("[::1]:9000", "http://[::1]:9000"),
    ],
)
def test_client_url_reads_foreman_host_as_the_daemon_does(value: str, expected: str) -> None:
    """A client finds the daemon where FOREMAN_HOST makes it listen; a wildcard host means this machine."""
    assert client_url(value) == expected


def test_db_path_follows_systemd_then_xdg(tmp_path: Path) -> None:
    """systemd's STATE_DIRECTORY wins over XDG_STATE_HOME, which wins over ~/.local/state."""
    assert default_db_path({"STATE_DIRECTORY": "/var/lib/foreman:/other"}) == Path(
        "/var/lib/foreman/foreman.db"
    )
    assert default_db_path({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "foreman" / "foreman.db"
    assert default_db_path({}) == Path.home() / ".local" / "state" / "foreman" / "foreman.db"


def test_keep_alive_settings_parse_to_what_ollama_takes() -> None:
    """`-1` is sent as a number (a string "-1" would be a 400 in Ollama)."""
    assert parse_keep_alive("-1") == -1
    assert parse_keep_alive("300") == 300
    assert parse_keep_alive("30m") == "30m"
    with pytest.raises(ValueError):
        parse_keep_alive("soon")


def test_every_setting_has_a_foreman_variable() -> None:
    """Each serve flag is documented with its FOREMAN_* variable, and every Config field is a setting."""
    for setting in SETTINGS:
        assert setting.env == "FOREMAN_" + setting.flag.removeprefix("--").replace("-", "_").upper()
    assert [s.name for s in SETTINGS] == [f for f in Config.__dataclass_fields__]


def test_serve_reports_a_port_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A busy port is one clear log line and exit code 1, not a traceback."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(
            ["serve", "--host", f"127.0.0.1:{port}", "--db", str(tmp_path / "q.db"), "--log-format", "json"],
            environ={},
        )
    assert code == 1
    out = capsys.readouterr().out
    assert "foreman.listen_failed" in out and "Traceback" not in out


def test_client_and_demo_times_take_durations_too() -> None:
    """`foreman watch --interval 2s` and `foreman demo --load-delay 500ms` read like the settings."""
    parser = build_parser({}, isatty=False)
    assert parser.parse_args(["watch", "--interval", "2s"]).interval == 2
    assert parser.parse_args(["submit", "--prompt", "hi", "--model", "m", "--interval", "1m"]).interval == 60
    assert parser.parse_args(["demo", "--load-delay", "500ms"]).load_delay == pytest.approx(0.5)
    assert parser.parse_args(["demo"]).load_delay == 1
