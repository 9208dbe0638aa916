"""Several foreman nodes sharing one PostgreSQL queue, each with its own stub Ollama of capacity 1.

Runs the simulator's kind of interleaved batch trace (`--jobs` jobs over
`--models` models, all queued at once, bound by run time: loads are short
next to the jobs) through one, two and three `foreman serve` processes on
loopback, alternating the cluster sizes round by round, and then once more
through three nodes while one is killed with SIGKILL a third of the way in.

Targets (issue 14):

- two nodes finish in <= 0.55x the time of one node, three in <= 0.4x;
- total swaps <= one node's swaps + the number of models;
- across a kill -9 of one node mid-trace: 0 jobs lost, 0 run twice at the
  same time, and the dead node's jobs finish within FOREMAN_NODE_TIMEOUT +
  one attempt of the kill.

The jobs are written into the queue in one transaction (as the trace has them
all arrive at t = 0), with the nodes up and idle; the clock runs from that
commit until the last job has ended. Swaps are the `model.swap` lines of the
nodes' logs. PostgreSQL is a throwaway server (tests/support/postgres.py) unless
--db-url names one (each run gets a database of its own on it).

    python bench/cluster.py                 # 2 rounds of 1/2/3 nodes, then the kill run
    python bench/cluster.py --rounds 3 --json cluster.json
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from _harness import Proc, Processes, all_listening, run_in_workdir, until
from _report import Row, arg_parser, machine, median, print_report, write_json
from foreman.dialects.intake import parse_job
from foreman.job import NewJob, Priority
from foreman.storage.postgres.storage import PostgresStorage
from tests.support import postgres as postgres_server

MODELS = ["phi3", "llama3", "qwen2", "mixtral", "gemma2", "codellama", "mistral", "tinyllama"]
# The stubs' delay between tokens: a job's run time is its tokens times this. Ten chunks a job
# keeps the stubs' and nodes' CPU small next to the run, as a GPU's run costs the host little;
# `--token-s 0.002` streams five times as many chunks (see README, "Several hosts").
TOKEN_S = 0.01
_names = itertools.count()


@dataclass(frozen=True)
class Args:
    jobs: int
    models: int
    load_s: float
    run_s: float
    timeout: float
    token_s: float


def trace(args: Args, seed: int = 1) -> list[tuple[str, int]]:
    """(model, tokens) per job: models interleaved at random, run times the mean +-40% (as bench/schedule.py)."""
    rng = random.Random(seed)
    models = MODELS[: args.models]
    names = [models[i % len(models)] for i in range(args.jobs)]
    rng.shuffle(names)
    return [(m, max(2, round(args.run_s * rng.uniform(0.6, 1.4) / args.token_s) + 1)) for m in names]


def new_jobs(jobs: Sequence[tuple[str, int]]) -> list[NewJob]:
    now = time.time()
    made = []
    for i, (model, tokens) in enumerate(jobs):
        body = {"model": model, "prompt": f"job {i}", "stream": False, "options": {"num_predict": tokens}}
        made.append(
            parse_job(
                "/api/generate", json.dumps(body).encode(), now, priority=Priority.BATCH, respond_async=True
            )
        )
    return made


class Database:
    """Where the runs' databases live: a throwaway server, or the one --db-url names."""

    def __init__(self, url: str | None) -> None:
        self._server: postgres_server.Server | None = None
        if url is None:
            bindir = postgres_server.server_bindir()
            if bindir is None:
                raise SystemExit(
                    "no PostgreSQL server installed (apt-get install postgresql), and no --db-url"
                )
            self._server = postgres_server.start(bindir)
            url = self._server.url()
        self._admin = url

    def new(self) -> str:
        name = f"foreman_cluster_{int(time.time())}_{next(_names)}"
        with psycopg.connect(self._admin, autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        return self._admin.rsplit("/", 1)[0] + "/" + name

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()


def query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as db:
        cursor = db.execute(sql, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description is not None else []


async def start_nodes(procs: Processes, url: str, count: int, args: Args, tag: str) -> list[Proc]:
    nodes = []
    for i in range(count):
        stub = procs.stub(
            f"{tag}-stub{i}",
            models=",".join(MODELS[: args.models]),
            capacity=1,
            load_delay=args.load_s,
            token_delay=args.token_s,
            tokens=10_000,  # num_predict sets each reply's length
        )
        await all_listening(stub)
        env = {
            "FOREMAN_DB": url,
            "FOREMAN_NODE": f"n{i}",
            "FOREMAN_NODE_TIMEOUT": str(args.timeout),
            "FOREMAN_WARM": "off",
            "FOREMAN_BACKOFF_INITIAL": "0.05",
            "FOREMAN_BACKOFF_MAX": "0.2",
        }
        nodes.append(procs.foreman(f"{tag}-n{i}", stub.url, env=env))
    await all_listening(*nodes)
    await until(
        lambda: len(query(url, "SELECT name FROM nodes WHERE left_at IS NULL")) == count,
        within=30,
        what="every node to join",
    )
    return nodes


async def enqueue(url: str, jobs: list[NewJob]) -> float:
    """Write every job in one transaction (waking the nodes at commit); returns when it committed."""
    store = await PostgresStorage.open(url, node="bench")
    try:
        await store.insert_many(jobs)
        return time.monotonic()
    finally:
        await store.close()


def ended(url: str) -> int:
    return int(query(url, "SELECT count(*) FROM jobs WHERE state IN ('done', 'failed', 'cancelled')")[0][0])


def log_events(proc: Proc, event: str) -> list[dict[str, Any]]:
    events = []
    for line in proc.log.read_text(errors="replace").splitlines():
        if line.startswith("{") and f'"{event}"' in line:
            record = json.loads(line)
            if record.get("event") == event:
                events.append(record)
    return events


async def run_trace(procs: Processes, db: Database, count: int, args: Args, tag: str) -> dict[str, Any]:
    url = db.new()
    nodes = await start_nodes(procs, url, count, args, tag)
    jobs = new_jobs(trace(args))
    started = await enqueue(url, jobs)
    await until(lambda: ended(url) >= len(jobs), within=600, every=0.02, what="every job to end")
    makespan = time.monotonic() - started
    states = dict(query(url, "SELECT state, count(*) FROM jobs GROUP BY state"))
    swaps = sum(len(log_events(node, "model.swap")) for node in nodes)
    per_node = {node.name: len(log_events(node, "job.done")) for node in nodes}
    for node in nodes:
        node.stop()
    return {
        "nodes": count,
        "makespan_s": round(makespan, 3),
        "swaps": swaps,
        "states": states,
        "done_by": per_node,
    }


def _at(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"]).timestamp()


async def run_kill(procs: Processes, db: Database, args: Args) -> dict[str, Any]:
    """Three nodes; the second is killed with SIGKILL once a third of the jobs ended."""
    url = db.new()
    nodes = await start_nodes(procs, url, 3, args, "kill")
    jobs = new_jobs(trace(args))
    await enqueue(url, jobs)
    await until(lambda: ended(url) >= len(jobs) // 3, within=600, every=0.02, what="a third of the jobs")
    # Kill it in the middle of a job, not in the moment between two.
    running = "SELECT 1 FROM jobs WHERE node = 'n1' AND state = 'working'"
    await until(lambda: bool(query(url, running)), within=60, every=0.005, what="n1 to run a job")
    victim = nodes[1]
    victim.process.send_signal(signal.SIGKILL)
    killed_at = time.time()
    victim.process.wait()
    orphans = [
        i for (i,) in query(url, "SELECT id FROM jobs WHERE node = 'n1' AND state IN ('loading', 'working')")
    ]
    await until(lambda: ended(url) >= len(jobs), within=600, every=0.02, what="every job to end")
    states = dict(query(url, "SELECT state, count(*) FROM jobs GROUP BY state"))
    # Who ran what, when: job.start and job.done of every node; the dead node's runs end at the kill.
    runs: dict[str, list[tuple[str, float, float]]] = {}
    for node in nodes:
        starts = {r["job_id"]: _at(r) for r in log_events(node, "job.start")}
        dones = {r["job_id"]: _at(r) for r in log_events(node, "job.done")}
        for job_id, start in starts.items():
            end = dones.get(job_id, killed_at if node is victim else time.time())
            runs.setdefault(job_id, []).append((node.name, start, end))
    overlapping = [
        job_id
        for job_id, spans in runs.items()
        for (n1, s1, e1), (n2, s2, e2) in itertools.combinations(spans, 2)
        if n1 != n2 and s1 < e2 and s2 < e1
    ]
    # When each job the dead node ran started again elsewhere, and when it was done, after the kill.
    resumed, finished = [], []
    for job_id in orphans:
        spans = [(s, e) for name, s, e in runs.get(job_id, []) if name != victim.name]
        resumed.append(round(min(s for s, _ in spans) - killed_at, 3) if spans else None)
        finished.append(round(min(e for _, e in spans) - killed_at, 3) if spans else None)
    # One attempt as this run saw it: the longest load and the longest run of any node.
    longest_load = max((r["load_s"] for n in nodes for r in log_events(n, "model.swap")), default=0.0)
    longest_run = max((r["run_s"] for n in nodes for r in log_events(n, "job.done")), default=0.0)
    for node in nodes:
        node.stop()
    return {
        "attempt_s": round(longest_load + longest_run, 3),
        "states": states,
        "lost": len(jobs) - states.get("done", 0),
        "run_twice_at_once": len(overlapping),
        "orphans": len(orphans),
        "resumed_after_s": resumed,
        "done_after_s": finished,
    }


async def main_async(workdir: Path, argv: Any) -> dict[str, Any]:
    args = Args(argv.jobs, argv.models, argv.load_s, argv.run_s, argv.timeout, argv.token_s)
    db = Database(argv.db_url)
    results: dict[str, Any] = {"machine": machine(), "runs": []}
    try:
        with Processes(workdir) as procs:
            for round_ in range(argv.rounds):
                for count in (1, 2, 3):
                    run = await run_trace(procs, db, count, args, f"r{round_}-{count}")
                    print(json.dumps(run), file=sys.stderr)
                    results["runs"].append(run)
            if not argv.no_kill:
                results["kill"] = await run_kill(procs, db, args)
                print(json.dumps(results["kill"]), file=sys.stderr)
    finally:
        db.close()
    results["machine"]["loadavg_end"] = machine()["loadavg"]
    return results


def report(results: dict[str, Any], argv: Any) -> list[Row]:
    rows = _trace_rows(results, argv) if results["runs"] else []
    kill = results.get("kill")
    if kill is not None:
        # One attempt: the job in flight on the node that takes over, then the load (the longest seen).
        attempt = kill["attempt_s"]
        late = [s for s in kill["resumed_after_s"] if s is None or s > argv.timeout + attempt]
        rows += [
            Row("kill -9", "jobs lost", str(kill["lost"]), "0", kill["lost"] == 0),
            Row(
                "kill -9",
                "jobs run twice at once",
                str(kill["run_twice_at_once"]),
                "0",
                kill["run_twice_at_once"] == 0,
            ),
            Row(
                "kill -9",
                "dead node's jobs started again after the kill",
                f"{kill['orphans']} job(s): {kill['resumed_after_s']} s (done {kill['done_after_s']} s)",
                f"<= {argv.timeout:g} s timeout + {attempt:.2f} s attempt",
                bool(kill["orphans"]) and not late,
            ),
        ]
    return rows


def _trace_rows(results: dict[str, Any], argv: Any) -> list[Row]:
    by = {n: [r for r in results["runs"] if r["nodes"] == n] for n in (1, 2, 3)}
    span = {n: median([r["makespan_s"] for r in runs]) for n, runs in by.items()}
    swaps = {n: median([r["swaps"] for r in runs]) for n, runs in by.items()}
    rows = [
        Row(
            f"{n} node{'s' * (n > 1)}",
            "makespan (median)",
            f"{span[n]:.2f} s, {span[n] / span[1]:.2f}x one node; swaps {swaps[n]:g}",
            {1: "", 2: "<= 0.55x", 3: "<= 0.4x"}[n],
            None if n == 1 else span[n] / span[1] <= {2: 0.55, 3: 0.4}[n],
        )
        for n in (1, 2, 3)
    ]
    for n in (2, 3):
        worst = max(r["swaps"] for r in by[n])
        rows.append(
            Row(
                f"{n} nodes",
                "swaps (worst run)",
                f"{worst} vs one node's {swaps[1]:g} + {argv.models} models",
                f"<= {swaps[1] + argv.models:g}",
                worst <= swaps[1] + argv.models,
            )
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--models", type=int, default=8, choices=range(1, len(MODELS) + 1))
    parser.add_argument("--rounds", type=int, default=2, help="runs of each cluster size, alternated")
    parser.add_argument("--load-s", type=float, default=0.2, help="seconds a stub takes to load a model")
    parser.add_argument("--run-s", type=float, default=0.1, help="mean seconds of one job")
    parser.add_argument("--timeout", type=float, default=3.0, help="FOREMAN_NODE_TIMEOUT of the nodes")
    parser.add_argument("--token-s", type=float, default=TOKEN_S, help="the stubs' delay between tokens")
    parser.add_argument("--db-url", help="a PostgreSQL server to create the runs' databases on")
    parser.add_argument("--no-kill", action="store_true", help="skip the kill -9 run")
    args = parser.parse_args(argv)
    results = run_in_workdir("foreman-cluster-", args.workdir, lambda workdir: main_async(workdir, args))
    rows = report(results, args)
    print_report(f"cluster ({args.jobs} jobs, {args.models} models)", results, rows)
    results["rows"] = [row.__dict__ for row in rows]
    write_json(args, results)
    return 0 if all(row.met is not False for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
