"""foreman's HTTP API as the client commands use it: requests, answers, and errors in one line."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import aiohttp

from foreman.job import MAX_PAGE

Json = dict[str, Any]

# Every call but the cancel of a running job answers at once; that one waits
# for the worker to abort the job, which is quick too.
_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=5)


class DaemonError(Exception):
    """Talking to the daemon went wrong; the message is one line for a person."""


class Unreachable(DaemonError):
    """No answer from the daemon at all."""


class Rejected(DaemonError):
    """The daemon answered with an error, e.g. 404 for an unknown job."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Daemon:
    """A running foreman at `url`, over one client session."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    @classmethod
    @asynccontextmanager
    async def connect(cls, url: str, token: str | None = None) -> AsyncIterator[Daemon]:
        """A session for the daemon at `url`, sending `token` (FOREMAN_TOKEN) as a bearer token."""
        headers = {"Authorization": f"Bearer {token}"} if token else None
        async with aiohttp.ClientSession(timeout=_TIMEOUT, headers=headers) as session:
            yield cls(session, url)

    async def status(self) -> Json:
        return await self._call("GET", "/status")

    async def jobs(
        self,
        *,
        state: str | None = None,
        model: str | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> Json:
        """A page of jobs, newest first: `{"jobs": [...], "next": cursor or None}`."""
        query = {"state": state, "model": model, "limit": limit, "after": after}
        return await self._call("GET", "/jobs", params={k: str(v) for k, v in query.items() if v is not None})

    async def job(self, job_id: str) -> Json:
        return await self._call("GET", f"/jobs/{quote(job_id, safe='')}")

    async def cancel(self, job_id: str) -> Json:
        return await self._call("DELETE", f"/jobs/{quote(job_id, safe='')}")

    async def submit(self, endpoint: str, body: Json, key: str | None = None) -> Json:
        """Queue an async job: `{"id", "state", "position"}`, for a new job or the one `key` names."""
        headers = {"Prefer": "respond-async"}
        if key is not None:
            headers["Idempotency-Key"] = key
        return await self._call("POST", endpoint, json=body, headers=headers)

    async def queued_ids(self, oldest: str, page_size: int = MAX_PAGE) -> set[str]:
        """The ids of the queued jobs no older than the job `oldest`, a page at a time."""
        ids: set[str] = set()
        after = None
        while True:
            page = await self.jobs(state="queued", limit=page_size, after=after)
            ids.update(job["id"] for job in page["jobs"])
            after = page["next"]
            # Ids are ULIDs and pages go newest first: past `oldest`, nothing is ours.
            if after is None or after <= oldest:
                return ids

    async def _call(self, method: str, path: str, **kwargs: Any) -> Json:
        try:
            async with self.session.request(method, self.url + path, **kwargs) as response:
                status, raw = response.status, await response.read()
        except aiohttp.ClientConnectorError as exc:
            reason = _reason(exc.os_error)
            raise Unreachable(
                f'cannot reach the daemon at {self.url} ({reason}); is "foreman serve" running?'
            ) from exc
        except TimeoutError as exc:
            raise Unreachable(f"the daemon at {self.url} did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise Unreachable(f"lost the connection to the daemon at {self.url} ({exc})") from exc
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            # Most likely FOREMAN_HOST points at something else, such as Ollama itself.
            raise Rejected(
                f"{self.url}{path} answered {status} with something other than foreman's JSON;"
                " is that foreman's address?",
                status,
            )
        if status >= 400:
            error = body.get("error")
            if isinstance(error, dict):  # OpenAI's shape, on /v1
                error = error.get("message")
            raise Rejected(str(error or f"the daemon answered {status}"), status)
        return body


def _reason(error: OSError) -> str:
    """`connection refused` rather than `[Errno 111] Connect call failed ('127.0.0.1', 1)`."""
    if isinstance(error, socket.gaierror):
        return str(error.strerror).lower()
    if error.errno:
        return os.strerror(error.errno).lower()
    return str(error) or type(error).__name__
