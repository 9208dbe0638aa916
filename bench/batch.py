"""OpenAI's Batch API on the queue (issue 24): a 10,000-line chat batch over four models.

    python bench/batch.py --json bench/results/batch.json

Starts, on loopback, a stub Ollama with four chat models, one loaded at a
time, each load taking `--load-ms`, and `foreman serve` in front of it. The
batch file names the four models in a shuffled order (seeded), as a dataset
labelled by several models would. It is uploaded through `/v1/files`, run
through `/v1/batches`, and followed until it completes; meanwhile a client
sends an interactive chat request every `--probe-every` seconds.

Figures:

- loads: the models the stub loaded for the batch (its own log) against what
  first-come-first-served would cost: one load per change of model from one
  line to the next (and one for the first line);
- foreman's CPU per line: its process's user + system CPU from the batch's
  creation to its end, over the lines; and the time the lines took to enqueue
  (`in_progress_at - created_at`) and to run;
- for comparison, foreman's CPU per job when `--clients` clients send the same
  lines as async jobs (`Prefer: respond-async`) once the batch is done;
- the interactive requests' latency while the batch runs: they go before every
  waiting line (class `interactive`), so they wait at most for the line
  running and, when their model is not loaded, one swap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

from _harness import Proc, Processes, all_listening, run_clients, run_in_workdir
from _report import Row, arg_parser, machine, median, ms, percentile, print_report, write_json

MODELS = ("llama3", "mistral", "qwen2", "phi3")
CHAT = "/v1/chat/completions"


def batch_lines(count: int, seed: int) -> tuple[bytes, list[str]]:
    rng = random.Random(seed)
    models = [rng.choice(MODELS) for _ in range(count)]
    lines = [
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": CHAT,
                "body": {"model": model, "messages": [{"role": "user", "content": f"label item {i}"}]},
            }
        )
        for i, model in enumerate(models)
    ]
    return ("\n".join(lines) + "\n").encode(), models


def fifo_loads(models: list[str]) -> int:
    """Loads a one-model-at-a-time Ollama pays serving the lines in file order."""
    return sum(1 for i, model in enumerate(models) if i == 0 or model != models[i - 1])


def stub_loads(stub: Proc) -> int:
    return sum(1 for line in stub.log.read_text(errors="replace").splitlines() if " load " in f" {line} ")


async def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> Any:
    async with http.request(method, url, **kwargs) as response:
        body = await response.read()
        if response.status >= 400:
            raise RuntimeError(f"{url} answered {response.status}: {body[:300]!r}")
        return json.loads(body)


async def probes(http: aiohttp.ClientSession, url: str, every: float, stop: asyncio.Event) -> list[float]:
    """Interactive chat requests, one every `every` seconds until `stop`; their latencies."""
    latencies: list[float] = []
    rng = random.Random(7)
    while not stop.is_set():
        body = {"model": rng.choice(MODELS), "messages": [{"role": "user", "content": "interactive"}]}
        start = time.perf_counter()
        await call(http, "POST", url + CHAT, json=body)
        latencies.append(time.perf_counter() - start)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
    return latencies


async def as_async_jobs(
    http: aiohttp.ClientSession, foreman: Proc, content: bytes, clients: int
) -> dict[str, Any]:
    """The same lines sent by `clients` clients as async jobs (`Prefer: respond-async`), for comparison."""
    bodies = [json.dumps(json.loads(line)["body"]).encode() for line in content.splitlines()]
    status = await call(http, "GET", foreman.url + "/status")
    done_before = status["jobs"].get("done", 0)
    cpu_before = foreman.cpu_seconds()
    start = time.perf_counter()
    headers = {"Prefer": "respond-async", "Content-Type": "application/json"}

    async def one(i: int) -> None:
        await call(http, "POST", foreman.url + CHAT, data=bodies[i], headers=headers)

    await run_clients(clients, len(bodies), one)
    while True:
        status = await call(http, "GET", foreman.url + "/status")
        if status["jobs"].get("done", 0) >= done_before + len(bodies):
            break
        await asyncio.sleep(0.25)
    wall = time.perf_counter() - start
    cpu = foreman.cpu_seconds() - cpu_before
    return {
        "jobs": len(bodies),
        "clients": clients,
        "wall_s": round(wall, 2),
        "cpu_ms_per_job": ms(cpu / len(bodies)),
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    content, models = batch_lines(args.lines, args.seed)
    with Processes(workdir) as procs:
        stub = procs.stub(models=",".join(MODELS), load_delay=args.load_ms / 1000, tokens=args.tokens)
        foreman = procs.foreman("foreman", stub.url, env={"FOREMAN_LOG_LEVEL": "warning"})
        await all_listening(stub, foreman)
        results: dict[str, Any] = {"machine": machine()}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", content, filename="labels.jsonl")
            upload_start = time.perf_counter()
            file = await call(http, "POST", foreman.url + "/v1/files", data=form)
            upload_s = time.perf_counter() - upload_start
            loads_before = stub_loads(stub)
            cpu_before = foreman.cpu_seconds()
            start = time.perf_counter()
            body = {"input_file_id": file["id"], "endpoint": CHAT, "completion_window": "24h"}
            batch = await call(http, "POST", foreman.url + "/v1/batches", json=body)
            stop = asyncio.Event()
            probing = asyncio.create_task(probes(http, foreman.url, args.probe_every, stop))
            while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
                await asyncio.sleep(0.25)
                batch = await call(http, "GET", f"{foreman.url}/v1/batches/{batch['id']}")
            wall = time.perf_counter() - start
            cpu = foreman.cpu_seconds() - cpu_before
            stop.set()
            latencies = await probing
            await asyncio.sleep(0.3)  # the stub's last log lines
            output = await http.get(f"{foreman.url}/v1/files/{batch['output_file_id']}/content")
            out_lines = (await output.read()).splitlines()
            each = await as_async_jobs(http, foreman, content, args.clients) if args.clients else None
        results["batch"] = {
            "lines": args.lines,
            "status": batch["status"],
            "request_counts": batch["request_counts"],
            "output_lines": len(out_lines),
            "unique_custom_ids": len({json.loads(line)["custom_id"] for line in out_lines}),
            "upload_s": round(upload_s, 3),
            "enqueue_s": batch["in_progress_at"] - batch["created_at"],
            "wall_s": round(wall, 2),
            "lines_per_s": round(args.lines / wall, 1),
            # The probes' loads are in here too: one to a probe's model when it is not loaded, and
            # one back if the batch has no line left for it.
            "loads": stub_loads(stub) - loads_before,
            "loads_if_fifo": fifo_loads(models),
            "probes": len(latencies),
            "cpu_s": round(cpu, 2),
            "cpu_ms_per_line": ms(cpu / args.lines),
        }
        results["as_async_jobs"] = each
        results["interactive_ms"] = {
            "p50": ms(median(latencies)) if latencies else None,
            "p95": ms(percentile(latencies, 95)) if latencies else None,
            "max": ms(max(latencies)) if latencies else None,
        }
        results["machine"]["loadavg_end"] = machine()["loadavg"]
        return results


def table(results: dict[str, Any]) -> list[Row]:
    b, probe = results["batch"], results["interactive_ms"]
    return [
        Row(
            "24 batch",
            f"{b['lines']} chat lines over {len(MODELS)} models, shuffled",
            f"{b['status']}: {b['request_counts']['completed']} done, {b['output_lines']} output lines,"
            f" {b['unique_custom_ids']} custom_ids; {b['wall_s']} s ({b['lines_per_s']} lines/s)",
            "all done, each once",
            b["status"] == "completed" and b["unique_custom_ids"] == b["lines"] == b["output_lines"],
        ),
        Row(
            "24 loads",
            "models loaded for the batch vs first come, first served",
            f"{b['loads']} vs {b['loads_if_fifo']} (with {b['probes']} interactive probes among them)",
            "<= 4 + 2 x probes",
            b["loads"] <= len(MODELS) + 2 * b["probes"],
        ),
        Row(
            "24 CPU",
            "foreman's CPU per line, creation to end",
            f"{b['cpu_ms_per_line']} ms ({b['cpu_s']} s); enqueue {b['enqueue_s']:.1f} s",
            "",
        ),
        Row(
            "24 CPU, async jobs",
            "the same lines as async jobs from clients, after",
            "skipped"
            if results["as_async_jobs"] is None
            else f"{results['as_async_jobs']['cpu_ms_per_job']} ms per job, {results['as_async_jobs']['wall_s']} s",
            "",
        ),
        Row(
            "24 interactive",
            "chat requests sent while the batch runs (ms)",
            f"p50 {probe['p50']}, p95 {probe['p95']}, max {probe['max']} over {b['probes']}",
            "",
        ),
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arg_parser(__doc__)
    add = parser.add_argument
    add("--lines", type=int, default=10_000, help="lines in the batch (default %(default)s)")
    add("--seed", type=int, default=24, help="the shuffle's seed (default %(default)s)")
    add("--load-ms", type=float, default=200.0, help="the stub's load time (default %(default)s)")
    add(
        "--clients",
        type=int,
        default=16,
        help="clients sending the lines as async jobs after the batch, for comparison; 0: skip (default %(default)s)",
    )
    add("--tokens", type=int, default=8, help="tokens per reply (default %(default)s)")
    add(
        "--probe-every",
        type=float,
        default=1.0,
        help="seconds between interactive probes (default %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_in_workdir("foreman-batch-", args.workdir, partial(run, args))
    print_report("foreman batches", results, table(results))
    write_json(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
