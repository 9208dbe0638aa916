"""Embeddings at scale (issue 15): coalescing and the cache, against direct calls to Ollama.

    python bench/embed.py --json bench/results/embed.json

Starts, on loopback, a stub Ollama whose embed calls cost what Ollama's do,
a fixed part per call plus a part per input, one call at a time (like
OLLAMA_NUM_PARALLEL=1): 10 ms + 1 ms per input by default. Then, in each
round, 16 clients send 800 single-input /api/embed calls (a RAG indexing
run), alternating which goes first:

- direct: to the stub;
- foreman, first pass: a corpus foreman has not seen, through `foreman serve`;
- foreman, second pass: the same corpus again, right after its first pass.

Targets, as ratios in the same run: the first pass through foreman at least 3x
the direct throughput; the second pass at least 4x the direct one with 0
calls reaching Ollama (counted in the stub's own log). The vectors there have
the stub's default 8 floats (`--dims`), as in the issue's own measurement.

Last, foreman's memory while its cache fills: a second stub and foreman pair,
with vectors of nomic-embed-text's 768 floats and FOREMAN_EMBED_CACHE=64M, take
8192 new inputs, 64 per request, twice what the bound holds. Resident set size
must not follow the cache's size (the vectors live in SQLite, not in the
process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from _harness import Proc, Processes, all_listening, cpu_of, run_clients, run_in_workdir
from _report import Row, arg_parser, machine, median, ms, print_report, write_json

MODEL = "nomic-embed-text"
HEADERS = {"Content-Type": "application/json"}


def corpus(name: str, size: int) -> list[str]:
    """`size` distinct chunks of text, about 30 words each, named so no two runs share one."""
    words = [
        "the",
        "queue",
        "model",
        "answer",
        "waits",
        "its",
        "turn",
        "while",
        "weights",
        "load",
        "into",
        "memory",
        "then",
        "words",
        "flow",
        "out",
    ]
    return [
        " ".join([name, str(i), *(words[(i * 7 + j) % len(words)] for j in range(28))]) for i in range(size)
    ]


async def embed(http: aiohttp.ClientSession, url: str, inputs: str | list[str]) -> None:
    body = json.dumps({"model": MODEL, "input": inputs}).encode()
    async with http.post(url + "/api/embed", data=body, headers=HEADERS) as response:
        data = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {data[:200]!r}")


def stub_calls(stub: Proc) -> int:
    """Embed calls the stub served (loads left out), from its own log."""
    text = stub.log.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if "request /api/embed " in line and "outcome=ok" in line)


async def passes(
    http: aiohttp.ClientSession, stub: Proc, foreman: Proc, args: argparse.Namespace
) -> dict[str, Any]:
    seconds: dict[str, list[float]] = {"direct": [], "foreman_first": [], "foreman_second": []}
    calls: dict[str, list[int]] = {"foreman_first": [], "foreman_second": []}
    cpu: dict[str, dict[str, list[float]]] = {
        which: {"foreman": [], "stub": [], "client": []}
        for which in ("direct", "foreman_first", "foreman_second")
    }

    async def direct(round_: int) -> None:
        texts = corpus(f"direct-{round_}", args.calls)
        with cpu_of(foreman, stub) as used:
            took = await run_clients(args.clients, args.calls, lambda i: embed(http, stub.url, texts[i]))
        seconds["direct"].append(took)
        for name, value in used.items():
            cpu["direct"][name].append(value / args.calls)

    async def through_foreman(round_: int) -> None:
        texts = corpus(f"foreman-{round_}", args.calls)
        for which in ("foreman_first", "foreman_second"):
            before = stub_calls(stub)
            with cpu_of(foreman, stub) as used:
                took = await run_clients(
                    args.clients, args.calls, lambda i: embed(http, foreman.url, texts[i])
                )
            seconds[which].append(took)
            await asyncio.sleep(0.2)  # the stub's log line follows its reply
            calls[which].append(stub_calls(stub) - before)
            for name, value in used.items():
                cpu[which][name].append(value / args.calls)

    await run_clients(args.clients, args.clients * 4, lambda i: embed(http, foreman.url, f"warm-up {i}"))
    await run_clients(args.clients, args.clients * 4, lambda i: embed(http, stub.url, f"warm-up {i}"))
    for round_ in range(args.rounds):
        print(f"  round {round_ + 1}/{args.rounds}", file=sys.stderr)
        steps = [direct, through_foreman] if round_ % 2 == 0 else [through_foreman, direct]
        for step in steps:
            await step(round_)
    rate = {name: args.calls / median(values) for name, values in seconds.items()}
    return {
        "calls_per_pass": args.calls,
        "clients": args.clients,
        "per_s": {name: round(value, 1) for name, value in rate.items()},
        "seconds": {name: [round(s, 3) for s in values] for name, values in seconds.items()},
        "first_pass_ratio": round(rate["foreman_first"] / rate["direct"], 2),
        "second_pass_ratio": round(rate["foreman_second"] / rate["direct"], 2),
        "ollama_calls": calls,
        # CPU each process spent per call (median over rounds): where the time goes on a busy machine.
        "cpu_ms_per_call": {
            which: {name: ms(median(values)) for name, values in by_process.items()}
            for which, by_process in cpu.items()
        },
    }


async def memory(http: aiohttp.ClientSession, foreman: Proc, args: argparse.Namespace) -> dict[str, Any]:
    """foreman's RSS while `fill_inputs` new vectors of `fill_dims` floats go into its cache, 64 per request."""

    limit = 0

    async def cache_bytes() -> int:
        nonlocal limit
        async with http.get(foreman.url + "/status") as response:
            cache = (await response.json())["embed_cache"]
        limit = int(cache["limit_bytes"])
        return int(cache["bytes"])

    texts = corpus("fill", args.fill_inputs)
    step = 64
    requests = [texts[i : i + step] for i in range(0, len(texts), step)]
    rounds = [requests[i : i + args.clients] for i in range(0, len(requests), args.clients)]
    samples = [(await cache_bytes(), foreman.rss_mib())]
    for round_ in rounds:
        await asyncio.gather(*(embed(http, foreman.url, inputs) for inputs in round_))
        samples.append((await cache_bytes(), foreman.rss_mib()))
    # The first round warms the process up (buffers, SQLite's page cache): the
    # growth that matters is what follows it, while the cache fills and evicts.
    (warm_bytes, warm_rss), (end_bytes, end_rss) = samples[1], samples[-1]
    peak_after = max(rss for _, rss in samples[1:])
    return {
        "inputs": args.fill_inputs,
        "cache_bytes": {"start": samples[0][0], "warm": warm_bytes, "end": end_bytes},
        "cache_mib": {
            "warm": round(warm_bytes / 2**20, 1),
            "end": round(end_bytes / 2**20, 1),
            "limit": round(limit / 2**20, 1),
        },
        "rss_mib": {
            "start": round(samples[0][1], 1),
            "warm": round(warm_rss, 1),
            "end": round(end_rss, 1),
            "max_after_warm": round(peak_after, 1),
            "growth_after_warm": round(peak_after - warm_rss, 1),
        },
        "peak_rss_mib": round(foreman.peak_rss_mib(), 1),
        "samples": [(round(b / 2**20, 1), round(r, 1)) for b, r in samples],
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with Processes(workdir) as procs:
        cost = {"embed_call_delay": args.call_ms / 1000, "embed_input_delay": args.input_ms / 1000}
        stub = procs.stub(models="llama3", embed_models=MODEL, load_delay=0, embedding_dims=args.dims, **cost)
        env = {"FOREMAN_EMBED_BATCH": str(args.batch), "FOREMAN_EMBED_CACHE": args.cache}
        foreman = procs.foreman("foreman", stub.url, env=env)
        # Memory on its own pair, with vectors of a real model's size and a cache
        # bound the fill goes past, so eviction runs too.
        big = procs.stub("stub-fill", models="llama3", embed_models=MODEL, embedding_dims=args.fill_dims)
        filled = procs.foreman("foreman-fill", big.url, env={"FOREMAN_EMBED_CACHE": args.fill_cache})
        await all_listening(stub, foreman, big, filled)
        results: dict[str, Any] = {"machine": machine()}
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as http:
            print("passes ...", file=sys.stderr)
            results["passes"] = await passes(http, stub, foreman, args)
            print("memory ...", file=sys.stderr)
            results["memory"] = await memory(http, filled, args)
        results["machine"]["loadavg_end"] = machine()["loadavg"]
        return results


def table(results: dict[str, Any]) -> list[Row]:
    p, mem = results["passes"], results["memory"]
    per_s, calls = p["per_s"], p["ollama_calls"]
    first_calls = median(calls["foreman_first"])
    rows = [
        Row(
            "4 first pass",
            f"{p['clients']} clients x {p['calls_per_pass']} one-input embeds (calls/s)",
            f"direct {per_s['direct']:.0f}, foreman {per_s['foreman_first']:.0f}; ratio {p['first_pass_ratio']:.2f};"
            f" Ollama calls {first_calls:.0f} (median)",
            ">= 3",
            p["first_pass_ratio"] >= 3,
        ),
        Row(
            "4 second pass",
            "the same corpus again (calls/s)",
            f"foreman {per_s['foreman_second']:.0f} vs direct {per_s['direct']:.0f}; ratio {p['second_pass_ratio']:.2f};"
            f" Ollama calls {calls['foreman_second']}",
            ">= 4, 0 calls",
            p["second_pass_ratio"] >= 4 and not any(calls["foreman_second"]),
        ),
        Row(
            "4 memory",
            f"RSS while {mem['inputs']} new vectors go into the cache (MiB)",
            f"cache {mem['cache_mib']['warm']} -> {mem['cache_mib']['end']} MiB"
            f" (bound {mem['cache_mib']['limit']});"
            f" RSS {mem['rss_mib']['warm']} -> {mem['rss_mib']['end']} (max {mem['rss_mib']['max_after_warm']},"
            f" {mem['rss_mib']['start']} before the first request)",
            "flat: +16 MiB at most",
            mem["rss_mib"]["growth_after_warm"] <= 16,
        ),
    ]
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arg_parser(__doc__)
    add = parser.add_argument
    add("--calls", type=int, default=800, help="one-input embed calls per pass (default %(default)s)")
    add("--clients", type=int, default=16, help="concurrent clients (default %(default)s)")
    add("--rounds", type=int, default=3, help="rounds of direct / foreman passes (default %(default)s)")
    add("--call-ms", type=float, default=10.0, help="stub's cost per embed call (default %(default)s)")
    add("--input-ms", type=float, default=1.0, help="stub's cost per input (default %(default)s)")
    add("--dims", type=int, default=8, help="floats per vector in the passes (default %(default)s)")
    add("--batch", type=int, default=64, help="FOREMAN_EMBED_BATCH (default %(default)s)")
    add("--cache", default="512M", help="FOREMAN_EMBED_CACHE (default %(default)s)")
    add(
        "--fill-inputs",
        type=int,
        default=8192,
        help="new inputs sent to fill the cache (default %(default)s)",
    )
    add("--fill-dims", type=int, default=768, help="floats per vector there (default %(default)s, as nomic)")
    add("--fill-cache", default="64M", help="FOREMAN_EMBED_CACHE there (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_in_workdir("foreman-embed-", args.workdir, partial(run, args))
    print_report("foreman embeddings", results, table(results))
    write_json(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
