"""The routes file and alias resolution as pure code: parsing, checks, intake routing, folding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foreman.dialects.intake import parse_job
from foreman.job import Priority
from foreman.routing.aliases import Why, alias_key, candidates, fold, resolve, waiting_for
from foreman.routing.routes_file import Routes, RoutesError, intent_text, load, parse
from foreman.scheduling.policy import Held, ModelQueue, Policy, Reason, State

EXAMPLE = """
[alias.fast]
models = ["qwen2:1.5b", "llama3:8b"]   # acceptable models, in order of preference
options = { temperature = 0.2 }        # defaults under the client's own options
keep_alive = "10m"                     # optional

[alias.code]
models = ["qwen2.5-coder:7b"]
options = { temperature = 0.0 }

[route.auto]                           # a client asks for model "auto"
rules = [ { match = '(?i)\\b(code|python|bug)\\b', use = "code" } ]   # on the last user message, or the prompt
default = "fast"
"""


def routes() -> Routes:
    return parse(EXAMPLE)


def test_the_readme_example_parses() -> None:
    """The issue's example file gives two aliases and one route, names normalised like models."""
    parsed = routes()
    assert list(parsed.aliases) == ["fast:latest", "code:latest"]
    fast = parsed.aliases["fast:latest"]
    assert fast.models == ("qwen2:1.5b", "llama3:8b") and fast.keep_alive == "10m"
    assert parsed.names() == [("fast", "qwen2:1.5b"), ("code", "qwen2.5-coder:7b"), ("auto", "qwen2:1.5b")]
    assert parsed.first_model("auto") == "qwen2:1.5b" and parsed.first_model("llama3") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[alias.fast]\nmodel = ['llama3']\n", "alias.fast: unknown field 'model'"),
        ("[alias.fast]\nmodels = 'llama3'\n", "alias.fast: models must be a list of model names"),
        ("[alias.fast]\nmodels = []\n", "alias.fast: models must be a list of model names"),
        ("[alias.fast]\nmodels = [3]\n", "alias.fast: models must be a list of model names"),
        ("[alias.fast]\nmodels = ['a b']\n", "alias.fast: models must be a list of model names"),
        ("[alias.fast]\nmodels = ['llama3', 'llama3:latest']\n", "alias.fast: models names a model twice"),
        (
            "[alias.fast]\nmodels = ['x']\noptions = { num_ctx = 'big' }\n",
            "alias.fast.options: option 'num_ctx' must be a whole number",
        ),
        ("[alias.fast]\nmodels = ['x']\nkeep_alive = 'soon'\n", "alias.fast: keep_alive must be"),
        ("[alias.a]\nmodels = ['x']\n[alias.b]\nmodels = ['a']\n", "alias.b: models: 'a:latest' is an alias"),
        (
            "[alias.fast]\nmodels = ['x']\n[route.auto]\nrules = [{ match = '(', use = 'fast' }]\ndefault = 'fast'\n",
            "route.auto.rules[0]: bad regex '('",
        ),
        (
            "[alias.fast]\nmodels = ['x']\n[route.auto]\ndefault = 'slow'\n",
            "route.auto.default: unknown alias 'slow' (aliases: fast)",
        ),
        (
            "[alias.fast]\nmodels = ['x']\n[route.auto]\nrules = [{ match = 'a', use = 'code' }]\ndefault = 'fast'\n",
            "route.auto.rules[0].use: unknown alias 'code'",
        ),
        (
            "[alias.fast]\nmodels = ['x']\n[route.auto]\nrules = [{ match = 'a', use = 'fast', when = 1 }]\n",
            "route.auto.rules[0]: unknown field 'when'",
        ),
        ("[alias.fast]\nmodels = ['x']\n[route.auto]\nrules = []\n", "route.auto: default is required"),
        (
            "[alias.fast]\nmodels = ['x']\n[route.fast]\ndefault = 'fast'\n",
            "route.fast: an alias has this name",
        ),
        ("[aliases.fast]\nmodels = ['x']\n", "the file: unknown field 'aliases'"),
        ("[alias.'a(b']\nmodels = ['x']\n", "alias.a(b: 'a(b' is not a model name"),
        ("[alias.fast\n", "not valid TOML"),
    ],
)
def test_a_wrong_entry_is_named_in_one_line(text: str, message: str) -> None:
    """Each kind of mistake is refused with one line that names the entry."""
    with pytest.raises(RoutesError) as caught:
        parse(text)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_load_names_the_file(tmp_path: Path) -> None:
    """A file that cannot be read, or is wrong, is named in the message."""
    path = tmp_path / "routes.toml"
    with pytest.raises(RoutesError, match="cannot read"):
        load(path)
    path.write_text("[alias.x]\nmodels = 1\n")
    with pytest.raises(RoutesError, match=f"^{path}: alias.x: models"):
        load(path)


def test_an_alias_that_shadows_a_real_model_is_named() -> None:
    """An alias or route named like a model Ollama has would hide it: that is an error."""
    parsed = parse("[alias.llama3]\nmodels = ['mistral']\n[route.auto]\ndefault = 'llama3'\n")
    assert parsed.shadowing(["mistral:latest"]) is None
    problem = parsed.shadowing(["Llama3:latest", "mistral:latest"])
    assert problem is not None and problem.startswith("alias.llama3: shadows the model 'llama3:latest'")
    assert parse("[alias.x]\nmodels = ['m']\n[route.auto]\ndefault = 'x'\n").shadowing(["auto"]) is not None


def _job(body: dict[str, object], endpoint: str = "/api/chat") -> object:
    return parse_job(endpoint, json.dumps(body).encode(), 0.0)


def test_an_alias_job_queues_under_its_models_with_the_aliases_defaults_under_the_clients() -> None:
    """The alias's options and keep_alive fill in what the client left out, never what it set."""
    job = routes().route(
        parse_job(
            "/api/chat",
            json.dumps(
                {"model": "fast", "messages": [], "options": {"temperature": 0.9, "num_ctx": 8192}}
            ).encode(),
            0.0,
        )
    )
    body = json.loads(job.body)
    assert body["options"] == {"temperature": 0.9, "num_ctx": 8192}
    assert body["keep_alive"] == "10m" and body["model"] == "fast"
    assert job.model_key == '@fast(qwen2:1.5b|llama3:8b) {"num_ctx":8192}'
    assert json.loads(job.routing or "") == {"alias": "fast"}
    plain = routes().route(parse_job("/api/chat", b'{"model": "fast", "keep_alive": 0}', 0.0))
    assert json.loads(plain.body) == {"model": "fast", "keep_alive": 0, "options": {"temperature": 0.2}}


def test_a_route_picks_its_alias_by_the_last_user_message_or_the_prompt() -> None:
    """A rule that matches the content chooses the alias; otherwise the default."""
    messages = [{"role": "user", "content": "fix this Python bug"}, {"role": "assistant", "content": "ok"}]
    code = routes().route(
        parse_job("/api/chat", json.dumps({"model": "auto", "messages": messages}).encode(), 0)
    )
    assert code.model_key == "@code(qwen2.5-coder:7b)"
    assert json.loads(code.routing or "") == {
        "alias": "code",
        "route": "auto",
        "rule": "(?i)\\b(code|python|bug)\\b",
    }
    chat = routes().route(parse_job("/api/generate", b'{"model": "auto", "prompt": "a poem"}', 0))
    assert chat.model_key.startswith("@fast(")
    assert json.loads(chat.routing or "") == {"alias": "fast", "route": "auto", "rule": None}
    plain = parse_job("/api/chat", b'{"model": "llama3"}', 0)
    assert routes().route(plain) is plain


def test_openai_requests_get_the_aliases_options_as_their_own_fields() -> None:
    """/v1 takes no options: the ones with an OpenAI field become that field, under the client's."""
    job = routes().route(
        parse_job(
            "/v1/chat/completions", b'{"model": "fast", "messages": [{"role": "user", "content": "x"}]}', 0
        )
    )
    body = json.loads(job.body)
    assert body["temperature"] == 0.2 and "options" not in body and "keep_alive" not in body
    assert job.model_key == "@fast(qwen2:1.5b|llama3:8b)"
    own = routes().route(
        parse_job("/v1/completions", b'{"model": "fast", "prompt": "x", "temperature": 1}', 0)
    )
    assert json.loads(own.body)["temperature"] == 1


def test_intent_text_is_what_the_user_asked() -> None:
    """Rules see the last user message (text parts joined), the prompt, or the input."""
    parts = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]
    }
    assert intent_text("/v1/chat/completions", parts) == "a"
    assert intent_text("/api/chat", {"messages": [{"role": "system", "content": "s"}]}) == ""
    assert intent_text("/api/embed", {"input": ["x", "y"]}) == "x\ny"
    assert intent_text("/v1/completions", {"prompt": "p"}) == "p"


def test_an_alias_resolves_to_a_resident_model_then_to_wanted_work_then_the_first() -> None:
    """Resident beats queued work beats the order of preference; plain keys resolve to themselves."""
    key = alias_key("fast", ["qwen2:1.5b", "llama3:8b"])
    assert candidates(key) == ["qwen2:1.5b", "llama3:8b"]
    assert resolve(key, frozenset({"llama3:8b"})) == ("llama3:8b", Why.RESIDENT)
    assert resolve(key, frozenset(), ["llama3:8b"]) == ("llama3:8b", Why.QUEUED)
    assert resolve(key, frozenset({"qwen2:1.5b", "llama3:8b"})) == ("qwen2:1.5b", Why.RESIDENT)
    assert resolve(key, frozenset({"mistral:latest"})) == ("qwen2:1.5b", Why.PREFERRED)
    assert resolve("llama3:8b", frozenset()) == ("llama3:8b", Why.PREFERRED)
    loaded_with = alias_key("fast", ["qwen2:1.5b"], {"num_ctx": 8192})
    assert candidates(loaded_with) == ['qwen2:1.5b {"num_ctx":8192}']


def test_the_policy_counts_alias_jobs_with_the_resident_models_drain() -> None:
    """With llama3:8b loaded, alias jobs join its drain: the pick serves it with no swap."""
    fast = alias_key("fast", ["qwen2:1.5b", "llama3:8b"])
    queues = [
        ModelQueue(fast, Priority.BATCH, 3, "01", 0.0),
        ModelQueue("llama3:8b", Priority.BATCH, 2, "02", 1.0),
        ModelQueue("mistral:latest", Priority.BATCH, 1, "00", 0.0),
    ]
    state = State(resident=frozenset({"llama3:8b"}))
    folded = fold(queues, state.resident)
    decision = Policy().pick(folded.queues, state, 5.0)
    assert decision is not None and decision.model_key == "llama3:8b" and decision.reason is Reason.RESIDENT
    assert not decision.swap
    assert folded.waiting("llama3:8b") == 5
    assert folded.source("llama3:8b", Priority.BATCH) == fast  # its oldest job is the alias's
    assert folded.stored_order([("llama3:8b", Priority.BATCH)]) == [
        (fast, Priority.BATCH),
        ("llama3:8b", Priority.BATCH),
    ]
    assert waiting_for({fast: 3, "llama3:8b": 2, "mistral:latest": 1}, state.resident) == {
        "llama3:8b": 5,
        "mistral:latest": 1,
    }


def test_an_alias_job_held_after_a_failure_stays_held_when_folded_and_keeps_its_place() -> None:
    """Folding keeps not-before times; once due, the held alias job is the one claimed, from the alias's queue."""
    fast = alias_key("fast", ["qwen2:1.5b", "llama3:8b"])
    held = (Held("01", 0.0, 50.0),)
    queues = [
        ModelQueue(fast, Priority.BATCH, 0, "", 0.0, held),
        ModelQueue("llama3:8b", Priority.BATCH, 2, "02", 1.0),
    ]
    state = State(resident=frozenset({"llama3:8b"}))
    folded = fold(queues, state.resident)
    assert folded.waiting("llama3:8b") == 3
    early = Policy().pick(folded.queues, state, 10.0)
    assert early is not None and early.job_id == "02"
    assert folded.source(early.model_key, early.priority, early.job_id) == "llama3:8b"
    due = Policy().pick(folded.queues, state, 50.0)
    assert due is not None and due.job_id == "01"
    assert folded.source(due.model_key, due.priority, due.job_id) == fast
