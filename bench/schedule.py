"""The scheduling simulator's report: foreman's own policy on seeded traces, against two baselines.

    python bench/schedule.py                   # the table, the target checks, bench/schedule-timeline.png
    python bench/schedule.py --e2e             # trace 1 again through the real daemon and stub_ollama

The simulator is `foreman.simulator` (the traces, the choosers, the simulated
worker and the guarantee checks): pure code that drives foreman's own policy
(`foreman.scheduling`) on a simulated clock, so a two-hour trace takes well
under a second. This script runs every trace with every chooser, prints the
figures and the targets, draws which model is resident over time, and with
`--e2e` runs trace 1 through the real daemon and stub_ollama to show it swaps
as simulated.

Baselines, beside foreman:
- FIFO: the oldest job first, whatever is loaded (Ollama's own queue).
- drain: plain drain-by-model, foreman's core rule: the oldest job of a loaded
  model, else the oldest job overall; no bound, no priorities.
With more than one slot the baselines evict the least recently used model.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import socket
import sqlite3
import sys
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from _harness import until
from _report import machine
from foreman.job import Priority
from foreman.scheduling.policy import Policy
from foreman.simulator.checks import guarantee_violations, interactive_violations, lower_bound_beaten
from foreman.simulator.choosers import Foreman
from foreman.simulator.simulate import Result, run_all, served_as, simulate
from foreman.simulator.traces import TRACES, Trace, first_models

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------- report


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile by the nearest-rank method (no interpolation)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# --------------------------------------------------------------------- report


def table(results: Sequence[Result]) -> str:
    """The figures per trace and policy, as a Markdown table."""
    head = (
        "| trace | policy | jobs | swaps | loading s | makespan s | lower bound s | class | wait p50 s"
        " | wait p99 s | wait max s |\n|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"
    )
    rows = [head]
    for r in results:
        classes = [p for p in Priority if r.waits(p)]
        for i, priority in enumerate(classes):
            waits = r.waits(priority)
            totals = [
                r.trace.name,
                r.policy,
                str(len(waits)),
                str(r.swaps),
                f"{r.load_time:.0f}",
                f"{r.makespan:.0f}",
                f"{r.trace.lower_bound():.0f}",
            ]
            if i:  # the run's totals once, on its first class row
                totals = ["", "", str(len(waits)), "", "", "", ""]
            stats = [f"{percentile(waits, 50):.1f}", f"{percentile(waits, 99):.1f}", f"{waits[-1]:.1f}"]
            rows.append("| " + " | ".join([*totals, priority.value, *stats]) + " |")
    return "\n".join(rows)


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    measured: str
    wanted: str
    met: bool
    info: bool = False  # reported, not one of the targets


def targets(results: Sequence[Result]) -> list[Target]:
    """The issue's targets, checked on the figures."""
    by = {(r.trace.name, r.policy): r for r in results}
    checks = []
    t1, t1_fifo = by["1-batch", "foreman"], by["1-batch", "fifo"]
    over = t1.makespan / t1.trace.lower_bound() - 1
    over = 0.0 if abs(over) < 1e-9 else over  # equal up to float rounding
    checks.append(Target("trace 1: makespan vs lower bound", f"{over:+.2%}", "within 3%", over <= 0.03))
    ratio = t1_fifo.swaps / t1.swaps
    checks.append(
        Target(
            "trace 1: swaps, FIFO / foreman",
            f"{t1_fifo.swaps}/{t1.swaps} = {ratio:.0f}x",
            ">= 20x",
            ratio >= 20,
        )
    )
    t2, t2_drain = by["2-hot", "foreman"], by["2-hot", "drain"]
    worst = t2.waits()[-1]
    limit = t2.trace.max_wait + t2.longest_stay()
    checks.append(
        Target(
            "trace 2: longest wait vs bound + one drain",
            f"{worst:.0f}s",
            f"<= {t2.trace.max_wait:.0f}s + {t2.longest_stay():.0f}s",
            worst <= limit,
        )
    )
    swaps = t2.swaps / t2_drain.swaps
    checks.append(
        Target(
            "trace 2: swaps vs plain drain-by-model",
            f"{t2.swaps}/{t2_drain.swaps} = {swaps:.2f}x",
            "<= 1.5x",
            swaps <= 1.5,
        )
    )
    t2b, t2b_drain = by["2b-hot-w120", "foreman"], by["2b-hot-w120", "drain"]
    worst, stay = t2b.waits()[-1], t2b.longest_stay()
    checks.append(
        Target(
            "trace 2b: longest wait vs bound + one drain",
            f"{worst:.0f}s",
            f"<= {t2b.trace.max_wait:.0f}s + {stay:.0f}s",
            worst <= t2b.trace.max_wait + stay,
            info=True,
        )
    )
    swaps = t2b.swaps / t2b_drain.swaps
    checks.append(
        Target(
            "trace 2b: swaps vs plain drain-by-model",
            f"{t2b.swaps}/{t2b_drain.swaps} = {swaps:.2f}x",
            "<= 1.5x",
            swaps <= 1.5,
            info=True,
        )
    )
    t3 = by["3-bursts", "foreman"]
    p99 = percentile(t3.waits(Priority.INTERACTIVE), 99)
    # One swap: the slowest load among the models interactive jobs use; one run: the longest job.
    chat_models = {j.model for j in t3.trace.jobs if j.priority is Priority.INTERACTIVE}
    swap = max(t3.trace.load_s[m] for m in chat_models)
    run = max(j.run_s for j in t3.trace.jobs)
    checks.append(
        Target(
            "trace 3: interactive p99 wait vs one swap + one run",
            f"{p99:.1f}s",
            f"< {swap:.0f}s + {run:.1f}s",
            p99 < swap + run,
        )
    )
    t5, t5_drain = by["5-starve", "foreman"], by["5-starve", "drain"]
    worst, limit = t5.waits()[-1], t5.trace.max_wait + t5.longest_stay()
    checks.append(
        Target(
            f"trace 5: longest wait vs bound + one drain (drain-by-model: {t5_drain.waits()[-1]:.0f}s)",
            f"{worst:.0f}s",
            f"<= {t5.trace.max_wait:.0f}s + {t5.longest_stay():.0f}s",
            worst <= limit,
        )
    )
    t6 = by["6-alias", "foreman"]
    policy = Policy(max_wait=t6.trace.max_wait)
    replaced = simulate(served_as(t6, "6-alias-served"), Foreman(policy))
    checks.append(
        Target(
            "trace 6: swaps, aliases vs every alias job naming the model that served it",
            f"{t6.swaps}/{replaced.swaps} = {t6.swaps / replaced.swaps:.2f}x",
            "<= 1x",
            t6.swaps <= replaced.swaps,
        )
    )
    static = simulate(first_models(t6.trace, "6-alias-first"), Foreman(policy))
    checks.append(
        Target(
            "trace 6: swaps, aliases vs every alias job naming its first model (a static alias)",
            f"{t6.swaps}/{static.swaps} = {t6.swaps / static.swaps:.2f}x",
            "< 1x",
            t6.swaps < static.swaps,
            info=True,
        )
    )
    t7, t7_drain = by["7-backlogs", "foreman"], by["7-backlogs", "drain"]
    p99 = percentile(t7.waits(Priority.INTERACTIVE), 99)
    chat_models = {j.model for j in t7.trace.jobs if j.priority is Priority.INTERACTIVE}
    load = max(t7.trace.load_s[m] for m in chat_models)
    run = max(j.run_s for j in t7.trace.jobs)
    before = percentile(t7_drain.waits(Priority.INTERACTIVE), 99)
    checks.append(
        Target(
            f"trace 7: interactive p99 wait vs one job + one load (drain-by-model: {before:.0f}s)",
            f"{p99:.1f}s",
            f"<= {run:.1f}s + {load:.0f}s",
            p99 <= run + load,
        )
    )
    for r in results:
        if r.policy == "foreman":
            broken = guarantee_violations(r, r.trace.max_wait)
            checks.append(
                Target(
                    f"{r.trace.name}: guarantee holds for every job",
                    f"{len(broken)} violations",
                    "0",
                    not broken,
                )
            )
            waited = interactive_violations(r)
            if any(j.priority is Priority.INTERACTIVE for j in r.trace.jobs):
                checks.append(
                    Target(
                        f"{r.trace.name}: no interactive job waits for batch work or a batch load",
                        f"{len(waited)} violations",
                        "0",
                        not waited,
                    )
                )
        if lower_bound_beaten(r):
            checks.append(
                Target(f"{r.trace.name}/{r.policy}: lower bound", f"{r.makespan:.0f}s", "not beaten", False)
            )
    return checks


PANELS = (("1-batch", "fifo"), ("1-batch", "foreman"), ("5-starve", "drain"), ("5-starve", "foreman"))


def plot(results: Sequence[Result], path: Path, panels: Sequence[tuple[str, str]] = PANELS) -> None:
    """Which model is resident over time, one row per Ollama slot, one panel per (trace, policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    by = {(r.trace.name, r.policy): r for r in results}
    chosen = [by[panel] for panel in panels]
    models = sorted({m for r in chosen for m in r.trace.load_s})
    colours = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(models)}
    fig, axes = plt.subplots(len(chosen), 1, figsize=(11, 1.2 + 1.15 * len(chosen)))
    for ax, r in zip(axes, chosen, strict=True):
        end = max(by[name, policy].makespan for name, policy in panels if name == r.trace.name)
        for i, load in enumerate(r.loads):
            until = r.evicted_at.get(i, r.makespan)
            height = 0.8 / r.trace.slots
            y = load.slot * (1 / r.trace.slots)
            ax.broken_barh([(load.start, until - load.start)], (y, height), color=colours[load.model])
            ax.broken_barh([(load.start, load.end - load.start)], (y, height), color="black", alpha=0.4)
        ax.set_yticks([])
        ax.set_xlim(0, end)
        ax.set_title(
            f"trace {r.trace.name} ({r.trace.title}), {r.policy}: {r.swaps} swaps,"
            f" makespan {r.makespan:.0f} s, longest wait {r.waits()[-1]:.0f} s",
            fontsize=9,
            loc="left",
        )
    axes[-1].set_xlabel("simulated seconds; dark: loading")
    handles = [Rectangle((0, 0), 1, 1, color=colours[m]) for m in models]
    fig.legend(handles, models, loc="lower right", ncol=len(models), fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------- e2e


async def end_to_end(trace: Trace, scale: float) -> tuple[int, list[str]]:
    """Run `trace` through foreman and stub_ollama with every time multiplied by `scale`.

    Returns the swaps foreman made and the models in the order the stub loaded them.
    All jobs are submitted while the stub refuses connections and foreman's
    clock is held, so, as in the trace, they are all queued at time 0 before
    the worker starts.
    """
    import tempfile

    from aiohttp import web

    from foreman.api.keys import WORKER
    from foreman.app import create_app
    from foreman.config import Config
    from stub_ollama import StubModel, StubServer, StubSettings

    token_s = 0.002
    models = tuple(StubModel(f"{m}:latest", load_delay=s * scale) for m, s in trace.load_s.items())
    # Reserve the stub's port with a socket that is bound but not listening:
    # connections are refused, yet no other socket (not even one of the 400
    # client connections below) can take the port before the stub starts on it.
    placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    placeholder.bind(("127.0.0.1", 0))
    port = placeholder.getsockname()[1]
    stub = StubServer(StubSettings(models=models, token_delay=token_s, tokens=64))
    try:
        with tempfile.TemporaryDirectory(prefix="foreman-e2e-") as tmp:
            config = Config(
                db_path=Path(tmp) / "foreman.db",
                upstream=f"http://127.0.0.1:{port}",
                max_wait=trace.max_wait * scale,
                backoff_initial=0.01,
                backoff_max=0.05,
                warm="off",
            )
            clock = HeldClock()
            app = create_app(config, clock=clock)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
            ) as http:
                tasks = []
                for job in trace.jobs:
                    # The stub runs (tokens - 1) token delays.
                    tokens = max(2, round(job.run_s * scale / token_s) + 1)
                    body = {
                        "model": job.model,
                        "prompt": job.id,
                        "stream": False,
                        "options": {"num_predict": tokens},
                    }
                    headers = {"X-Foreman-Priority": job.priority.value}
                    tasks.append(asyncio.create_task(_post(http, url + "/api/generate", body, headers)))
                    await asyncio.sleep(0)
                await _until_queued(config.db_path, len(trace.jobs))
                clock.release()
                await stub.start("127.0.0.1", port)
                placeholder.close()
                statuses = await asyncio.gather(*tasks)
            swaps = app[WORKER].swaps
            await runner.cleanup()
    finally:
        placeholder.close()
        await stub.close()
    if set(statuses) != {200}:
        raise RuntimeError(f"end-to-end run failed: statuses {sorted(set(statuses))}")
    loads = [name.split(":")[0] for name in stub.stub.loads]
    return swaps, loads


class HeldClock:
    """time.time that stands still until `release`, then runs on from where it stood."""

    def __init__(self) -> None:
        self._held: float | None = time.time()
        self._offset = 0.0

    def __call__(self) -> float:
        return self._held if self._held is not None else time.time() - self._offset

    def release(self) -> None:
        if self._held is not None:
            self._offset = time.time() - self._held
            self._held = None


async def _post(
    http: aiohttp.ClientSession, url: str, body: dict[str, object], headers: dict[str, str]
) -> int:
    async with http.post(url, json=body, headers=headers) as response:
        await response.read()
        return response.status


async def _until_queued(db_path: Path, count: int) -> None:
    def queued() -> bool:
        with closing(sqlite3.connect(db_path)) as db:
            return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0]) >= count

    await until(queued, within=100, every=0.005, what="the jobs to be queued")


# ------------------------------------------------------------------------ main


def machine_line() -> str:
    what = machine()
    return f"{what['nproc']} CPUs ({what['cpu']}), Python {what['python']}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--png", type=Path, default=HERE / "schedule-timeline.png", help="timeline to write")
    parser.add_argument("--no-png", action="store_true", help="skip the timeline")
    parser.add_argument("--e2e", action="store_true", help="also run trace 1 through the daemon and stub")
    parser.add_argument("--scale", type=float, default=0.005, help="time scale of the end-to-end run")
    args = parser.parse_args(argv)

    traces = [make() for make in TRACES.values()]
    results = run_all(traces)
    print(f"machine: {machine_line()}\n")
    print(table(results))
    print()
    checks = targets(results)
    for check in checks:
        mark = "ok" if check.met else "info" if check.info else "MISSED"
        against = "compare" if check.info else "target"
        print(f"[{mark}] {check.name}: {check.measured} ({against} {check.wanted})")
    ok = all(check.met or check.info for check in checks)
    if not args.no_png:
        plot(results, args.png)
        print(f"\ntimeline: {args.png}")
    if args.e2e:
        simulated = next(r for r in results if r.trace.name == "1-batch" and r.policy == "foreman")
        from foreman import log

        log.configure("console", "warning")  # the daemon's own job log would drown the report
        swaps, loads = asyncio.run(end_to_end(traces[0], args.scale))
        sim_loads = [load.model for load in simulated.loads]
        same = swaps == simulated.swaps == len(loads) and loads == sim_loads
        print(
            f"\n[{'ok' if same else 'MISSED'}] end-to-end trace 1 at scale {args.scale}:"
            f" daemon {swaps} swaps {loads}, simulator {simulated.swaps} swaps {sim_loads}"
        )
        ok = ok and same
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
