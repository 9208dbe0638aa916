"""A job Ollama always fails, beside work for other models: the others must not wait for its backoff.

    python bench/failing.py                       # 3 rounds of each case, alternating, about 90 s
    python bench/failing.py --rounds 1 --jobs 6   # the size tests/bench/test_scripts.py runs

Each round starts a stub Ollama process and a real `foreman serve` (issue 12's
settings: FOREMAN_BACKOFF_INITIAL=2, FOREMAN_MAX_ATTEMPTS=4), submits one async
job for a model the stub answers with 500 on every request
(`--fail-model`, "llama runner process has terminated: exit status 2"), then
`--jobs` async jobs alternating over two other models, and times the other
jobs from the first submission to the last one's end, on foreman's clock. The
baseline is the same round without the failing job; the two cases alternate.

Two kinds of failing model:
- `broken`: its loads fail too (a model Ollama cannot run at all);
- `crash`: it loads, and the prompt crashes its runner (`--fail-model`
  without `--fail-loads`): each attempt costs its model's load.

Target (issue 12): the other jobs finish within 1 s of their time without the
failing job (the median over the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from _harness import Processes, all_listening, run_in_workdir
from _report import Row, arg_parser, machine, median, print_report, write_json

MODELS = ("llama3", "mistral")
FAILING = "qwen2"
FOREMAN_ENV = {"FOREMAN_BACKOFF_INITIAL": "2", "FOREMAN_MAX_ATTEMPTS": "4", "FOREMAN_WARM": "off"}
CASES = ("baseline", "broken", "crash")


async def one_round(procs: Processes, case: str, index: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of `case`: seconds until the other jobs were all done, and the failing job's fate."""
    flags: dict[str, object] = {
        "models": ",".join((*MODELS, FAILING)),
        "load_delay": args.load_delay,
        "token_delay": args.token_delay,
        "tokens": args.tokens,
    }
    if case != "baseline":
        flags["fail_model"] = FAILING
    if case == "broken":
        flags["fail_loads"] = True
    stub = procs.stub(f"stub-{case}-{index}", **flags)
    foreman = procs.foreman(f"foreman-{case}-{index}", stub.url, env=FOREMAN_ENV)
    try:
        await all_listening(stub, foreman)
        async with aiohttp.ClientSession() as http:
            failing = None
            if case != "baseline":
                failing = await _submit(http, foreman.url, FAILING, "crash me")
            others = [await _submit(http, foreman.url, MODELS[i % 2], f"job {i}") for i in range(args.jobs)]
            first = failing or others[0]
            views: dict[str, dict[str, Any]] = {}

            async def look() -> bool:
                for job_id in [*others, *([failing] if failing else [])]:
                    async with http.get(f"{foreman.url}/jobs/{job_id}") as answer:
                        views[job_id] = await answer.json()
                return all(views[j]["state"] in ("done", "failed") for j in views)

            deadline = time.monotonic() + args.timeout
            while not await look():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{case}: jobs unfinished after {args.timeout}s")
                await asyncio.sleep(0.2)
    finally:
        foreman.stop()
        stub.stop()
    start = _epoch(views[first]["created_at"])
    end = max(_epoch(views[j]["finished_at"]) for j in others)
    return {
        "case": case,
        "others_s": round(end - start, 3),
        "others_done": sum(views[j]["state"] == "done" for j in others),
        "failing": None if failing is None else {k: views[failing][k] for k in ("state", "attempt", "error")},
    }


async def _submit(http: aiohttp.ClientSession, url: str, model: str, prompt: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    async with http.post(f"{url}/api/chat", json=body, headers={"Prefer": "respond-async"}) as answer:
        if answer.status != 202:
            raise RuntimeError(f"submission refused: {answer.status} {await answer.text()}")
        return str((await answer.json())["id"])


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = machine()
    rounds: list[dict[str, Any]] = []
    with Processes(workdir) as procs:
        for index in range(args.rounds):
            for case in CASES:  # alternate, so drift in the machine's load hits every case alike
                rounds.append(await one_round(procs, case, index, args))
                print(json.dumps(rounds[-1]), flush=True)
    results: dict[str, Any] = {"rounds": rounds, "machine": started}
    results["machine"]["loadavg_end"] = machine()["loadavg"]
    for case in CASES:
        results[case] = {"others_s_median": median([r["others_s"] for r in rounds if r["case"] == case])}
    return results


def rows(results: dict[str, Any]) -> list[Row]:
    base = results["baseline"]["others_s_median"]
    table = [Row("failing", "the other jobs, no failing job (median)", f"{base:.2f} s")]
    for case, what in (("broken", "its loads fail too"), ("crash", "it loads, its prompt fails")):
        taken = results[case]["others_s_median"]
        late = taken - base
        table.append(
            Row(
                "failing",
                f"the other jobs beside a failing job ({what})",
                f"{taken:.2f} s (+{late:.2f} s)",
                "within 1 s of the baseline",
                late <= 1.0,
            )
        )
    return table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = arg_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each case (default: %(default)s)")
    parser.add_argument(
        "--jobs", type=int, default=20, help="jobs for the other models (default: %(default)s)"
    )
    parser.add_argument(
        "--load-delay", type=float, default=0.5, help="the stub's load time (default: %(default)s)"
    )
    parser.add_argument(
        "--token-delay", type=float, default=0.025, help="the stub's time per token (default: %(default)s)"
    )
    parser.add_argument("--tokens", type=int, default=10, help="tokens per reply (default: %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=120, help="seconds a round may take (default: %(default)s)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_in_workdir("foreman-failing-", args.workdir, lambda workdir: run(args, workdir))
    table = rows(results)
    print_report("bench/failing.py", results, table)
    write_json(args, results)
    return 0 if all(row.met is not False for row in table) else 1


if __name__ == "__main__":
    sys.exit(main())
