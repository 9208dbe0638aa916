"""What the nodes say to each other on the NOTIFY channel (foreman/storage/postgres/node.py), as JSON.

A job's event goes as `{"n": node, "j": job id, "e": event}`; one whose
payload would pass PostgreSQL's limit (8000 bytes) goes as a row of the
`relay` table, announced as `{"n": node, "relay": row id}`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

from foreman.job import Chunk, Ended, JobEvent, JobState, StateChanged

# A NOTIFY payload must be shorter than 8000 bytes; bigger events go through the relay table.
PAYLOAD_LIMIT = 7800


def event_payload(me: str, job_id: str, event: JobEvent) -> str:
    return json.dumps({"n": me, "j": job_id, "e": encode(event)})


def end_payloads(me: str, job_id: str, ended: Ended) -> tuple[str, str]:
    """The end as the nodes where a client waits for the job hear it, and as every other node does.

    The others hear it without its reply: it tells a node that began to follow the job a moment ago
    that it is over, and the reply is in the job's record.
    """
    bare = replace(ended, body=b"") if ended.body else ended
    return event_payload(me, job_id, ended), event_payload(me, job_id, bare)


def encode(event: JobEvent) -> dict[str, Any]:
    if isinstance(event, Chunk):
        return {"k": "chunk", "d": _b64(event.data)}
    if isinstance(event, StateChanged):
        return {"k": "state", "s": event.state.value, "a": event.attempt}
    return {
        "k": "end",
        "s": event.state.value,
        "st": event.status,
        "b": _b64(event.body),
        "ct": event.content_type,
        "er": event.error,
    }


def decode(data: dict[str, Any]) -> JobEvent:
    kind = data["k"]
    if kind == "chunk":
        return Chunk(base64.b64decode(data["d"]))
    if kind == "state":
        return StateChanged(JobState(data["s"]), int(data["a"]))
    return Ended(JobState(data["s"]), int(data["st"]), base64.b64decode(data["b"]), data["ct"], data["er"])


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
