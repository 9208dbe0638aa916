"""What foreman costs on top of one plain Python HTTP hop (issue 5, items 1-4 and 6).

    python bench/overhead.py --json bench/results/overhead.json

Starts, on loopback, a stub Ollama with no load or token delay, `foreman serve`
with its database on disk, and the floor `bench/bare_proxy.py`; then measures,
alternating requests between targets in the same run:

1. latency of sequential non-streamed /api/chat: direct, bare, foreman;
2. time to first and last chunk of a 200-chunk stream, and (against a second
   stub with a per-token delay) that chunks arrive as they are produced;
3. serial throughput: 16 concurrent clients through foreman against direct
   serial calls to the stub;
4. async intake (`Prefer: respond-async`) from 32 submitters against a bare
   handler that answers 202 without storing anything;
6. the same intake with FOREMAN_SYNC=full beside the default.

The targets are ratios against baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from _harness import (
    Proc,
    Processes,
    all_listening,
    cpu_of,
    free_port,
    lag_between,
    lag_buckets,
    run_clients,
    run_in_workdir,
)
from _report import Row, arg_parser, machine, median, ms, print_report, spread, write_json

JSON_HEADERS = {"Content-Type": "application/json"}


def chat(content: str, *, stream: bool, num_predict: int | None = None) -> bytes:
    body: dict[str, Any] = {
        "model": "llama3",
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    }
    if num_predict is not None:
        body["options"] = {"num_predict": num_predict}  # not a load option: one model group in foreman
    return json.dumps(body).encode()


def rotations(names: list[str]) -> itertools.cycle[list[str]]:
    """Each round starts with the next target, so none always follows another."""
    return itertools.cycle([names[i:] + names[:i] for i in range(len(names))])


# --------------------------------------------------------------------- 1. latency


async def timed_chat(http: aiohttp.ClientSession, url: str, body: bytes) -> float:
    start = time.perf_counter()
    async with http.post(url + "/api/chat", data=body, headers=JSON_HEADERS) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
    return time.perf_counter() - start


async def latency(
    http: aiohttp.ClientSession, targets: dict[str, Proc], args: argparse.Namespace
) -> dict[str, Any]:
    samples: dict[str, list[float]] = {name: [] for name in targets}
    order = rotations(list(targets))
    for i in range(args.warmup):
        for name in targets:
            await timed_chat(http, targets[name].url, chat(f"warm {i}", stream=False, num_predict=8))
    with cpu_of(*targets.values()) as used:
        for i in range(args.requests):
            body = chat(f"hello {i}", stream=False, num_predict=8)
            for name in next(order):
                samples[name].append(await timed_chat(http, targets[name].url, body))
    figures: dict[str, Any] = {name: spread(s) for name, s in samples.items()}
    for name, proc in targets.items():
        # The stub's CPU counts for every target; the proxies' only for their own requests.
        per = args.requests * (len(targets) if name == "direct" else 1)
        figures[name]["server_cpu_ms_per_request"] = ms(used[proc.name] / per)
    for p in ("p50", "p99"):
        direct = figures["direct"][f"{p}_ms"]
        added = {name: figures[name][f"{p}_ms"] - direct for name in ("bare", "foreman")}
        figures[f"added_{p}_ms"] = {name: round(value, 3) for name, value in added.items()}
        figures[f"ratio_{p}"] = round(added["foreman"] / added["bare"], 2)
    return figures


# ------------------------------------------------------------------- 2. streaming


async def stream_times(http: aiohttp.ClientSession, url: str, body: bytes) -> list[float]:
    """Seconds from sending the request to the arrival of each line of the reply."""
    start = time.perf_counter()
    arrivals = []
    async with http.post(url + "/api/chat", data=body, headers=JSON_HEADERS) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}")
        async for _line in response.content:
            arrivals.append(time.perf_counter() - start)
    return arrivals


async def streaming(
    http: aiohttp.ClientSession, targets: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    first: dict[str, list[float]] = {name: [] for name in targets}
    last: dict[str, list[float]] = {name: [] for name in targets}
    order = rotations(list(targets))
    for i in range(args.warmup // 5 + args.streams):
        body = chat(f"stream {i}", stream=True)
        for name in next(order):
            arrivals = await stream_times(http, targets[name], body)
            if len(arrivals) != args.chunks:
                raise RuntimeError(f"{name}: {len(arrivals)} chunks, expected {args.chunks}")
            if i >= args.warmup // 5:
                first[name].append(arrivals[0])
                last[name].append(arrivals[-1])
    figures: dict[str, Any] = {
        name: {"first_chunk": spread(first[name]), "last_chunk": spread(last[name])} for name in targets
    }
    direct = figures["direct"]["first_chunk"]["p50_ms"]
    added = {name: figures[name]["first_chunk"]["p50_ms"] - direct for name in ("bare", "foreman")}
    figures["added_first_chunk_p50_ms"] = {name: round(value, 3) for name, value in added.items()}
    figures["ratio_first_chunk_p50"] = round(added["foreman"] / added["bare"], 2)
    return figures


async def as_produced(
    http: aiohttp.ClientSession, targets: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    """Against a stub that waits between tokens: the first chunk must come long before the last."""
    figures: dict[str, Any] = {}
    runs: dict[str, list[list[float]]] = {name: [] for name in targets}
    order = rotations(list(targets))
    for i in range(args.slow_streams):
        body = chat(f"slow {i}", stream=True)
        for name in next(order):
            runs[name].append(await stream_times(http, targets[name], body))
    for name, arrivals in runs.items():
        first = median([a[0] for a in arrivals])
        last = median([a[-1] for a in arrivals])
        figures[name] = {"first_chunk_ms": ms(first), "last_chunk_ms": ms(last), "chunks": len(arrivals[0])}
    # Produced over `spread` seconds at the stub; a proxy that buffered would deliver them all at the end.
    produced = figures["direct"]["last_chunk_ms"] - figures["direct"]["first_chunk_ms"]
    for name in targets:
        seen = figures[name]["last_chunk_ms"] - figures[name]["first_chunk_ms"]
        figures[name]["as_produced"] = (
            seen >= 0.8 * produced and figures[name]["first_chunk_ms"] < 0.2 * produced
        )
    return figures


# ------------------------------------------------------------------ 3. throughput


async def throughput(
    http: aiohttp.ClientSession, stub: Proc, foreman: Proc, args: argparse.Namespace
) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"direct_serial": [], "foreman": []}
    cpu: dict[str, list[float]] = {"foreman": [], "stub": []}

    async def call(url: str, i: int) -> None:
        await timed_chat(http, url, chat(f"throughput {i}", stream=False, num_predict=8))

    async def direct() -> None:
        took = await run_clients(1, args.throughput_jobs, lambda i: call(stub.url, i))
        rates["direct_serial"].append(args.throughput_jobs / took)

    async def through_foreman() -> None:
        with cpu_of(foreman, stub) as used:
            took = await run_clients(args.clients, args.throughput_jobs, lambda i: call(foreman.url, i))
        rates["foreman"].append(args.throughput_jobs / took)
        cpu["foreman"].append(used["foreman"] / args.throughput_jobs)
        cpu["stub"].append(used["stub"] / args.throughput_jobs)

    await run_clients(args.clients, args.warmup, lambda i: call(foreman.url, i))
    for round_ in range(args.throughput_rounds):
        steps = [direct, through_foreman] if round_ % 2 == 0 else [through_foreman, direct]
        for step in steps:
            await step()
    direct_rate, foreman_rate = median(rates["direct_serial"]), median(rates["foreman"])
    return {
        "jobs_per_round": args.throughput_jobs,
        "clients": args.clients,
        "direct_serial_per_s": round(direct_rate, 1),
        "foreman_per_s": round(foreman_rate, 1),
        "ratio": round(foreman_rate / direct_rate, 2),
        "rounds": {name: [round(r, 1) for r in values] for name, values in rates.items()},
        "cpu_ms_per_job": {name: ms(median(values)) for name, values in cpu.items()},
    }


# ---------------------------------------------------------------------- 4. intake


class RawConnection:
    """One keep-alive HTTP/1.1 connection that costs the client next to nothing, so the server is measured."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        self._reader, self._writer, self._port = reader, writer, port

    @classmethod
    async def open(cls, port: int) -> RawConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, port)

    async def post(self, path: str, body: bytes, headers: str = "") -> tuple[int, bytes]:
        self._writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self._port}\r\nContent-Type: application/json\r\n"
            f"{headers}Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self._reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return int(head[9:12]), await self._reader.readexactly(length)

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


async def submit_async(port: int, submitters: int, jobs: int, first: int) -> float:
    """Async jobs acknowledged per second from `submitters` connections, each waiting for its 202."""
    connections = [await RawConnection.open(port) for _ in range(submitters)]
    counter = itertools.count(first)
    end = first + jobs

    async def submitter(connection: RawConnection) -> None:
        while (i := next(counter)) < end:
            status, answer = await connection.post(
                "/api/chat", chat(f"batch item {i}", stream=False), "Prefer: respond-async\r\n"
            )
            if status != 202:
                raise RuntimeError(f"port {port} answered {status}: {answer[:200]!r}")

    try:
        start = time.perf_counter()
        await asyncio.gather(*(submitter(c) for c in connections))
        return jobs / (time.perf_counter() - start)
    finally:
        for connection in connections:
            await connection.close()


async def intake(targets: dict[str, Proc], args: argparse.Namespace) -> dict[str, Any]:
    rates: dict[str, list[float]] = {name: [] for name in targets}
    cpu: dict[str, list[float]] = {name: [] for name in targets}
    client_share: dict[str, list[float]] = {name: [] for name in targets}
    submitted = 0
    for proc in targets.values():
        await submit_async(proc.port, args.submitters, args.warmup, submitted)
    submitted += args.warmup
    order = rotations(list(targets))
    for _ in range(args.intake_rounds):
        for name in next(order):
            proc = targets[name]
            with cpu_of(proc) as used:
                rate = await submit_async(proc.port, args.submitters, args.intake_jobs, submitted)
            submitted += args.intake_jobs
            rates[name].append(rate)
            cpu[name].append(used[proc.name] / args.intake_jobs)
            # Near 1.0 would mean the client, not the server, set the pace.
            client_share[name].append(used["client"] * rate / args.intake_jobs)
    bare = median(rates["bare"])
    figures: dict[str, Any] = {
        "jobs_per_round": args.intake_jobs,
        "submitters": args.submitters,
        "worker": "idle: foreman's upstream is a closed port, so jobs only wait and the worker takes no CPU",
        # Each foreman keeps its queue across rounds, as one big batch would.
        "queue_depth_at_round_start": [args.warmup + r * args.intake_jobs for r in range(args.intake_rounds)],
    }
    for name in targets:
        rate = median(rates[name])
        figures[name] = {
            "per_s": round(rate, 1),
            "ratio_to_bare": round(rate / bare, 2),
            "rounds": [round(r, 1) for r in rates[name]],
            "server_cpu_ms_per_job": ms(median(cpu[name])),
            "client_cpu_share": round(median(client_share[name]), 2),
        }
    return figures


# ------------------------------------------------------------------------- main


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with Processes(workdir) as procs:
        stub = procs.stub(models="llama3", tokens=args.chunks - 1, load_delay=0, token_delay=0)
        slow = procs.stub(
            "slow-stub",
            models="llama3",
            tokens=args.slow_chunks - 1,
            load_delay=0,
            token_delay=args.token_delay,
        )
        bare = procs.bare("bare", stub.url)
        foreman = procs.foreman("foreman", stub.url, env={"FOREMAN_PARALLEL": str(args.parallel)})
        slow_bare = procs.bare("slow-bare", slow.url)
        slow_foreman = procs.foreman("slow-foreman", slow.url)
        # Nothing listens upstream of the intake daemons: jobs wait, and the worker stays out of the way.
        nowhere = f"http://127.0.0.1:{free_port()}"
        accept = procs.bare("bare-accept")
        normal = procs.foreman("foreman-sync-normal", nowhere, env={"FOREMAN_SYNC": "normal"})
        full = procs.foreman("foreman-sync-full", nowhere, env={"FOREMAN_SYNC": "full"})
        control = procs.lag_control()
        await all_listening(stub, slow, bare, foreman, slow_bare, slow_foreman, accept, normal, full, control)
        results: dict[str, Any] = {"machine": machine()}
        lag: dict[str, Any] = {}
        async with aiohttp.ClientSession() as http:
            print("1. latency ...", file=sys.stderr)
            async with loop_lag(http, lag, "latency", foreman, control):
                results["latency"] = await latency(
                    http, {"direct": stub, "bare": bare, "foreman": foreman}, args
                )
            targets = {"direct": stub.url, "bare": bare.url, "foreman": foreman.url}
            print("2. streaming ...", file=sys.stderr)
            async with loop_lag(http, lag, "streaming", foreman, control):
                results["streaming"] = await streaming(http, targets, args)
            slow_targets = {"direct": slow.url, "bare": slow_bare.url, "foreman": slow_foreman.url}
            results["as_produced"] = await as_produced(http, slow_targets, args)
            print("3. throughput ...", file=sys.stderr)
            async with loop_lag(http, lag, "throughput", foreman, control):
                results["throughput"] = await throughput(http, stub, foreman, args)
            print("4/6. intake ...", file=sys.stderr)
            async with (
                loop_lag(http, lag, "intake", normal, control),
                loop_lag(http, lag, "intake_sync_full", full, control),
            ):
                results["intake"] = await intake(
                    {"bare": accept, "sync_normal": normal, "sync_full": full}, args
                )
        results["loop_lag"] = lag
        results["machine"]["loadavg_end"] = machine()["loadavg"]
        return results


@contextlib.asynccontextmanager
async def loop_lag(
    http: aiohttp.ClientSession, into: dict[str, Any], phase: str, proc: Proc, control: Proc
) -> AsyncIterator[None]:
    """foreman's event-loop lag during the block, from its /metrics (absent from builds without the probe).

    `control` is an idle loop with the same probe: its lag over the same
    window is the machine's share (other processes taking the CPU).
    """
    before, control_before = await lag_buckets(http, proc.url), await lag_buckets(http, control.url)
    yield
    if before:
        into[phase] = lag_between(before, await lag_buckets(http, proc.url))
        into[phase]["control"] = lag_between(control_before, await lag_buckets(http, control.url))


def table(results: dict[str, Any]) -> list[Row]:
    lat, st, prod = results["latency"], results["streaming"], results["as_produced"]
    thr, intake_ = results["throughput"], results["intake"]
    rows = []
    for p, target in (("p50", 1.7), ("p99", 2.0)):
        added = lat[f"added_{p}_ms"]
        rows.append(
            Row(
                "1 latency",
                f"{p} non-streamed chat (ms)",
                f"direct {lat['direct'][f'{p}_ms']:.2f}, bare {lat['bare'][f'{p}_ms']:.2f} (+{added['bare']:.2f}),"
                f" foreman {lat['foreman'][f'{p}_ms']:.2f} (+{added['foreman']:.2f});"
                f" foreman/bare added = {lat[f'ratio_{p}']:.2f}",
                f"<= {target}",
                lat[f"ratio_{p}"] <= target,
            )
        )
    for which in ("first_chunk", "last_chunk"):
        rows.append(
            Row(
                "2 streaming",
                f"{which.replace('_', ' ')} p50 (ms)",
                ", ".join(
                    f"{name} {st[name][which]['p50_ms']:.2f}" for name in ("direct", "bare", "foreman")
                ),
            )
        )
    added = st["added_first_chunk_p50_ms"]
    rows.append(
        Row(
            "2 streaming",
            "added first chunk p50",
            f"bare +{added['bare']:.2f} ms, foreman +{added['foreman']:.2f} ms;"
            f" ratio {st['ratio_first_chunk_p50']:.2f}",
            "<= 1.7",
            st["ratio_first_chunk_p50"] <= 1.7,
        )
    )
    rows.append(
        Row(
            "2 streaming",
            "chunks arrive as produced",
            "; ".join(
                f"{name} first {prod[name]['first_chunk_ms']:.0f} ms, last {prod[name]['last_chunk_ms']:.0f} ms"
                for name in ("direct", "bare", "foreman")
            ),
            "first << last",
            all(prod[name]["as_produced"] for name in ("bare", "foreman")),
        )
    )
    rows.append(
        Row(
            "3 throughput",
            f"{thr['clients']} clients via foreman vs direct serial (jobs/s)",
            f"direct {thr['direct_serial_per_s']:.0f}, foreman {thr['foreman_per_s']:.0f}; ratio {thr['ratio']:.2f}",
            ">= 0.45",
            thr["ratio"] >= 0.45,
        )
    )
    bare, normal, full = intake_["bare"], intake_["sync_normal"], intake_["sync_full"]
    depths = intake_["queue_depth_at_round_start"]
    rows.append(
        Row(
            "4 intake",
            f"async 202s/s, {intake_['submitters']} submitters",
            f"bare {bare['per_s']:.0f}, foreman {normal['per_s']:.0f}; ratio {normal['ratio_to_bare']:.2f}",
            ">= 0.5",
            normal["ratio_to_bare"] >= 0.5,
        )
    )
    rows.append(
        Row(
            "4 intake",
            "foreman by queue depth (202s/s)",
            f"{normal['rounds'][0]:.0f} in the round from {depths[0]} queued"
            f" ... {normal['rounds'][-1]:.0f} in the round from {depths[-1]}",
        )
    )
    rows.append(
        Row(
            "6 durability",
            "intake with FOREMAN_SYNC=full (202s/s)",
            f"full {full['per_s']:.0f} vs normal {normal['per_s']:.0f}"
            f" ({full['per_s'] / normal['per_s']:.2f}x); vs bare {full['ratio_to_bare']:.2f}",
        )
    )
    lag = results.get("loop_lag", {})
    if lag:
        p99 = max(phase["p99_ms"] for phase in lag.values())
        worst = max(phase["max_ms"] for phase in lag.values())
        rows.append(
            Row(
                "lag",
                "foreman's event-loop lag p99 / max (ms) per phase",
                "; ".join(
                    f"{name} {v['p99_ms']:.2f} / <={v['max_ms']:g}"
                    f" (idle control loop {v['control']['p99_ms']:.2f} / <={v['control']['max_ms']:g})"
                    for name, v in lag.items()
                ),
                "p99 < 2, max < 10",
                p99 < 2 and worst < 10,
            )
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arg_parser(__doc__)
    add = parser.add_argument
    add("--requests", type=int, default=2000, help="latency samples per target (default %(default)s)")
    add("--warmup", type=int, default=50, help="unmeasured requests per target first (default %(default)s)")
    add("--streams", type=int, default=200, help="streams per target (default %(default)s)")
    add("--chunks", type=int, default=200, help="chunks per stream, done line included (default %(default)s)")
    add("--slow-streams", type=int, default=3, help="streams per target, slow stub (default %(default)s)")
    add("--slow-chunks", type=int, default=100, help="chunks per slow stream (default %(default)s)")
    add(
        "--token-delay", type=float, default=0.005, help="slow stub's seconds per token (default %(default)s)"
    )
    add("--throughput-jobs", type=int, default=600, help="jobs per throughput round (default %(default)s)")
    add("--throughput-rounds", type=int, default=3, help="(default %(default)s)")
    add("--clients", type=int, default=16, help="concurrent clients through foreman (default %(default)s)")
    add("--intake-jobs", type=int, default=2000, help="async jobs per intake round (default %(default)s)")
    add("--intake-rounds", type=int, default=5, help="(default %(default)s)")
    add("--submitters", type=int, default=32, help="concurrent async submitters (default %(default)s)")
    add(
        "--parallel",
        type=int,
        default=1,
        help="FOREMAN_PARALLEL of the foreman under test (default %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_in_workdir("foreman-overhead-", args.workdir, partial(run, args))
    print_report("foreman overhead", results, table(results))
    print(f"\nintake: {results['intake']['worker']}")
    write_json(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
