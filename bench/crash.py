"""The crash test of issue 7: kill -9 foreman and restart Ollama while jobs come and go; lose nothing.

    python bench/crash.py --json bench/results/crash.json
    python bench/crash.py --jobs 60 --kills 3 --outages 1     # the size the test suite runs

Submits `--jobs` async jobs across 4 models to a real `foreman serve` in front of
a real stub Ollama process, each with an Idempotency-Key and retried until it is
acknowledged. Meanwhile it kills foreman with SIGKILL `--kills` times and
restarts it at once, and kills and restarts the stub `--outages` times (its
port refuses connections in between). The moments are random (seeded), spread
over the run by progress (jobs acknowledged plus jobs done).

At the end every acknowledged job is read back with GET /jobs/{id}: each key
must have exactly one job, and each job must have ended `done` with a result.
Exits 1 if any job was lost, duplicated, failed or never finished.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import random
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from _harness import Proc, Processes, all_listening, run_in_workdir, until
from _report import arg_parser, machine, write_json

MODELS = ("llama3", "mistral", "qwen2", "gemma2")
# Retries after an outage back off in tenths of seconds rather than up to 30 s, to keep the run short.
FOREMAN_ENV = {"FOREMAN_BACKOFF_INITIAL": "0.05", "FOREMAN_BACKOFF_MAX": "0.5"}


@dataclass
class Run:
    """What happened, as the test saw it."""

    acked: dict[str, str] = field(default_factory=dict)  # idempotency key -> job id
    ack_status: Counter[int] = field(default_factory=Counter)
    retried_submissions: int = 0
    kills: list[dict[str, int]] = field(default_factory=list)  # progress at each kill
    outages: list[dict[str, int]] = field(default_factory=list)


class Progress:
    """Jobs acknowledged plus jobs ended, read from the database foreman writes (read-only)."""

    def __init__(self, db: Path, run: Run) -> None:
        self._db, self._run = db, run

    def count(self, states: str) -> int:
        if not self._db.exists():
            return 0
        conn = sqlite3.connect(f"file:{self._db}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute(f"SELECT count(*) FROM jobs WHERE state IN {states}").fetchone()[0])
        except sqlite3.OperationalError:
            return 0  # not created yet
        finally:
            conn.close()

    def ended(self) -> int:
        return self.count("('done', 'failed', 'cancelled')")

    def unfinished(self) -> int:
        return self.count("('queued', 'loading', 'working')")

    def acknowledged(self) -> int:
        return len(self._run.acked)

    def __call__(self) -> int:
        return self.acknowledged() + self.ended()

    def reached(self, moment: int) -> Callable[[], bool]:
        return lambda: self() >= moment


async def submit(http: aiohttp.ClientSession, foreman: Proc, key: str, body: bytes, run: Run) -> None:
    """POST until foreman acknowledges the job; connection errors and 5xx mean try again."""
    headers = {"Content-Type": "application/json", "Prefer": "respond-async", "Idempotency-Key": key}
    for attempt in itertools.count():
        try:
            async with http.post(foreman.url + "/api/chat", data=body, headers=headers) as response:
                answer = await response.read()
                if response.status in (200, 202):
                    run.acked[key] = json.loads(answer)["id"]
                    run.ack_status[response.status] += 1
                    run.retried_submissions += attempt > 0
                    return
                if response.status < 500:
                    raise RuntimeError(
                        f"{key}: foreman refused the job ({response.status}): {answer[:200]!r}"
                    )
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            pass
        await asyncio.sleep(min(0.2, 0.01 * (attempt + 1)))


async def submit_all(http: aiohttp.ClientSession, foreman: Proc, args: argparse.Namespace, run: Run) -> None:
    rng = random.Random(args.seed)
    bodies = [
        (
            f"crash-{args.seed}-{i}",
            json.dumps(
                {
                    "model": rng.choice(MODELS),
                    "messages": [{"role": "user", "content": f"job {i}"}],
                    "stream": False,
                }
            ).encode(),
        )
        for i in range(args.jobs)
    ]
    queue = iter(bodies)

    async def submitter() -> None:
        for key, body in queue:
            await submit(http, foreman, key, body, run)

    await asyncio.gather(*(submitter() for _ in range(args.submitters)))


async def chaos(
    proc: Proc,
    moments: list[int],
    progress: Progress,
    rng: random.Random,
    down_s: tuple[float, float],
    within: float,
) -> list[dict[str, int]]:
    """SIGKILL `proc` when progress passes each moment, and start it again after a pause in `down_s`.

    Returns, for each kill survived, how many jobs were acknowledged and ended when it came.
    """
    survived = []
    for moment in moments:
        await until(progress.reached(moment), within=within, what=f"progress {moment}")
        await asyncio.sleep(rng.uniform(0, 0.05))
        proc.kill()
        when = {"acknowledged": progress.acknowledged(), "ended": progress.ended()}
        await asyncio.sleep(rng.uniform(*down_s))
        proc.spawn()
        await proc.listening()
        survived.append(when)
    return survived


def recovered(log: Path) -> int:
    """Jobs that restarts found running (killed mid-run) and put back in the queue, from foreman's log."""
    requeued = 0
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == "queue.recovered":
                requeued += event["requeued"]
    return requeued


async def verify(http: aiohttp.ClientSession, foreman: Proc, run: Run) -> dict[str, Any]:
    """Read every acknowledged job back, and count every job foreman has."""
    states: Counter[str] = Counter()
    lost, without_result = [], []
    for key, job_id in run.acked.items():
        async with http.get(f"{foreman.url}/jobs/{job_id}") as response:
            if response.status == 404:
                lost.append(key)
                continue
            job = await response.json()
        states[job["state"]] += 1
        if job["state"] == "done" and not job.get("result"):
            without_result.append(key)
    listed, after = 0, None
    while True:
        query = "?limit=1000" + (f"&after={after}" if after else "")
        async with http.get(f"{foreman.url}/jobs{query}") as response:
            page = await response.json()
        listed += len(page["jobs"])
        if not (after := page["next"]):
            break
    ids = set(run.acked.values())
    return {
        "acknowledged": len(run.acked),
        "lost": len(lost),
        # More jobs than keys, or two keys on one job: a submission was written twice.
        "duplicated": max(0, listed - len(run.acked)) + (len(run.acked) - len(ids)),
        "failed": sum(
            n for state, n in states.items() if state not in ("done", "queued", "loading", "working")
        )
        + len(without_result),
        "unfinished": sum(states[s] for s in ("queued", "loading", "working")),
        "states": dict(states),
        "jobs_listed": listed,
        "lost_keys": lost[:20],
    }


async def run_test(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    run = Run()
    started = time.monotonic()
    with Processes(workdir) as procs:
        stub = procs.stub(
            models=",".join(MODELS),
            load_delay=args.load_delay,
            token_delay=args.token_delay,
            tokens=args.tokens,
        )
        foreman = procs.foreman("foreman", stub.url, env=FOREMAN_ENV)
        await all_listening(stub, foreman)
        progress = Progress(workdir / "foreman.db", run)
        span = 2 * args.jobs  # every job is acknowledged once and ends once
        kills = sorted(rng.sample(range(1, span), args.kills))
        outages = sorted(rng.sample(range(1, span), args.outages))
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            survived = asyncio.gather(
                chaos(foreman, kills, progress, random.Random(rng.random()), (0.0, 0.2), args.timeout),
                chaos(stub, outages, progress, random.Random(rng.random()), (0.2, 1.0), args.timeout),
            )
            await submit_all(http, foreman, args, run)
            run.kills, run.outages = await survived
            with contextlib.suppress(TimeoutError):  # what is left unfinished is counted below
                await until(lambda: not progress.unfinished(), within=args.timeout, every=0.1)
            results = await verify(http, foreman, run)
    stub_runs = stub.log.read_text().count("outcome=ok")
    results.update(
        {
            "jobs": args.jobs,
            "kills_survived": len(run.kills),
            "kills_while_submitting": sum(k["acknowledged"] < args.jobs for k in run.kills),
            "jobs_requeued_at_restart": recovered(foreman.log),
            "outages_survived": len(run.outages),
            "kill_moments": run.kills,
            "outage_moments": run.outages,
            "acked_after_retry": run.retried_submissions,
            "acked_200_existing": run.ack_status[200],
            # A job killed after Ollama answered but before foreman recorded it runs again: at least once.
            "ran_twice_upstream": max(0, stub_runs - results["states"].get("done", 0)),
            "elapsed_s": round(time.monotonic() - started, 1),
            "seed": args.seed,
            "machine": machine(),
        }
    )
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arg_parser(__doc__)
    add = parser.add_argument
    add("--jobs", type=int, default=2000, help="async jobs to submit (default %(default)s)")
    add("--kills", type=int, default=20, help="SIGKILLs of foreman (default %(default)s)")
    add("--outages", type=int, default=5, help="stub restarts (default %(default)s)")
    add("--seed", type=int, default=7, help="(default %(default)s)")
    add("--submitters", type=int, default=8, help="concurrent submitters (default %(default)s)")
    add(
        "--load-delay",
        type=float,
        default=0.02,
        help="the stub's seconds per model load (default %(default)s)",
    )
    add("--token-delay", type=float, default=0.001, help="the stub's seconds per token (default %(default)s)")
    add("--tokens", type=int, default=5, help="tokens per reply (default %(default)s)")
    add("--timeout", type=float, default=600, help="give up after this many seconds (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_in_workdir("foreman-crash-", args.workdir, partial(run_test, args))
    print(
        f"crash test: {results['jobs']} async jobs over {len(MODELS)} models, seed {results['seed']},"
        f" {results['elapsed_s']} s\n"
        f"  kills survived:            {results['kills_survived']}/{args.kills}"
        f" ({results['kills_while_submitting']} while jobs were being submitted;"
        f" {results['jobs_requeued_at_restart']} jobs found running at a restart and requeued)\n"
        f"  upstream outages survived: {results['outages_survived']}/{args.outages}\n"
        f"  acknowledged:              {results['acknowledged']}"
        f" ({results['acked_after_retry']} after a retry, {results['acked_200_existing']} of them"
        " answered 200: written before a kill, acknowledgement lost)\n"
        f"  jobs lost:                 {results['lost']}\n"
        f"  jobs duplicated:           {results['duplicated']}\n"
        f"  jobs failed:               {results['failed']}\n"
        f"  jobs unfinished:           {results['unfinished']}\n"
        f"  ran twice at the stub:     {results['ran_twice_upstream']} (killed after Ollama answered: at least once)"
    )
    write_json(args, results)
    bad = results["lost"] + results["duplicated"] + results["failed"] + results["unfinished"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
