"""A throwaway PostgreSQL server for the tests and benchmarks: initdb in a temporary directory, stopped at the end.

The server refuses to run as root, and CI runs as root, so as root it runs as
the `postgres` user that Debian's package creates. It listens on a unix
socket in its own directory and on a free loopback port, with fsync off: the
tests check foreman's transactions, not the disk's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import free_port


def server_bindir() -> Path | None:
    """Where initdb and pg_ctl are: `pg_config --bindir`, or PATH; None if no server is installed."""
    if (pg_config := shutil.which("pg_config")) is not None:
        bindir = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    if (initdb := shutil.which("initdb")) is not None:
        return Path(initdb).parent
    # Debian keeps the server's binaries off PATH, one directory per major version.
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return found[-1].parent if found else None


@dataclass
class Server:
    """A running server; `url(dbname)` is a libpq URL to one of its databases."""

    bindir: Path
    root: Path
    port: int
    user: str
    options: str = ""  # the server's command-line options, to start it again the same way

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def stop(self) -> None:
        self._as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"])
        shutil.rmtree(self.root, ignore_errors=True)

    def restart(self) -> None:
        """What `pg_ctl restart -m fast` does: every session is cut, and the server is back when this returns.

        As a stop and a start, so that the new server logs to its file (restart takes no -l, and a
        server logging to our pipe would keep it open).
        """
        self.halt()
        self.resume()

    def halt(self) -> None:
        """`pg_ctl stop -m fast`: gone until `resume`."""
        self._as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])

    def resume(self) -> None:
        """Start the server again after `halt`, as it was started."""
        self._as_owner(
            [
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                self.options,
                "-l",
                str(self.root / "log"),
                "-w",
                "start",
            ]
        )

    def _as_owner(self, argv: list[str]) -> None:
        subprocess.run(_owner_prefix() + argv, check=True, capture_output=True, cwd=self.root)


def _owner_prefix() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def start(bindir: Path) -> Server:
    """initdb and start a server in a new temporary directory; trust authentication on loopback only."""
    root = Path(tempfile.mkdtemp(prefix="foreman-pg-"))
    user = "postgres" if os.geteuid() == 0 else os.environ.get("USER", "postgres")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    server = Server(bindir, root, free_port(), user)
    try:
        server._as_owner(
            [
                str(bindir / "initdb"),
                "-D",
                str(server.data),
                "-U",
                user,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        options = (
            f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        server.options = options
        server._as_owner(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(server.data),
                "-o",
                options,
                "-l",
                str(root / "log"),
                "-w",
                "start",
            ]
        )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return server
