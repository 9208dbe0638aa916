"""foreman with a million jobs waiting (issue 5, item 5).

    python bench/scale.py --json bench/results/scale.json
    python bench/scale.py --jobs 100000      # a smaller run

Queues `--jobs` async jobs across 8 models through foreman's store API (not
HTTP), then measures:

- the time to pick the next job: `QueueFile.claim` with the real
  drain-by-model policy, with a model resident and cold (target < 1 ms);
- the RSS of a `foreman serve` process on that database, idle (its upstream
  is a closed port, so the jobs wait) and draining into a stub Ollama
  (target < 100 MB);
- the time from spawning `foreman serve` to the stub receiving a request for
  the first job, over several kill -9 restarts (target < 2 s).

The stub runs inside this process, so arrival times and spawn times come from
the same clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from overhead import submit_async
from ulid import ULID

from _harness import Proc, Processes, free_port, lag_between, lag_buckets, run_in_workdir
from _report import Row, arg_parser, machine, median, ms, print_report, spread, write_json
from foreman.job import JobState, NewJob, Priority
from foreman.ollama.names import model_key
from foreman.scheduling import policy as scheduler
from foreman.storage.sqlite.queue_file import QueueFile
from stub_ollama import Stub, StubModel, StubServer, StubSettings

MODELS = [f"model{i}" for i in range(8)]
BATCH = 50_000


def new_jobs(first: int, count: int) -> Iterator[NewJob]:
    """Async chat jobs, round-robin over the models, as `POST /api/chat` with respond-async makes them."""
    keys = [model_key(m, None) for m in MODELS]
    for i in range(first, first + count):
        model = MODELS[i % len(MODELS)]
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"batch question {i}"}],
            "stream": False,
        }
        yield NewJob(
            id=str(ULID()),
            endpoint="/api/chat",
            model=model,
            model_key=keys[i % len(MODELS)],
            stream=False,
            body=json.dumps(body).encode(),
            created_at=time.time(),
            respond_async=True,
        )


def build(path: Path, jobs: int) -> dict[str, Any]:
    start = time.perf_counter()
    store = QueueFile(path)
    try:
        for first in range(0, jobs, BATCH):
            store.insert_many(new_jobs(first, min(BATCH, jobs - first)))
            print(f"  {first + min(BATCH, jobs - first)} jobs queued", file=sys.stderr, end="\r")
    finally:
        store.close()
    print(file=sys.stderr)
    return {"jobs": jobs, "insert_s": round(time.perf_counter() - start, 1), "db_mib": mib(path)}


def mib(path: Path) -> float:
    files = [path, path.with_name(path.name + "-wal")]
    return round(sum(p.stat().st_size for p in files if p.exists()) / 2**20, 1)


POLICY = scheduler.Policy()


def time_store(path: Path, picks: int) -> dict[str, Any]:
    """Claim the next job `picks` times each with a resident model and cold; every claim is put back."""
    store = QueueFile(path)
    figures: dict[str, Any] = {}
    try:
        for name, resident in (("resident", frozenset({model_key(MODELS[3], None)})), ("cold", frozenset())):
            state = scheduler.State(resident=resident)

            def choose(queues: list[scheduler.ModelQueue], state: scheduler.State = state) -> Any:
                return POLICY.pick(queues, state, time.time())

            samples = []
            for _ in range(picks):
                start = time.perf_counter()
                claim = store.claim(choose, time.time())
                samples.append(time.perf_counter() - start)
                assert claim is not None
                store.requeue(claim.job, attempt=claim.job.attempt, error=None)
            figures[f"claim_{name}"] = spread(samples)
        # What an async submission and GET /jobs/{id} pay for `position`, and /status for its counts.
        [newest] = store.list_jobs(state=JobState.QUEUED, model_key=None, limit=1, before=None)

        def order(queues: list[scheduler.ModelQueue]) -> list[tuple[str, Priority]]:
            return scheduler.drain_order(POLICY, queues, scheduler.State(), time.time())

        # Medians of a few calls, so one cold cache does not make the figure.
        figures["position_of_newest_ms"] = ms(
            median(
                [
                    timed(lambda: store.position(newest.id, newest.model_key, newest.priority, order))
                    for _ in range(5)
                ]
            )
        )
        figures["counts_by_state_ms"] = ms(median([timed(store.counts_by_state) for _ in range(5)]))
    finally:
        store.close()
    return figures


def timed(call: Any) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


async def sample_rss(proc: Proc, seconds: float) -> float:
    """The highest RSS seen over `seconds`, sampled every 50 ms."""
    highest = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        highest = max(highest, proc.rss_mib())
        await asyncio.sleep(0.05)
    return round(highest, 1)


async def idle(procs: Processes, db: Path, control: Proc, args: argparse.Namespace) -> dict[str, Any]:
    """foreman on the full queue with nowhere to send it: boot time, RSS, and the answers a person asks for."""
    # Room for the jobs submitted on top of the queue while the loop's lag is watched.
    env = {"FOREMAN_DB": str(db), "FOREMAN_MAX_QUEUE": str(args.jobs + args.lag_jobs + 1)}
    proc = procs.foreman("foreman-idle", f"http://127.0.0.1:{free_port()}", env=env)
    try:
        await proc.listening(within=120)
        listening_s = time.monotonic() - proc.spawned_at
        figures: dict[str, Any] = {"listening_s": round(listening_s, 2)}
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/status", "/jobs?limit=50"):
                start = time.perf_counter()
                async with http.get(proc.url + path) as response:
                    await response.read()
                    assert response.status == 200, (path, response.status)
                figures[f"GET {path} ms"] = ms(time.perf_counter() - start)
            figures["loop_lag_busy"] = await lag_under_load(http, proc, control, args)
        figures["rss_mib"] = await sample_rss(proc, args.sample_seconds)
        figures["peak_rss_mib"] = round(proc.peak_rss_mib(), 1)
        return figures
    finally:
        proc.stop()


async def lag_under_load(
    http: aiohttp.ClientSession, proc: Proc, control: Proc, args: argparse.Namespace
) -> dict[str, Any]:
    """foreman's event-loop lag while it takes async jobs on top of the full queue and answers /status and /jobs.

    The intake keeps the write-ahead log growing, so checkpoints run
    throughout; the reads count and list over every job.
    """
    stop = asyncio.Event()

    async def reader() -> int:
        answered = 0
        while not stop.is_set():
            for path in ("/status", "/jobs?limit=50", "/jobs?state=queued&limit=50"):
                async with http.get(proc.url + path) as response:
                    await response.read()
                answered += 1
        return answered

    before, control_before = await lag_buckets(http, proc.url), await lag_buckets(http, control.url)
    start = time.perf_counter()
    reading = asyncio.create_task(reader())
    rate = await submit_async(proc.port, 16, args.lag_jobs, first=10**9)
    stop.set()
    reads = await reading
    seconds = time.perf_counter() - start
    lag = lag_between(before, await lag_buckets(http, proc.url))
    lag["control"] = lag_between(control_before, await lag_buckets(http, control.url))
    return {**lag, "seconds": round(seconds, 1), "intake_per_s": round(rate, 1), "reads": reads}


def job_arrived_since(seen: int) -> Callable[[Stub], bool]:
    """Whether the stub got a request for a job (not a load) after its first `seen` requests."""
    return lambda stub: any(not r.is_load for r in stub.requests[seen:])


async def restarts(procs: Processes, db: Path, control: Proc, args: argparse.Namespace) -> dict[str, Any]:
    """Start foreman `--restarts` times on the queue, killing it with SIGKILL once the first job reached the stub."""
    models = tuple(StubModel(f"{m}:latest") for m in MODELS)
    to_load, to_job = [], []
    async with StubServer(StubSettings(models=models, load_delay=0, token_delay=0)) as server:
        stub = server.stub
        proc = procs.foreman("foreman-restart", server.url, env={"FOREMAN_DB": str(db)})
        for attempt in range(args.restarts):
            if attempt:
                proc.spawn()
            seen = len(stub.requests)
            await stub.wait_for(job_arrived_since(seen), timeout=120)
            load = next(r for r in stub.requests[seen:])
            job = next(r for r in stub.requests[seen:] if not r.is_load)
            to_load.append(load.arrived_at - proc.spawned_at)
            to_job.append(job.arrived_at - proc.spawned_at)
            if attempt < args.restarts - 1:
                proc.kill()
        # The last one keeps draining while its memory and its loop are watched.
        done_before = len(stub.inference_requests())
        async with aiohttp.ClientSession() as http:
            lag_before, control_before = (
                await lag_buckets(http, proc.url),
                await lag_buckets(http, control.url),
            )
            rss = await sample_rss(proc, args.sample_seconds)
            lag = lag_between(lag_before, await lag_buckets(http, proc.url))
            lag["control"] = lag_between(control_before, await lag_buckets(http, control.url))
        drained = len(stub.inference_requests()) - done_before
        peak = round(proc.peak_rss_mib(), 1)
        proc.stop()
    return {
        "restarts": args.restarts,
        "to_first_request_s": [round(t, 3) for t in to_load],
        "to_first_job_s": [round(t, 3) for t in to_job],
        "median_to_first_job_s": round(median(to_job), 3),
        "draining_rss_mib": rss,
        "draining_peak_rss_mib": peak,
        "drained_per_s": round(drained / args.sample_seconds, 1),
        "loop_lag_draining": lag,
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    db = workdir / "scale.db"
    if db.exists():
        sys.exit(f"{db} exists: give an empty --workdir")
    results: dict[str, Any] = {"machine": machine()}
    print(f"queueing {args.jobs} jobs ...", file=sys.stderr)
    results["build"] = build(db, args.jobs)
    print("timing the pick ...", file=sys.stderr)
    results["store"] = time_store(db, args.picks)
    with Processes(workdir) as procs:
        print("foreman idle ...", file=sys.stderr)
        control = procs.lag_control()
        await control.listening()
        results["idle"] = await idle(procs, db, control, args)
        print("restarts ...", file=sys.stderr)
        results["restart"] = await restarts(procs, db, control, args)
    results["machine"]["loadavg_end"] = machine()["loadavg"]
    return results


def table(results: dict[str, Any]) -> list[Row]:
    store, idle_, restart = results["store"], results["idle"], results["restart"]
    build_ = results["build"]
    pick = max(store["claim_resident"]["p50_ms"], store["claim_cold"]["p50_ms"])
    rss = max(idle_["peak_rss_mib"], restart["draining_peak_rss_mib"])
    return [
        Row(
            "5 scale",
            "queue",
            f"{build_['jobs']} jobs, 8 models: {build_['db_mib']} MiB on disk, inserted in {build_['insert_s']} s",
        ),
        Row(
            "5 scale",
            "pick next job, median (ms)",
            f"resident {store['claim_resident']['p50_ms']:.3f} (p99 {store['claim_resident']['p99_ms']:.3f}),"
            f" cold {store['claim_cold']['p50_ms']:.3f} (p99 {store['claim_cold']['p99_ms']:.3f})",
            "< 1 ms",
            pick < 1,
        ),
        Row(
            "5 scale",
            "foreman RSS (MiB)",
            f"idle {idle_['rss_mib']} (peak {idle_['peak_rss_mib']}), draining {restart['draining_rss_mib']}"
            f" (peak {restart['draining_peak_rss_mib']}) at {restart['drained_per_s']} jobs/s",
            "< 100 MB",
            rss < 100,
        ),
        Row(
            "5 scale",
            "spawn to first job at the stub (s)",
            f"median {restart['median_to_first_job_s']:.2f} of {restart['to_first_job_s']};"
            f" listening after {idle_['listening_s']:.2f}",
            "< 2 s",
            restart["median_to_first_job_s"] < 2,
        ),
        Row(
            "lag",
            "event-loop lag p99 / max (ms), 1M queued",
            f"taking {idle_['loop_lag_busy']['intake_per_s']:.0f} async jobs/s for"
            f" {idle_['loop_lag_busy']['seconds']} s while /status and /jobs are read:"
            f" {idle_['loop_lag_busy']['p99_ms']:.2f} / <={idle_['loop_lag_busy']['max_ms']:g}"
            f" (idle control loop {idle_['loop_lag_busy']['control']['p99_ms']:.2f}"
            f" / <={idle_['loop_lag_busy']['control']['max_ms']:g});"
            f" draining: {restart['loop_lag_draining']['p99_ms']:.2f} / <={restart['loop_lag_draining']['max_ms']:g}"
            f" (control {restart['loop_lag_draining']['control']['p99_ms']:.2f}"
            f" / <={restart['loop_lag_draining']['control']['max_ms']:g})",
            "p99 < 2, max < 10",
            max(idle_["loop_lag_busy"]["p99_ms"], restart["loop_lag_draining"]["p99_ms"]) < 2
            and max(idle_["loop_lag_busy"]["max_ms"], restart["loop_lag_draining"]["max_ms"]) < 10,
        ),
        Row(
            "5 scale",
            "other answers at this size (ms)",
            f"position of the newest job {store['position_of_newest_ms']:.1f},"
            f" counts by state {store['counts_by_state_ms']:.1f}, GET /status {idle_['GET /status ms']:.1f},"
            f" GET /jobs {idle_['GET /jobs?limit=50 ms']:.1f}",
        ),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arg_parser(__doc__)
    add = parser.add_argument
    add("--jobs", type=int, default=1_000_000, help="jobs to queue (default %(default)s)")
    add("--picks", type=int, default=2000, help="timed claims of each kind (default %(default)s)")
    add("--restarts", type=int, default=3, help="foreman starts timed on the queue (default %(default)s)")
    add("--sample-seconds", type=float, default=5.0, help="seconds of RSS sampling (default %(default)s)")
    add(
        "--lag-jobs",
        type=int,
        default=20000,
        help="async jobs submitted on top of the queue while the loop's lag is watched (default %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_in_workdir("foreman-scale-", args.workdir, partial(run, args))
    print_report("foreman at scale", results, table(results))
    write_json(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
