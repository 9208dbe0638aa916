"""On PostgreSQL, a client on one node waiting for a job another node runs: what its end costs (issue 25).

Two builds side by side, "before" from `--before DIR` and "after" from this
checkout, each with a throwaway PostgreSQL server of its own and two nodes:
A, whose Ollama is down (so every job runs elsewhere), and B, in front of a
stub Ollama with no delays. Sequential requests to A, alternated between the
builds: streamed /api/chat of `--stream-tokens` chunks, then non-streamed.
Per request: the time to the last line (p50), the CPU of A, of B and of the
PostgreSQL server (postmaster and backends), and the transactions the server
committed (`pg_stat_database.xact_commit`: one per statement in autocommit).

    python bench/pg_ends.py --before /tmp/foreman-before --json bench/results/pg_ends.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from overhead import chat, rotations, stream_times, timed_chat

from _harness import Proc, Processes, all_listening, cpu_of, free_port, run_in_workdir, until
from _report import Row, arg_parser, machine, ms, print_report, spread, write_json
from tests.support import postgres

_TICK = os.sysconf("SC_CLK_TCK")


def server_cpu(server: postgres.Server) -> float:
    """CPU seconds of the server's postmaster and its children (backends, writers) so far."""
    pid = int((server.data / "postmaster.pid").read_text().split()[0])
    total = 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for p in [pid, *map(int, children)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def commits(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


class Build:
    def __init__(self, name: str, server: postgres.Server, a: Proc, b: Proc) -> None:
        self.name, self.server, self.a, self.b = name, server, a, b
        self.url = server.url("foreman")


@contextmanager
def servers(count: int) -> Iterator[list[postgres.Server]]:
    bindir = postgres.server_bindir()
    if bindir is None:
        raise SystemExit("no PostgreSQL server installed")
    started: list[postgres.Server] = []
    try:
        for _ in range(count):
            server = postgres.start(bindir)
            started.append(server)
            with psycopg.connect(server.url(), autocommit=True) as db:
                db.execute("CREATE DATABASE foreman")
        yield started
    finally:
        for server in started:
            server.stop()
            shutil.rmtree(server.root, ignore_errors=True)


async def phase(
    http: aiohttp.ClientSession, builds: dict[str, Build], args: argparse.Namespace, stream: bool
) -> Any:
    took: dict[str, list[float]] = {name: [] for name in builds}
    count = args.streams if stream else args.requests
    tokens = args.stream_tokens if stream else 7

    async def one(build: Build, i: int) -> float:
        body = chat(f"{'s' if stream else 'w'} {i}", stream=stream, num_predict=tokens)
        if stream:
            times = await stream_times(http, build.a.url, body)
            if len(times) != tokens + 1:
                raise RuntimeError(f"{build.name}: {len(times)} lines, expected {tokens + 1}")
            return times[-1]
        return await timed_chat(http, build.a.url, body)

    for i in range(args.warmup):
        for build in builds.values():
            await one(build, -i - 1)
    order = rotations(list(builds))
    # The statistics a backend keeps reach pg_stat_database when it is idle, at most a second later.
    await asyncio.sleep(1.5)
    xacts = {name: commits(b.url) for name, b in builds.items()}
    pg = {name: server_cpu(b.server) for name, b in builds.items()}
    with cpu_of(*(p for b in builds.values() for p in (b.a, b.b))) as used:
        for i in range(count):
            for name in next(order):
                took[name].append(await one(builds[name], i))
    pg = {name: server_cpu(b.server) - pg[name] for name, b in builds.items()}
    await asyncio.sleep(1.5)
    xacts = {name: commits(b.url) - xacts[name] for name, b in builds.items()}
    return {
        name: {
            "end": spread(took[name]),
            "cpu_ms_per_request": {
                "a": ms(used[b.a.name] / count),
                "b": ms(used[b.b.name] / count),
                "postgresql": ms(pg[name] / count),
            },
            # Less the two reads of the statistics themselves.
            "transactions_per_request": round((xacts[name] - 1) / count, 2),
        }
        for name, b in builds.items()
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine()}
    with servers(2) as (before_pg, after_pg), Processes(workdir) as procs:
        stub = procs.stub(models="llama3", tokens=max(7, args.stream_tokens), load_delay=0, token_delay=0)
        nowhere = f"http://127.0.0.1:{free_port()}"
        builds = {}
        for name, server, source in (("before", before_pg, args.before), ("after", after_pg, None)):
            url = server.url("foreman")
            env = {"FOREMAN_DB": url, "FOREMAN_WARM": "off"}
            extra = {} if source is None else {"source": source}
            a = procs.foreman(f"{name}-a", nowhere, env={**env, "FOREMAN_NODE": "a"}, **extra)
            b = procs.foreman(f"{name}-b", stub.url, env={**env, "FOREMAN_NODE": "b"}, **extra)
            builds[name] = Build(name, server, a, b)
        await all_listening(stub, *(p for b in builds.values() for p in (b.a, b.b)))
        for build in builds.values():
            await until(
                lambda b=build: len(_query(b.url, "SELECT name FROM nodes WHERE left_at IS NULL")) == 2,
                within=30,
                what="both nodes to join",
            )
        async with aiohttp.ClientSession() as http:
            print("streamed ...", file=sys.stderr)
            results["streamed"] = await phase(http, builds, args, stream=True)
            print("non-streamed ...", file=sys.stderr)
            results["whole"] = await phase(http, builds, args, stream=False)
    results["machine"]["loadavg_end"] = machine()["loadavg"]
    return results


def _query(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as db:
        return db.execute(sql).fetchall()


def table(results: dict[str, Any]) -> list[Row]:
    rows = []
    for what in ("streamed", "whole"):
        for name in ("before", "after"):
            r = results[what][name]
            cpu = r["cpu_ms_per_request"]
            rows.append(
                Row(
                    name,
                    f"{what}: end p50; CPU per request A / B / PostgreSQL; transactions",
                    f"{r['end']['p50_ms']:.2f} ms; {cpu['a']:.2f} / {cpu['b']:.2f} / {cpu['postgresql']:.2f} ms;"
                    f" {r['transactions_per_request']:.2f}",
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    add = parser.add_argument
    add("--before", type=Path, required=True, help="checkout of the build to compare against")
    add("--streams", type=int, default=300, help="streamed requests per build (default %(default)s)")
    add("--stream-tokens", type=int, default=100, help="chunks per streamed reply (default %(default)s)")
    add("--requests", type=int, default=300, help="non-streamed requests per build (default %(default)s)")
    add("--warmup", type=int, default=20, help="(default %(default)s)")
    args = parser.parse_args(argv)
    args.before = args.before.resolve()
    results = run_in_workdir("foreman-pg-ends-", args.workdir, partial(run, args))
    print_report("foreman on PostgreSQL, A/B: a job's end to another node", results, table(results))
    write_json(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
