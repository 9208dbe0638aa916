"""Real processes for the benchmarks: stub Ollama, `foreman serve` and the bare proxy on loopback.

Every process gets a free port, logs to a file in the run's work directory,
and is waited for with a deadline until it accepts connections. `Processes`
owns what a benchmark started and kills whatever is left on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parent.parent
# The scripts run as `python bench/x.py`, which puts only bench/ on the path: import
# foreman and stub_ollama from this checkout, installed or not (the children, run
# with `-m` from ROOT, do the same).
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))
BARE_PROXY = Path(__file__).resolve().parent / "bare_proxy.py"
_TICKS = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """One child process listening on a loopback port."""

    name: str
    argv: list[str]
    port: int
    log: Path
    env: dict[str, str]
    cwd: Path = ROOT  # `python -m foreman` runs the foreman found here
    process: subprocess.Popen[bytes] = field(init=False)
    spawned_at: float = field(init=False)  # time.monotonic() just before the spawn

    def __post_init__(self) -> None:
        self.spawn()

    def spawn(self) -> None:
        """Start the process (again, after a kill: same port, same log file)."""
        with self.log.open("ab") as log:
            self.spawned_at = time.monotonic()
            self.process = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    async def listening(self, within: float = 30.0) -> None:
        """Return once the process accepts connections; fail if it exits or the deadline passes."""
        deadline = time.monotonic() + within
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen within {within}s:\n{self.log_tail()}")
            await asyncio.sleep(0.005)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
        self.kill()

    def rss_mib(self) -> float:
        """Resident set size now."""
        return self._status_kib("VmRSS") / 1024

    def peak_rss_mib(self) -> float:
        """The highest resident set size since the process started."""
        return self._status_kib("VmHWM") / 1024

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the process, all threads."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime

    def _status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {key} for {self.name} (pid {self.pid})")

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Processes:
    """The processes of one benchmark run, in one work directory; all killed on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._started: list[Proc] = []

    def start(self, name: str, args: Sequence[str], *, env: Mapping[str, str] = {}, cwd: Path = ROOT) -> Proc:
        """Run `python args...` in `cwd` with `{port}` in args replaced by a free port."""
        port = free_port()
        argv = [PYTHON, *(a.replace("{port}", str(port)) for a in args)]
        proc = Proc(name, argv, port, self.workdir / f"{name}.log", {**os.environ, **env}, cwd)
        self._started.append(proc)
        return proc

    def stub(self, name: str = "stub", **flags: object) -> Proc:
        """`python -m stub_ollama`; keyword flags become `--flag value` (load_delay → --load-delay), `--flag` if True."""
        args = ["-m", "stub_ollama", "--port", "{port}"]
        for flag, value in flags.items():
            option = f"--{flag.replace('_', '-')}"
            args += [option] if value is True else [option, str(value)]
        return self.start(name, args)

    def foreman(self, name: str, upstream: str, *, env: Mapping[str, str] = {}, source: Path = ROOT) -> Proc:
        """`python -m foreman serve` with its database in the work directory; `env` adds FOREMAN_* settings.

        `source` is the checkout whose foreman runs (another build, for A/B runs).
        """
        settings = {
            "FOREMAN_DB": str(self.workdir / f"{name}.db"),
            "FOREMAN_UPSTREAM": upstream,
            "FOREMAN_LOG_FORMAT": "json",
            **env,
        }
        return self.start(
            name, ["-m", "foreman", "serve", "--host", "127.0.0.1:{port}"], env=settings, cwd=source
        )

    def bare(self, name: str, upstream: str | None = None) -> Proc:
        """The floor: `bench/bare_proxy.py` forwarding to `upstream`, or answering 202 when it is None."""
        target = ["--upstream", upstream] if upstream is not None else ["--accept"]
        return self.start(name, [str(BARE_PROXY), "--port", "{port}", *target])

    def lag_control(self, name: str = "lag-control") -> Proc:
        """`bench/lag_control.py`: an idle event loop whose lag is the machine's, for comparison."""
        return self.start(name, ["-m", "bench.lag_control", "--port", "{port}"])

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for proc in reversed(self._started):
            proc.kill()


async def until(
    predicate: Callable[[], object], *, within: float, every: float = 0.02, what: str = ""
) -> None:
    """Poll `predicate` until it holds; TimeoutError after `within` seconds.

    For state held by another process (a database file, a port), where no
    event can tell us it changed.
    """
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within}s waiting for {what or predicate}")
        await asyncio.sleep(every)


def run_in_workdir(prefix: str, workdir: Path | None, main: Callable[[Path], Coroutine[Any, Any, T]]) -> T:
    """Run `main(workdir)` in `workdir`, or in a temporary directory removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        path = workdir or Path(tmp)
        path.mkdir(parents=True, exist_ok=True)
        return asyncio.run(main(path))


async def run_clients(clients: int, jobs: int, one: Callable[[int], Awaitable[None]]) -> float:
    """Seconds for `clients` loops to share `jobs` calls of `one(i)`."""
    counter = itertools.count()

    async def client() -> None:
        while (i := next(counter)) < jobs:
            await one(i)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start


async def all_listening(*procs: Proc) -> None:
    await asyncio.gather(*(proc.listening() for proc in procs))


@contextlib.contextmanager
def cpu_of(*procs: Proc) -> Iterator[dict[str, float]]:
    """CPU seconds each process (by name) and this one (`client`) spent inside the block."""
    before = {p.name: p.cpu_seconds() for p in procs}
    client = time.process_time()
    used: dict[str, float] = {}
    yield used
    used.update({p.name: p.cpu_seconds() - before[p.name] for p in procs})
    used["client"] = time.process_time() - client


async def lag_buckets(http: Any, url: str) -> dict[float, float]:
    """foreman's `foreman_event_loop_lag_seconds` histogram now: cumulative count per upper bound."""
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("foreman_event_loop_lag_seconds_bucket{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    return buckets


def lag_between(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """The loop lag seen between two scrapes: samples, p99 (interpolated in its bucket), and the max's bucket.

    `max_ms` is the upper bound of the highest bucket that got a sample: the
    longest lag was at most that (and more than the bound below it).
    """
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]  # cumulative
    total = counts[-1] if counts else 0.0
    if not total:
        return {"n": 0, "p99_ms": float("nan"), "max_ms": float("nan")}
    rank = 0.99 * total
    p99 = bounds[-1]
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
            p99 = lower + (bound - lower) * share if bound != float("inf") else lower
            break
        lower, below = bound, cumulative
    highest = 0.0
    previous = 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative > previous:
            highest = bound
        previous = cumulative
    return {"n": int(total), "p99_ms": round(p99 * 1000, 3), "max_ms": round(highest * 1000, 3)}
