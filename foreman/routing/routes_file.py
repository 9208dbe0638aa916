"""The routes file (FOREMAN_ROUTES): aliases served by any of several models, and intent routes.

```toml
[alias.fast]
models = ["qwen2:1.5b", "llama3:8b"]   # acceptable models, in order of preference
options = { temperature = 0.2 }        # defaults under the client's own options
keep_alive = "10m"                     # optional

[route.auto]
rules = [ { match = '(?i)\\b(code|python|bug)\\b', use = "code" } ]
default = "fast"
```

This module reads and checks the file, and turns a request for an alias or a
route into an alias job at intake: a route picks its alias by the content of
the request, and the alias's options and keep_alive go under the client's.
Which model serves the job is decided when it is picked (`foreman.routing.aliases`).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from foreman.dialects.intake import check_options
from foreman.durations import is_keep_alive
from foreman.errors import BadRequest
from foreman.job import MULTIPART_ENDPOINTS, NewJob
from foreman.ollama.names import load_options, normalise_model
from foreman.routing.aliases import alias_key

# A name clients can send as a model: Ollama's name characters, and none of
# the ones alias keys are built from ("@", "(", "|", ")", " ").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]*(?::[A-Za-z0-9._-]+)?")
_ALIAS_FIELDS = ("models", "options", "keep_alive")
_ROUTE_FIELDS = ("rules", "default")
_RULE_FIELDS = ("match", "use")

# Ollama's /v1 endpoints take no `options`; these options have an OpenAI field
# of their own, which Ollama's middleware turns back into the option.
_OPENAI_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "num_predict": "max_tokens",
}
# The agent APIs name some of these fields otherwise, and lack others.
_FIELDS_BY_ENDPOINT = {
    "/v1/responses": {"temperature": "temperature", "top_p": "top_p", "num_predict": "max_output_tokens"},
    "/v1/messages": {
        "temperature": "temperature",
        "top_p": "top_p",
        "top_k": "top_k",
        "stop": "stop_sequences",
    },
}


class RoutesError(ValueError):
    """The routes file cannot be used; the message is one line naming the entry."""


@dataclass(frozen=True, slots=True)
class Alias:
    name: str
    models: tuple[str, ...]  # normalised names, in order of preference
    options: Mapping[str, Any] = field(default_factory=dict)
    keep_alive: float | str | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: re.Pattern[str]
    use: Alias


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    rules: tuple[Rule, ...]
    default: Alias

    def choose(self, text: str) -> tuple[Alias, str | None]:
        """The alias for a request whose intent text is `text`, and the rule that chose it (None: default)."""
        for rule in self.rules:
            if rule.pattern.search(text):
                return rule.use, rule.pattern.pattern
        return self.default, None


@dataclass(frozen=True, slots=True)
class Routes:
    """Aliases and routes by normalised name (`fast` and `fast:latest` are one name)."""

    aliases: Mapping[str, Alias] = field(default_factory=dict)
    routes: Mapping[str, Route] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.aliases or self.routes)

    def names(self) -> list[tuple[str, str]]:
        """(name as written, its first model) for every alias and route, aliases first."""
        listed = [(a.name, a.models[0]) for a in self.aliases.values()]
        return listed + [(r.name, r.default.models[0]) for r in self.routes.values()]

    def first_model(self, name: str) -> str | None:
        """The model an alias or route answers /api/show for; None for any other name."""
        key = normalise_model(name)
        if key in self.aliases:
            return self.aliases[key].models[0]
        if key in self.routes:
            return self.routes[key].default.models[0]
        return None

    def shadowing(self, models: Iterable[str]) -> str | None:
        """What is wrong if an alias or route has the name of a model Ollama has; else None."""
        real = {normalise_model(name) for name in models}
        entries = [("alias", k, a.name) for k, a in self.aliases.items()]
        entries += [("route", k, r.name) for k, r in self.routes.items()]
        for kind, key, name in entries:
            if key in real:
                return f"{kind}.{name}: shadows the model {key!r} that Ollama has; rename the {kind}"
        return None

    def route(self, job: NewJob) -> NewJob:
        """`job` as an alias job if it names an alias or a route; else `job` unchanged."""
        if job.endpoint in MULTIPART_ENDPOINTS:
            return job  # an upload is sent as it came: nothing in it can be rewritten
        key = normalise_model(job.model)
        alias = self.aliases.get(key)
        route = self.routes.get(key) if alias is None else None
        if alias is None and route is None:
            return job  # a model's name: the body is not read again
        routing: dict[str, Any] = {}
        body: dict[str, Any] = json.loads(job.body)
        if route is not None:
            alias, rule = route.choose(intent_text(job.endpoint, body))
            routing = {"route": route.name, "rule": rule}
        assert alias is not None
        routing = {"alias": alias.name, **routing}
        native = not job.endpoint.startswith("/v1/")
        if native:
            if alias.options:
                body["options"] = {**alias.options, **(body.get("options") or {})}
            if alias.keep_alive is not None and body.get("keep_alive") is None:
                body["keep_alive"] = alias.keep_alive
        else:
            fields = _FIELDS_BY_ENDPOINT.get(job.endpoint, _OPENAI_FIELDS)
            for option, value in alias.options.items():
                if option in fields and body.get(fields[option]) is None:
                    body[fields[option]] = value
        runner = load_options(body.get("options")) if native else None
        return replace(
            job,
            model_key=alias_key(alias.name, alias.models, runner),
            body=json.dumps(body, separators=(",", ":")).encode(),
            routing=json.dumps(routing, separators=(",", ":")),
        )


def intent_text(endpoint: str, body: Mapping[str, Any]) -> str:
    """What route rules match on: the last user message, or the prompt (or the input to embed)."""
    if endpoint == "/v1/responses":
        value = body.get("input")
        if isinstance(value, list):
            users = [i for i in value if isinstance(i, dict) and i.get("role") == "user"]
            return _text(users[-1].get("content")) if users else ""
        return _text(value)
    if endpoint in ("/api/chat", "/v1/chat/completions", "/v1/messages"):
        for message in reversed(body.get("messages") or ()):
            if isinstance(message, dict) and message.get("role") == "user":
                return _text(message.get("content"))
        return ""
    if endpoint in ("/api/embed", "/v1/embeddings"):
        return _text(body.get("input"))
    return _text(body.get("prompt"))


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        # A list of strings (embedding input) or of OpenAI content parts.
        parts = [p if isinstance(p, str) else p.get("text") if isinstance(p, dict) else None for p in value]
        return "\n".join(p for p in parts if isinstance(p, str))
    return ""


def load(path: Path) -> Routes:
    """The routes in the file at `path`; RoutesError with one line naming the entry."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RoutesError(f"cannot read {path}: {exc}") from exc
    try:
        return parse(text)
    except RoutesError as exc:
        raise RoutesError(f"{path}: {exc}") from None


def parse(text: str) -> Routes:
    """Routes from the text of a routes file; RoutesError names the entry that is wrong."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RoutesError(f"not valid TOML: {exc}") from exc
    _only(document, ("alias", "route"), "the file")
    alias_tables = _table(document.get("alias", {}), "alias")
    route_tables = _table(document.get("route", {}), "route")
    aliases: dict[str, Alias] = {}
    for name, spec in alias_tables.items():
        alias = _alias(name, spec)
        aliases[_key(name, f"alias.{name}", aliases)] = alias
    for alias in aliases.values():
        for model in alias.models:
            if model in aliases:
                raise RoutesError(f"alias.{alias.name}: models: {model!r} is an alias; list real models")
    routes: dict[str, Route] = {}
    for name, spec in route_tables.items():
        where = f"route.{name}"
        key = _key(name, where, routes)
        if key in aliases:
            raise RoutesError(f"{where}: an alias has this name already")
        routes[key] = _route(name, spec, aliases)
    return Routes(aliases, routes)


def _key(name: str, where: str, taken: Mapping[str, object]) -> str:
    if not _NAME.fullmatch(name):
        raise RoutesError(f"{where}: {name!r} is not a model name (letters, digits, '._-/', one ':tag')")
    key = normalise_model(name)
    if key in taken:
        raise RoutesError(f"{where}: the same name as another entry ({key!r})")
    return key


def _alias(name: str, spec: object, /) -> Alias:
    where = f"alias.{name}"
    spec = _table(spec, where)
    _only(spec, _ALIAS_FIELDS, where)
    models = spec.get("models")
    if (
        not isinstance(models, list)
        or not models
        or not all(isinstance(m, str) and _NAME.fullmatch(m) for m in models)
    ):
        raise RoutesError(f'{where}: models must be a list of model names, like ["llama3:8b", "qwen2"]')
    normalised = tuple(normalise_model(m) for m in models)
    if len(set(normalised)) < len(normalised):
        raise RoutesError(f"{where}: models names a model twice")
    options = _table(spec.get("options", {}), f"{where}.options")
    try:
        check_options(dict(options))
    except BadRequest as exc:
        raise RoutesError(f"{where}.options: {exc.message}") from None
    keep_alive = spec.get("keep_alive")
    if keep_alive is not None and not is_keep_alive(keep_alive):
        raise RoutesError(
            f'{where}: keep_alive must be seconds (300) or a duration ("10m"), not {keep_alive!r}'
        )
    return Alias(name, normalised, options, keep_alive)


def _route(name: str, spec: object, aliases: Mapping[str, Alias]) -> Route:
    where = f"route.{name}"
    spec = _table(spec, where)
    _only(spec, _ROUTE_FIELDS, where)
    rules_spec = spec.get("rules", [])
    if not isinstance(rules_spec, list):
        raise RoutesError(f"{where}: rules must be a list of {{ match = '...', use = \"alias\" }}")
    rules = []
    for index, rule in enumerate(rules_spec):
        at = f"{where}.rules[{index}]"
        rule = _table(rule, at)
        _only(rule, _RULE_FIELDS, at)
        pattern = rule.get("match")
        if not isinstance(pattern, str):
            raise RoutesError(f"{at}: match must be a regular expression in a string")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise RoutesError(f"{at}: bad regex {pattern!r}: {exc}") from None
        rules.append(Rule(compiled, _use(rule.get("use"), f"{at}.use", aliases)))
    if "default" not in spec:
        raise RoutesError(f"{where}: default is required: the alias used when no rule matches")
    return Route(name, tuple(rules), _use(spec["default"], f"{where}.default", aliases))


def _use(name: object, where: str, aliases: Mapping[str, Alias]) -> Alias:
    if not isinstance(name, str) or normalise_model(name) not in aliases:
        known = ", ".join(a.name for a in aliases.values()) or "none defined"
        raise RoutesError(f"{where}: unknown alias {name!r} (aliases: {known})")
    return aliases[normalise_model(name)]


def _table(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RoutesError(f"{where} must be a table")
    return value


def _only(table: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
    for name in table:
        if name not in fields:
            raise RoutesError(f"{where}: unknown field {name!r} (known: {', '.join(fields)})")
