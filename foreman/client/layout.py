"""How the client commands show the API's JSON to a person: pure functions from data to text.

Nothing here does I/O or reads the clock: ages are measured from the `now`
each function is given, so every layout can be tested as it is.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Sequence
from datetime import datetime

from foreman.client.daemon import Json
from foreman.job import JobState

_STATES = [state.value for state in JobState]  # lifecycle order
_ERROR_WIDTH = 60


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    """Lines of columns padded to their widest cell; the columns in `right` align right."""
    grid = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in grid) for i in range(len(headers))]
    return [
        "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in grid
    ]


def fields(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """`name  value` lines with the values lined up."""
    pairs = list(pairs)
    width = max(len(name) for name, _ in pairs)
    return [f"{name:<{width}}  {value}" for name, value in pairs]


def duration(seconds: float | None) -> str:
    """`0.4s`, `42s`, `3m05s`, `2h10m`, `3d04h`; `-` for no value."""
    if seconds is None:
        return "-"
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes == 0:
        return f"{secs}s"
    hours, minutes = divmod(minutes, 60)
    if hours == 0:
        return f"{minutes}m{secs:02d}s"
    days, hours = divmod(hours, 24)
    if days == 0:
        return f"{hours}h{minutes:02d}m"
    return f"{days}d{hours:02d}h"


def age(iso: str | None, now: float) -> str:
    """How long ago an API timestamp was."""
    return "-" if iso is None else duration(now - datetime.fromisoformat(iso).timestamp())


def size(count: float) -> str:
    """Bytes in decimal units: `812 B`, `1.2 MB`."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def one_line(text: str, width: int = _ERROR_WIDTH) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def format_status(status: Json, now: float) -> str:
    """`foreman status`: the daemon, the running job, then the queue by model in drain order."""
    upstream, db = status["upstream"], status["db"]
    reachable = "reachable" if upstream["reachable"] else "NOT REACHABLE"
    where = db["path"] if "path" in db else f"{db['url']}, node {db['node']}"
    lines = fields(
        [
            ("foreman", f"{status['version']}, database {where} ({size(db['size_bytes'])})"),
            ("ollama", f"{upstream['url']} ({reachable})"),
            ("resident", ", ".join(status["resident"]) or "none"),
            ("running", _running(status["running"])),
            ("jobs", counts(status["jobs"])),
            ("swaps", str(status["swaps"])),
            ("last error", _last_error(status["last_error"], now)),
        ]
    )
    nodes = status.get("nodes") or []
    return "\n".join([*lines, "", *queue_table(status["queue"], now), *nodes_table(nodes)])


def nodes_table(nodes: list[Json]) -> list[str]:
    """The nodes sharing a PostgreSQL queue: their Ollama, what it holds, what runs, the last heartbeat."""
    if not nodes:
        return []
    rows = [
        [
            node["name"] + ("" if node["alive"] else " (gone)"),
            node["upstream"] + ("" if node["reachable"] is not False else " (down)"),
            ", ".join(node["resident"]) or "none",
            ", ".join(node["running"]) or "nothing",
            f"{duration(node['heartbeat_age_s'])} ago",
        ]
        for node in nodes
    ]
    return ["", *table(["NODE", "OLLAMA", "HOLDS", "RUNNING", "HEARTBEAT"], rows)]


def counts(by_state: dict[str, int]) -> str:
    """`4 queued, 1 working, 12 done` in lifecycle order."""
    return ", ".join(f"{by_state[s]} {s}" for s in _STATES if by_state.get(s)) or "none"


def queue_table(queue: list[Json], now: float, bar_width: int = 40) -> list[str]:
    """What waits for each model, in the order the worker will serve them, with a bar per model."""
    if not queue:
        return ["queue is empty"]
    most = max(entry["waiting"] for entry in queue)
    rows = [
        [
            entry["model"],
            str(entry["waiting"]),
            age(entry["oldest_at"], now),
            "#" * max(1, round(entry["waiting"] * min(1.0, bar_width / most))),
        ]
        for entry in queue
    ]
    return table(["QUEUE (drain order)", "WAITING", "OLDEST", ""], rows, right={1, 2})


def _running(job: Json | None) -> str:
    if job is None:
        return "nothing"
    attempt = f", attempt {job['attempt'] + 1}" if job["attempt"] else ""
    return (
        f"{job['id']}  {job['model']} {job['endpoint']}  {job['state']} for {duration(job['run_s'])}{attempt}"
    )


def _last_error(error: Json | None, now: float) -> str:
    if error is None:
        return "none"
    return f"{age(error['at'], now)} ago: {one_line(error['message'], 100)}"


def format_jobs(page: Json, now: float) -> str:
    """`foreman jobs`: one row per job, newest first, and how to get the next page."""
    if not page["jobs"]:
        return "no jobs"
    headers = ["ID", "STATE", "MODEL", "ENDPOINT", "AGE", "WAIT", "RUN"]
    rows = [
        [
            job["id"],
            job["state"],
            _model(job),
            job["endpoint"],  # the path, one form for native and /v1 jobs
            age(job["created_at"], now),
            duration(job["queue_wait_s"]),
            duration(job["run_s"]),
        ]
        for job in page["jobs"]
    ]
    if any(job["error"] for job in page["jobs"]):
        headers.append("ERROR")
        for row, job in zip(rows, page["jobs"], strict=True):
            row.append(one_line(job["error"] or ""))
    lines = table(headers, rows, right={4, 5, 6})
    if page["next"] is not None:
        lines.append(f"(more: the same command with --after {page['next']})")
    return "\n".join(lines)


def _model(job: Json) -> str:
    """The model asked for, and for an alias the model that served it: `fast → qwen2:1.5b`."""
    model: str = job["model"]
    served = job.get("served_model")
    return model + (f" → {served}" if served and served != model else "")


def format_job(job: Json, now: float) -> str:
    """`foreman job ID`: every field that has a value, then the result's text."""
    state = job["state"] + (f", {job['position']} jobs run before it" if job["position"] is not None else "")
    model = job["model"] + (f" ({job['model_key']})" if job["model_key"] != job["model"] else "")
    pairs = [
        ("id", job["id"]),
        ("state", state),
        ("model", model),
        ("endpoint", job["endpoint"] + (" (async)" if job["async"] else "")),
        ("attempt", str(job["attempt"])),
        *((name, f"{job[key]} ({age(job[key], now)} ago)") for name, key in _TIMES if job[key] is not None),
        ("queue wait", duration(job["queue_wait_s"])),
        ("run", duration(job["run_s"])),
    ]
    if job.get("served_model") and job["served_model"] != job["model"]:
        pairs.insert(3, ("served by", job["served_model"]))
    if job["status"] is not None:
        pairs.append(("status", str(job["status"])))
    if job["error"] is not None:
        pairs.append(("error", job["error"]))
    text = result_text(job.get("result"))
    return "\n".join(fields(pairs) + ([] if text is None else ["", text]))


_TIMES = [("created", "created_at"), ("started", "started_at"), ("finished", "finished_at")]


def result_text(result: Json | None) -> str | None:
    """What a person wants from a result: the reply's text, or the shape of the embeddings."""
    if result is None:
        return None
    if isinstance(result.get("message"), dict):
        message = result["message"]
        if message.get("tool_calls") and not message.get("content"):
            return "tool calls: " + json.dumps(message["tool_calls"])
        return str(message.get("content") or "")
    if "response" in result:
        return str(result["response"])
    if "embeddings" in result:
        vectors = result["embeddings"]
        return f"{len(vectors)} embedding(s) of {len(vectors[0]) if vectors else 0} dimensions"
    if "embedding" in result:
        return f"1 embedding of {len(result['embedding'])} dimensions"
    return json.dumps(result)


def format_submission(accepted: Json, source: str | None) -> str:
    """A line per submitted job: its id first, so `cut -d' ' -f1` gives the ids."""
    where = f", position {accepted['position']}" if accepted.get("position") is not None else ""
    return " ".join(filter(None, [accepted["id"], f"{accepted['state']}{where}", source]))


def format_outcome(job: Json, source: str | None) -> str:
    """A finished job under a header line: its text when done, its error otherwise."""
    state = job["state"] if job["error"] is None else f"{job['state']}: {one_line(job['error'], 200)}"
    header = " ".join(filter(None, ["---", source, job["id"], job["model"], state]))
    text = result_text(job.get("result"))
    return header if text is None else f"{header}\n{text}"


def watch_frame(status: Json, url: str, clock: str, now: float) -> str:
    """One screen of `foreman watch`: a title line, then what `foreman status` shows."""
    return f"foreman at {url}  {clock}  (Ctrl-C to stop)\n\n{format_status(status, now)}"
