"""Where a finished stream's chunks go: packed in the job's row, or one row each in `chunks` (issue 25).

For streams of N chunks the size of Ollama's /api/chat lines (`--chunk-bytes`),
on SQLite (`QueueFile`, the statements the event loop runs) and on PostgreSQL
(`PostgresStorage` on a throwaway server, or `--db-url`), both ways alternated
round by round (`foreman.storage.output.OUTPUT_LIMIT` set to 0 or to no limit):

- finish: ending a running job with its output, as `Storage.finish` does
  (on PostgreSQL with its end announced, as the worker asks): CPU and wall
  time per job (PostgreSQL's own CPU is not counted);
- replay: `Storage.chunks(job_id)`, as `GET /jobs/{id}/events` reads it;
- the other columns: `GET /jobs/{id}` (`get`) and a page of 50 from `/jobs`
  (`list_jobs`), with the output in the row or not, to show that a packed
  output does not slow them.

    python bench/stream_output.py --json bench/results/stream_output.json
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ulid import ULID

import _harness  # noqa: F401  (puts the checkout on sys.path: tests.support)
from _report import Row, arg_parser, machine, median, print_report, write_json
from foreman.job import Ended, Job, JobState, NewJob
from foreman.storage import output
from foreman.storage.postgres.storage import PostgresStorage
from foreman.storage.rows import job_from_row
from foreman.storage.sqlite import reads
from foreman.storage.sqlite.queue_file import Ending, QueueFile

WAYS = {"packed": 1 << 40, "rows": 0}  # OUTPUT_LIMIT for each way


def chunks_of(n: int, size: int) -> list[bytes]:
    return [(b'{"message":{"content":"' + b"x" * max(size - 30, 1) + b'"}}\n')[:size] for _ in range(n)]


def new_job(stream: bool = True) -> NewJob:
    return NewJob(
        id=str(ULID()),
        endpoint="/api/chat",
        model="llama3",
        model_key="llama3:latest",
        stream=stream,
        body=b'{"model": "llama3", "messages": [{"role": "user", "content": "hello"}]}',
        created_at=time.time(),
    )


def jobs_for(args: Any, n: int) -> int:
    """Jobs per database for streams of `n` chunks: about `--chunks-per-cell` chunks in all."""
    return int(max(min(args.max_jobs, args.chunks_per_cell // n), 10))


def sqlite_cell(workdir: Path, way: str, n: int, args: Any) -> dict[str, float]:
    """One database, `jobs_for(args, n)` jobs: each finished with n chunks, then read back."""
    output.OUTPUT_LIMIT = WAYS[way]
    path = workdir / f"{way}-{n}-{ULID()}.db"
    store = QueueFile(path)
    jobs = [new_job() for _ in range(jobs_for(args, n))]
    store.insert_many(jobs)
    store._db.execute("UPDATE jobs SET state = 'working', started_at = created_at")
    data = chunks_of(n, args.chunk_bytes)
    running = [store.get(job.id) for job in jobs]
    cpu, wall = time.process_time(), time.perf_counter()
    for job in running:
        assert job is not None
        store.finish_many([Ending(job, JobState.DONE, time.time(), 200, b"{}", chunks=data)])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    db = store._db
    replay = time.perf_counter()
    for job in jobs:
        assert len(reads.chunks(db, job.id)) == n
    replay = time.perf_counter() - replay
    got = time.perf_counter()
    for job in jobs:
        reads.get(db, job.id)
    got = time.perf_counter() - got
    pages = max(len(jobs) // 50, 1)
    listed = time.perf_counter()
    before = None
    for _ in range(pages):
        page = reads.list_jobs(db, state=None, model_key=None, limit=50, before=before)
        before = page[-1].id if page else None
    listed = time.perf_counter() - listed
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    (pages_used,) = db.execute(
        "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size"
    ).fetchone()
    size = float(pages_used)
    store.close()
    path.unlink()
    count = len(jobs)
    return {
        "finish_cpu_us": cpu / count * 1e6,
        "finish_wall_us": wall / count * 1e6,
        "replay_us": replay / count * 1e6,
        "get_us": got / count * 1e6,
        "page_of_50_us": listed / pages * 1e6,
        "bytes_per_job": size / count,
    }


async def pg_cell(url: str, way: str, n: int, args: Any) -> dict[str, float]:
    output.OUTPUT_LIMIT = WAYS[way]
    store = await PostgresStorage.open(url, node=f"bench-{ULID()}")
    try:
        jobs = [new_job() for _ in range(jobs_for(args, n) // 2 or 1)]
        await store.insert_many(jobs)
        async with store.connection() as conn:
            await conn.execute(
                "UPDATE jobs SET state = 'working', started_at = created_at, node = %s,"
                " lease_until = now() + interval '1 hour' WHERE id = ANY(%s)",
                (store.node, [job.id for job in jobs]),
            )
            cursor = await conn.execute(
                "SELECT "
                + ", ".join(f.name for f in Job.__dataclass_fields__.values())
                + " FROM jobs WHERE id = ANY(%s) ORDER BY id",
                ([job.id for job in jobs],),
            )
            running = [job_from_row(row) for row in await cursor.fetchall()]
        data = chunks_of(n, args.chunk_bytes)
        end = Ended(JobState.DONE, 200, b"")
        cpu, wall = time.process_time(), time.perf_counter()
        for job in running:
            await store.finish(
                job, JobState.DONE, time.time(), status=200, result=b"{}", chunks=data, ended=end
            )
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        replay = time.perf_counter()
        for job in jobs:
            assert len(await store.chunks(job.id)) == n
        replay = time.perf_counter() - replay
        got = time.perf_counter()
        for job in jobs:
            await store.get(job.id)
        got = time.perf_counter() - got
        count = len(jobs)
        return {
            "finish_cpu_us": cpu / count * 1e6,
            "finish_wall_us": wall / count * 1e6,
            "replay_us": replay / count * 1e6,
            "get_us": got / count * 1e6,
        }
    finally:
        async with store.connection() as conn:
            await conn.execute("TRUNCATE jobs CASCADE")
        await store.close()


def alternate(cells: Callable[[str, int], dict[str, float]], args: Any) -> dict[str, Any]:
    """Both ways for each size, alternated round by round; the median of each figure."""
    results: dict[str, Any] = {}
    for n in args.sizes:
        runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
        for r in range(args.rounds):
            for way in list(WAYS)[r % 2 :] + list(WAYS)[: r % 2]:
                runs[way].append(cells(way, n))
        results[str(n)] = {
            way: {key: round(median([run[key] for run in got]), 1) for key in got[0]}
            for way, got in runs.items()
        }
    return results


def run(args: Any) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "chunk_bytes": args.chunk_bytes}
    workdir = Path(tempfile.mkdtemp(prefix="foreman-stream-output-"))
    try:
        print("sqlite ...", file=sys.stderr)
        results["sqlite"] = alternate(lambda way, n: sqlite_cell(workdir, way, n, args), args)
        if not args.no_postgres:
            print("postgresql ...", file=sys.stderr)
            from tests.support import postgres

            server = None
            url = args.db_url
            if url is None:
                bindir = postgres.server_bindir()
                if bindir is None:
                    raise SystemExit("no PostgreSQL server installed: --no-postgres or --db-url")
                server = postgres.start(bindir)
                url = server.url()
            try:
                loop = asyncio.new_event_loop()
                results["postgresql"] = alternate(
                    lambda way, n: loop.run_until_complete(pg_cell(url, way, n, args)), args
                )
                loop.close()
            finally:
                if server is not None:
                    server.stop()
                    shutil.rmtree(server.root, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["machine"]["loadavg_end"] = machine()["loadavg"]
    return results


def table(results: dict[str, Any]) -> list[Row]:
    rows = []
    for backend in ("sqlite", "postgresql"):
        for n, ways in results.get(backend, {}).items():
            p, r = ways["packed"], ways["rows"]
            figures = [f"{key} {p[key]:.0f} vs {r[key]:.0f}" for key in p if key.endswith("_us")]
            rows.append(Row(backend, f"{n} chunks: packed vs rows (µs per job)", "; ".join(figures)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    add = parser.add_argument
    add("--sizes", type=int, nargs="+", default=[8, 64, 256, 512, 2048, 8192], help="chunks per stream")
    add("--chunk-bytes", type=int, default=130, help="bytes per chunk (default %(default)s)")
    add(
        "--chunks-per-cell",
        type=int,
        default=120_000,
        help="chunks written per database (default %(default)s)",
    )
    add("--max-jobs", type=int, default=600, help="jobs per database at most (default %(default)s)")
    add("--rounds", type=int, default=3, help="(default %(default)s)")
    add("--db-url", help="a PostgreSQL server to use instead of a throwaway one")
    add("--no-postgres", action="store_true")
    args = parser.parse_args(argv)
    results = run(args)
    print_report("stream output: packed in the row vs rows in chunks", results, table(results))
    write_json(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
