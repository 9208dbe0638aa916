"""Figures for the benchmarks: percentiles, the machine they ran on, a table, and JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0-100), interpolating between the closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def spread(samples: Sequence[float]) -> dict[str, float]:
    """Median and p99 in milliseconds, and how many samples they come from."""
    return {"p50_ms": ms(percentile(samples, 50)), "p99_ms": ms(percentile(samples, 99)), "n": len(samples)}


def machine() -> dict[str, Any]:
    """What the figures were measured on; the load average tells whether the machine was shared."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


@dataclass(frozen=True)
class Row:
    """One line of a result table: what, the figures, and the target if there is one."""

    item: str
    measure: str
    figures: str
    target: str = ""
    met: bool | None = None


def print_report(what: str, results: dict[str, Any], rows: Sequence[Row]) -> None:
    """The table, under a title that says what ran on which machine, and how busy it was."""
    m = results["machine"]
    load = f"load {m['loadavg'][0]} -> {m['loadavg_end'][0]}"
    print_table(f"{what}: {m['nproc']} x {m['cpu']}, Python {m['python']}, {load}", rows)


def print_table(title: str, rows: Sequence[Row]) -> None:
    header = ("item", "measure", "figures", "target", "met")
    cells = [header] + [
        (r.item, r.measure, r.figures, r.target, "" if r.met is None else ("yes" if r.met else "NO"))
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            print("  ".join("-" * width for width in widths))


def arg_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line, with the --workdir and --json every benchmark takes."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workdir", type=Path, help="keep databases and logs here (default: a temporary directory)"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    return parser


def write_json(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Write the figures, with the arguments that produced them, to `--json` if given."""
    if args.json is None:
        return
    results["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nJSON written to {args.json}")
