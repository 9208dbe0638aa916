"""`foreman serve` as a process of its own, for the tests that kill, restart or double it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.helpers import eventually


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(port: int, upstream: str, db: Path, log: Path, **settings: str) -> subprocess.Popen[bytes]:
    """`foreman serve` on `port`, JSON lines appended to `log`; `settings` are FOREMAN_* variables (retries wait 0 s)."""
    env = {
        **os.environ,
        "FOREMAN_LOG_FORMAT": "json",
        "FOREMAN_BACKOFF_INITIAL": "0",
        "FOREMAN_BACKOFF_MAX": "0",
        **settings,
    }
    command = [sys.executable, "-m", "foreman", "serve", "--host", f"127.0.0.1:{port}"]
    with log.open("ab") as out:
        return subprocess.Popen(
            [*command, "--upstream", upstream, "--db", str(db)], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def json_lines(log: Path) -> list[dict[str, Any]]:
    """The JSON lines of a process's log, skipping anything else it printed."""
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


async def listening(port: int, process: subprocess.Popen[bytes]) -> None:
    """Until the process accepts connections on `port`; fails at once if it exited."""

    def accepts() -> bool:
        assert process.poll() is None, "foreman exited; see its log"
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    await eventually(accepts, within=20, what="foreman to listen")
