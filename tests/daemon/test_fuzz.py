"""Hostile input: random JSON, headers and truncated bodies never get a 5xx, stop the daemon, or strand a job.

The example count per test is FOREMAN_FUZZ_EXAMPLES (default 150, for CI);
`FOREMAN_FUZZ_EXAMPLES=5000 python -m pytest tests/daemon/test_fuzz.py` is the long run.
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foreman.job import QUEUED_ENDPOINTS
from tests.support.helpers import Foreman, eventually

EXAMPLES = int(os.environ.get("FOREMAN_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # One daemon takes every example: surviving all of them in a row is the point.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

QUEUED = list(QUEUED_ENDPOINTS)
MODELS = ["llama3", "mistral:latest", "nomic-embed-text", "nope", "", "Llama3:LATEST", "a/b:c", " "]
FIELDS = [
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "options",
    "keep_alive",
    "format",
    "think",
    "tools",
    "images",
    "system",
    "template",
    "raw",
    "context",
    "suffix",
    "truncate",
    "dimensions",
    "logprobs",
    "top_logprobs",
    # OpenAI-compatible fields
    "max_tokens",
    "stream_options",
    "response_format",
    "temperature",
    "stop",
    "n",
    "encoding_format",
]
OPTIONS = ["num_ctx", "num_predict", "temperature", "seed", "stop", "use_mmap", "num_gpu", "top_k", "bogus"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["5m", "-1", "0", "300", "1h30m", "json", "high", "\u2028", "\x00", "😀" * 3]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "assistant", "system", "tool"]) | json_values,
            "content": st.text(max_size=40) | json_values,
            "images": json_values,
        },
    )
    | json_values,
    max_size=3,
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(MODELS) | json_values,
        "messages": messages,
        "prompt": st.text(max_size=40) | json_values,
        "input": st.text(max_size=20) | st.lists(st.text(max_size=10), max_size=3) | json_values,
        "stream": st.booleans() | json_values,
        "options": st.dictionaries(st.sampled_from(OPTIONS), json_values, max_size=3) | json_values,
        "keep_alive": json_values,
        "format": json_values,
        "think": json_values,
    },
).flatmap(
    lambda base: st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=2).map(
        lambda extra: {**extra, **base}
    )
)


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


bodies = st.one_of(
    requests.map(encode),
    json_values.map(encode),
    # Truncated and damaged JSON, and bytes that are not UTF-8.
    st.tuples(requests.map(encode), st.integers(min_value=0, max_value=200)).map(lambda t: t[0][: t[1]]),
    st.binary(max_size=64),
)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Prefer": st.sampled_from(
            ["respond-async", "respond-async, wait=5", "return=minimal", "RESPOND-ASYNC"]
        )
        | header_values,
        "Idempotency-Key": header_values,
        "Content-Type": st.sampled_from(["application/json", "text/plain", "multipart/form-data"])
        | header_values,
        "Accept": header_values,
    },
)


async def settle(foreman: Foreman) -> None:
    """Every job the fuzzing created ends, and the daemon still answers."""
    assert (await foreman.client.get("/healthz")).status == 200
    await eventually(
        lambda: not {"queued", "loading", "working"} & set(foreman.states()),
        within=30,
        what="every fuzzed job to reach an end state",
    )


@FUZZ
@given(path=st.sampled_from(QUEUED), body=bodies, extra=headers)
async def test_queued_endpoints_never_fail_with_a_5xx(
    foreman: Foreman, path: str, body: bytes, extra: dict
) -> None:
    """Whatever arrives at a queued endpoint, the answer is not a server error."""
    answer = await foreman.client.post(path, data=body, headers=extra)
    payload = await answer.read()
    assert answer.status < 500, (answer.status, payload[:300])
    if answer.status >= 400:
        assert "error" in json.loads(payload)


@FUZZ
@given(
    job_id=st.text(max_size=30),
    query=st.dictionaries(
        st.sampled_from(["state", "model", "limit", "after", "x"]), header_values, max_size=3
    ),
    method=st.sampled_from(["GET", "DELETE", "POST", "PUT"]),
)
async def test_job_api_never_fails_with_a_5xx(
    foreman: Foreman, job_id: str, query: dict, method: str
) -> None:
    """Odd ids, queries and methods on the job API get 4xx, never 5xx."""
    for path in ("/jobs", f"/jobs/{job_id}", f"/jobs/{job_id}/events", "/status"):
        answer = await foreman.client.request(method, path, params=query)
        assert answer.status < 500, (method, path, answer.status, await answer.text())


@FUZZ
@given(path=st.sampled_from(QUEUED), body=requests.map(encode), respond_async=st.booleans())
async def test_no_fuzzed_job_is_stranded(
    foreman: Foreman, path: str, body: bytes, respond_async: bool
) -> None:
    """Every job hostile input created reaches an end state, and the daemon stays healthy."""
    headers = {"Prefer": "respond-async"} if respond_async else {}
    answer = await foreman.client.post(path, data=body, headers=headers)
    assert answer.status < 500
    await answer.read()
    await settle(foreman)
