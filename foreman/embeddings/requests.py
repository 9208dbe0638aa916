"""Embed requests taken apart and put back together: what may share a call, and each job's own reply.

Pure code: the coalescing in `foreman.embeddings.batch` and the cache in
`foreman.embeddings.cache` build on it. Both `/api/embed` and `/v1/embeddings` jobs
run as one native `/api/embed` call with a list input (Ollama's /v1 endpoint
is the same handler behind a translation); each job then gets the reply its
own endpoint would have given. `/api/embeddings`, the legacy endpoint, embeds
differently (no normalisation) and is never merged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

EMBED_ENDPOINTS = ("/api/embed", "/v1/embeddings")


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """One embed job's request, reduced to what decides its vectors and its reply's shape."""

    endpoint: str
    model: str  # as the client sent it; its reply echoes it
    inputs: tuple[str, ...]
    # Everything besides the model that decides the vectors (truncate,
    # dimensions, options), as canonical JSON: jobs with equal `params` and
    # equal model keys may share a call, and the cache keys on it.
    params: str
    keep_alive: object | None = None  # native only; not part of `params`
    base64: bool = False  # /v1 `encoding_format: base64`

    @property
    def size(self) -> int:
        """The bytes of input text this request adds to a call."""
        return sum(len(text.encode()) for text in self.inputs)


def parse_embed(endpoint: str, body: bytes) -> EmbedRequest | None:
    """The embed request in a validated job body; None if it cannot share a call or come from the cache.

    That is: another endpoint, a load request (no input), or an empty string
    among the inputs, which Ollama answers in ways a merged call would not
    reproduce. Such jobs run on their own, as they came.
    """
    if endpoint not in EMBED_ENDPOINTS:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    value = data.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) and t for t in inputs):
        return None
    model = data.get("model")
    if not isinstance(model, str):
        return None
    native = endpoint == "/api/embed"
    options = data.get("options") if native else None
    dimensions = data.get("dimensions") or 0
    params = {
        "truncate": data.get("truncate") is not False if native else True,
        "dimensions": dimensions if isinstance(dimensions, int) else 0,
        "options": {k: v for k, v in sorted((options or {}).items()) if v is not None},
    }
    encoding = data.get("encoding_format")
    return EmbedRequest(
        endpoint=endpoint,
        model=model,
        inputs=tuple(inputs),
        params=json.dumps(params, sort_keys=True, separators=(",", ":")),
        keep_alive=data.get("keep_alive") if native else None,
        base64=isinstance(encoding, str) and encoding.lower() == "base64",
    )


def call_body(model: str, params: str, inputs: Sequence[str], keep_alive: object | None) -> bytes:
    """The one `/api/embed` request for `inputs` that share `params`."""
    decoded: dict[str, Any] = json.loads(params)
    body: dict[str, Any] = {"model": model, "input": list(inputs)}
    if decoded["truncate"] is False:
        body["truncate"] = False
    if decoded["dimensions"]:
        body["dimensions"] = decoded["dimensions"]
    if decoded["options"]:
        body["options"] = decoded["options"]
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class CallReply:
    """Ollama's answer to one `/api/embed` call: a vector per input, as JSON arrays, and its counts."""

    vectors: list[bytes]
    tokens: list[int]  # each input's share of prompt_eval_count (see `share`)
    total_ns: int
    load_ns: int


def read_call_reply(data: bytes, inputs: Sequence[str]) -> CallReply:
    """Ollama's `/api/embed` reply to a call with `inputs`; ValueError if it is not one."""
    vectors = _vector_texts(data)
    if vectors is None:
        # Not laid out as Ollama writes it: read it the slow way.
        reply = json.loads(data)
        found = reply.get("embeddings") if isinstance(reply, dict) else None
        if not isinstance(found, list):
            raise ValueError("no embeddings in the reply")
        vectors = [json.dumps(v, separators=(",", ":")).encode() for v in found]
    if len(vectors) != len(inputs):
        raise ValueError(f"{len(vectors)} vectors for {len(inputs)} inputs")
    return CallReply(
        vectors=vectors,
        tokens=share(_count(data, b"prompt_eval_count"), [len(t.encode()) for t in inputs]),
        total_ns=_count(data, b"total_duration"),
        load_ns=_count(data, b"load_duration"),
    )


# One vector inside the embeddings array: numbers only, so no brackets inside.
_VECTOR = re.compile(rb"\s*(\[[^\[\]]*\])\s*([,\]])")
_EMBEDDINGS = re.compile(rb'"embeddings"\s*:\s*\[')


def _vector_texts(data: bytes) -> list[bytes] | None:
    """The vectors' JSON texts, cut out of the reply without decoding a float.

    A call of 64 inputs of 768 floats is 50,000 numbers: decoding and encoding
    them again would cost the event loop far more than the rest of the jobs'
    handling. None if the reply is not laid out as expected.
    """
    start = _EMBEDDINGS.search(data)
    if start is None:
        return None
    position = start.end()
    vectors: list[bytes] = []
    if data[position:].lstrip().startswith(b"]"):
        return vectors
    while True:
        match = _VECTOR.match(data, position)
        if match is None:
            return None
        vectors.append(match.group(1))
        position = match.end()
        if match.group(2) == b"]":
            return vectors


def _count(data: bytes, field: bytes) -> int:
    match = re.search(rb'"' + field + rb'"\s*:\s*(\d+)', data)
    return int(match.group(1)) if match else 0


def share(total: int, weights: Sequence[int]) -> list[int]:
    """`total` split in proportion to `weights`, in whole numbers that add up to it.

    Ollama counts the tokens of a whole call, not of each input: a job's
    `prompt_eval_count` (`usage` on /v1) is its inputs' share of the call's,
    by their length in bytes. A call with one job gives that job the exact count.
    """
    if not weights:
        return []
    weights = [max(w, 1) for w in weights]
    whole = sum(weights)
    exact = [total * w / whole for w in weights]
    parts = [int(x) for x in exact]
    # Largest remainders first get the units the rounding down left over.
    order = sorted(range(len(weights)), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    return parts


def job_reply(
    request: EmbedRequest, vectors: Sequence[bytes], tokens: int, total_ns: int, load_ns: int
) -> bytes:
    """What the job's own endpoint answers for these vectors, as Ollama would have answered it alone."""
    if request.endpoint == "/api/embed":
        # Ollama leaves zero counts out (omitempty).
        head = {"model": request.model}
        tail = {"total_duration": total_ns, "load_duration": load_ns, "prompt_eval_count": tokens}
        return b"".join(
            (
                json.dumps(head, separators=(",", ":"))[:-1].encode(),
                b',"embeddings":[',
                b",".join(vectors),
                b"]",
                b"".join(f',"{k}":{v}'.encode() for k, v in tail.items() if v),
                b"}",
            )
        )
    # Ollama's openai.ToEmbeddingList; the vectors go in as they came, not decoded and encoded again.
    items = b",".join(
        b'{"object":"embedding","embedding":%s,"index":%d}'
        % (json.dumps(_encoded(vector)).encode() if request.base64 else vector, i)
        for i, vector in enumerate(vectors)
    )
    usage = json.dumps({"prompt_tokens": tokens, "total_tokens": tokens}, separators=(",", ":"))
    return b'{"object":"list","data":[%s],"model":%s,"usage":%s}' % (
        items,
        json.dumps(request.model).encode(),
        usage.encode(),
    )


def _encoded(vector: bytes) -> str:
    """A vector as `encoding_format: base64` gives it: little-endian float32, base64."""
    values = json.loads(vector)
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def cache_key(digest: str, params: str, text: str) -> bytes:
    """Where the vector of `text` under a model with `digest` and these `params` is cached."""
    hasher = hashlib.sha256()
    for part in (digest, params, text):
        hasher.update(part.encode("utf-8", "surrogatepass"))
        hasher.update(b"\0")
    return hasher.digest()
