"""Two builds of foreman side by side: what one change is worth, measured in one run.

    git worktree add /tmp/foreman-before <commit>   # or: git archive <commit> | tar -x -C DIR
    python bench/ab.py --before /tmp/foreman-before [--env-after FOREMAN_X=y] [--json out.json]

Starts a stub Ollama (no delays), the bare proxy and two `foreman serve`
processes, "before" from the given checkout and "after" from this one (or
the same build with different settings, through `--env-before`/`--env-after`).
Then, alternating between them request by request and round by round:

- sequential non-streamed /api/chat: added latency p50 and p99 over direct,
  as a ratio to the bare proxy's, and server CPU per request;
- sequential streamed /api/chat of `--stream-tokens` chunks (`--streams` of
  them, 0 for none): first and last chunk's added latency at p50, as a ratio
  to the bare proxy's, and server CPU per streamed request;
- 16-client serial throughput, as a ratio to direct serial calls;
- async intake from 32 submitters (each foreman against a closed upstream),
  as a ratio to the bare 202 handler.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
from overhead import chat, rotations, stream_times, submit_async, timed_chat

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


def settings(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


async def latency(http: aiohttp.ClientSession, targets: dict[str, Proc], args: argparse.Namespace) -> Any:
    samples: dict[str, list[float]] = {name: [] for name in targets}
    order = rotations(list(targets))
    for i in range(args.warmup):
        for proc in targets.values():
            await timed_chat(http, proc.url, chat(f"warm {i}", stream=False, num_predict=7))
    with cpu_of(*targets.values()) as used:
        for i in range(args.requests):
            body = chat(f"hello {i}", stream=False, num_predict=7)
            for name in next(order):
                samples[name].append(await timed_chat(http, targets[name].url, body))
    figures: dict[str, Any] = {name: spread(s) for name, s in samples.items()}
    for name, proc in targets.items():
        if name != "direct":
            figures[name]["server_cpu_ms_per_request"] = ms(used[proc.name] / args.requests)
    for p in ("p50", "p99"):
        direct = figures["direct"][f"{p}_ms"]
        bare = figures["bare"][f"{p}_ms"] - direct
        for name in ("before", "after"):
            figures[name][f"ratio_{p}"] = round((figures[name][f"{p}_ms"] - direct) / bare, 2)
    return figures


async def streamed(http: aiohttp.ClientSession, targets: dict[str, Proc], args: argparse.Namespace) -> Any:
    arrivals: dict[str, dict[str, list[float]]] = {name: {"first": [], "last": []} for name in targets}
    order = rotations(list(targets))
    for i in range(args.warmup // 5):
        for proc in targets.values():
            await stream_times(
                http, proc.url, chat(f"warm stream {i}", stream=True, num_predict=args.stream_tokens)
            )
    with cpu_of(*targets.values()) as used:
        for i in range(args.streams):
            body = chat(f"stream {i}", stream=True, num_predict=args.stream_tokens)
            for name in next(order):
                times = await stream_times(http, targets[name].url, body)
                if len(times) != args.stream_tokens + 1:
                    raise RuntimeError(f"{name}: {len(times)} lines, expected {args.stream_tokens + 1}")
                arrivals[name]["first"].append(times[0])
                arrivals[name]["last"].append(times[-1])
    figures: dict[str, Any] = {
        name: {f"{which}_chunk": spread(a[which]) for which in ("first", "last")}
        for name, a in arrivals.items()
    }
    for name, proc in targets.items():
        if name != "direct":
            figures[name]["server_cpu_ms_per_request"] = ms(used[proc.name] / args.streams)
    for which in ("first", "last"):
        direct = figures["direct"][f"{which}_chunk"]["p50_ms"]
        bare = figures["bare"][f"{which}_chunk"]["p50_ms"] - direct
        for name in ("before", "after"):
            figures[name][f"ratio_{which}_p50"] = round(
                (figures[name][f"{which}_chunk"]["p50_ms"] - direct) / bare, 2
            )
    return figures


async def throughput(
    http: aiohttp.ClientSession, stub: Proc, builds: dict[str, Proc], args: argparse.Namespace
) -> Any:
    rates: dict[str, list[float]] = {"direct": [], **{name: [] for name in builds}}
    cpu: dict[str, list[float]] = {name: [] for name in builds}

    async def call(url: str, i: int) -> None:
        await timed_chat(http, url, chat(f"throughput {i}", stream=False, num_predict=7))

    for proc in builds.values():
        await run_clients(args.clients, args.warmup, lambda i, url=proc.url: call(url, i))
    order = rotations(["direct", *builds])
    for _ in range(args.rounds):
        for name in next(order):
            if name == "direct":
                rates[name].append(args.jobs / await run_clients(1, args.jobs, lambda i: call(stub.url, i)))
                continue
            proc = builds[name]
            with cpu_of(proc) as used:
                took = await run_clients(args.clients, args.jobs, lambda i, u=proc.url: call(u, i))
            rates[name].append(args.jobs / took)
            cpu[name].append(used[proc.name] / args.jobs)
    direct = median(rates["direct"])
    return {
        "direct_per_s": round(direct, 1),
        **{
            name: {
                "per_s": round(median(rates[name]), 1),
                "ratio": round(median(rates[name]) / direct, 2),
                "rounds": [round(r, 1) for r in rates[name]],
                "cpu_ms_per_job": ms(median(cpu[name])),
            }
            for name in builds
        },
    }


async def intake(targets: dict[str, Proc], args: argparse.Namespace) -> Any:
    rates: dict[str, list[float]] = {name: [] for name in targets}
    submitted = 0
    for proc in targets.values():
        await submit_async(proc.port, args.submitters, args.warmup, submitted)
    submitted += args.warmup
    order = rotations(list(targets))
    for _ in range(args.rounds):
        for name in next(order):
            rates[name].append(
                await submit_async(targets[name].port, args.submitters, args.intake_jobs, submitted)
            )
            submitted += args.intake_jobs
    bare = median(rates["bare"])
    return {
        name: {
            "per_s": round(median(r), 1),
            "ratio": round(median(r) / bare, 2),
            "rounds": [round(x) for x in r],
        }
        for name, r in rates.items()
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    before_env, after_env = settings(args.env_before), settings(args.env_after)
    with Processes(workdir) as procs:
        # num_predict caps each reply: 7 tokens (as always) for the non-streamed phases, more for streams.
        stub = procs.stub(models="llama3", tokens=max(7, args.stream_tokens), load_delay=0, token_delay=0)
        bare = procs.bare("bare", stub.url)
        before = procs.foreman("before", stub.url, env=before_env, source=args.before)
        after = procs.foreman("after", stub.url, env=after_env)
        nowhere = f"http://127.0.0.1:{free_port()}"
        accept = procs.bare("bare-accept")
        intake_before = procs.foreman("intake-before", nowhere, env=before_env, source=args.before)
        intake_after = procs.foreman("intake-after", nowhere, env=after_env)
        await all_listening(stub, bare, before, after, accept, intake_before, intake_after)
        results: dict[str, Any] = {"machine": machine()}
        async with aiohttp.ClientSession() as http:
            builds = {"before": before, "after": after}
            lag_start = {name: await lag_buckets(http, proc.url) for name, proc in builds.items()}
            print("latency ...", file=sys.stderr)
            targets = {"direct": stub, "bare": bare, **builds}
            results["latency"] = await latency(http, targets, args)
            if args.streams:
                print("streamed ...", file=sys.stderr)
                results["streamed"] = await streamed(http, targets, args)
            print("throughput ...", file=sys.stderr)
            results["throughput"] = await throughput(http, stub, builds, args)
            # The loop's lag over both phases, where the build has the probe.
            results["loop_lag"] = {
                name: lag_between(lag_start[name], await lag_buckets(http, proc.url))
                for name, proc in builds.items()
                if lag_start[name]
            }
        if args.intake_jobs:
            print("intake ...", file=sys.stderr)
            intake_targets = {"bare": accept, "before": intake_before, "after": intake_after}
            results["intake"] = await intake(intake_targets, args)
        results["machine"]["loadavg_end"] = machine()["loadavg"]
        return results


def table(results: dict[str, Any]) -> list[Row]:
    lat, thr = results["latency"], results["throughput"]
    rows = []
    for name in ("before", "after"):
        rows.append(
            Row(
                name,
                "added latency / bare's, p50 / p99; CPU per request",
                f"{lat[name]['ratio_p50']:.2f} / {lat[name]['ratio_p99']:.2f};"
                f" {lat[name]['server_cpu_ms_per_request']:.2f} ms",
            )
        )
        rows.append(
            Row(
                name,
                "16 clients / direct serial; CPU per job",
                f"{thr[name]['ratio']:.2f} ({thr[name]['per_s']:.0f}/s of {thr['direct_per_s']:.0f});"
                f" {thr[name]['cpu_ms_per_job']:.2f} ms",
            )
        )
        if "streamed" in results:
            st = results["streamed"]
            rows.append(
                Row(
                    name,
                    "stream: added first / last chunk / bare's, p50; CPU per stream",
                    f"{st[name]['ratio_first_p50']:.2f} / {st[name]['ratio_last_p50']:.2f};"
                    f" {st[name]['server_cpu_ms_per_request']:.2f} ms (bare {st['bare']['server_cpu_ms_per_request']:.2f})",
                )
            )
        if name in results.get("loop_lag", {}):
            lag = results["loop_lag"][name]
            rows.append(
                Row(name, "event-loop lag p99 / max (ms)", f"{lag['p99_ms']:.2f} / <={lag['max_ms']:g}")
            )
        if "intake" in results:
            intake_ = results["intake"]
            rows.append(
                Row(
                    name,
                    "async intake / bare 202",
                    f"{intake_[name]['ratio']:.2f} ({intake_[name]['per_s']:.0f}/s of {intake_['bare']['per_s']:.0f})",
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = arg_parser(__doc__)
    add = parser.add_argument
    add("--before", type=Path, required=True, help="checkout of the build to compare against")
    add("--env-before", action="append", default=[], metavar="FOREMAN_X=V", help="settings of 'before'")
    add("--env-after", action="append", default=[], metavar="FOREMAN_X=V", help="settings of 'after'")
    add("--requests", type=int, default=1000, help="latency samples per target (default %(default)s)")
    add("--warmup", type=int, default=50, help="(default %(default)s)")
    add(
        "--streams",
        type=int,
        default=300,
        help="streamed requests per target, 0 for none (default %(default)s)",
    )
    add("--stream-tokens", type=int, default=100, help="chunks per streamed reply (default %(default)s)")
    add("--jobs", type=int, default=600, help="jobs per throughput round (default %(default)s)")
    add("--rounds", type=int, default=3, help="throughput and intake rounds (default %(default)s)")
    add("--clients", type=int, default=16, help="(default %(default)s)")
    add(
        "--intake-jobs",
        type=int,
        default=1000,
        help="async jobs per intake round, 0 for none (default %(default)s)",
    )
    add("--submitters", type=int, default=32, help="(default %(default)s)")
    args = parser.parse_args(argv)
    args.before = args.before.resolve()
    results = run_in_workdir("foreman-ab-", args.workdir, partial(run, args))
    print_report("foreman A/B", results, table(results))
    write_json(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
