"""The intake check every job meets before it is queued: the model it names is one Ollama has.

Interactive requests and batch lines both go through `require_installed`, so
a line gets the answer its request would get on its own.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from foreman.errors import BadRequest, NotFound
from foreman.job import NewJob
from foreman.ollama.names import source_suffix

# Whether Ollama has a model installed; None when it cannot say (`ModelTags.has`).
Has = Callable[[str], Awaitable[bool | None]]


async def require_installed(job: NewJob, has: Has) -> None:
    """Refuse at once, as Ollama does, a model Ollama does not have; queue it when Ollama cannot tell."""
    if job.routing is not None:
        return  # an alias or a route: foreman's own name, for models its routes file names
    base, source = source_suffix(job.model)
    if source is not None and source_suffix(base)[1] is not None:
        raise BadRequest(f"use either :local or :cloud, not both: {json.dumps(job.model)}")
    if source == "cloud":
        return  # Ollama's cloud serves it: nothing is installed here
    if await has(base) is False:
        raise NotFound(not_found(job.endpoint, job.model))


def remembered(has: Has) -> Has:
    """`has`, asked once per name: a batch's lines name few models, and a missing one reads the list again."""
    known: dict[str, bool | None] = {}

    async def ask(model: str) -> bool | None:
        if model not in known:
            known[model] = await has(model)
        return known[model]

    return ask


def not_found(endpoint: str, model: str) -> str:
    """Ollama's 404 message for a model it does not have, which differs by handler."""
    if endpoint == "/api/embeddings":
        # EmbeddingsHandler goes through handleScheduleError, which quotes with Go's %q.
        return f"model {json.dumps(model)} not found, try pulling it first"
    return f"model '{model}' not found"
