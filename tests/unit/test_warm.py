"""What the warmer says when it cannot warm a model: once per model and reason, quietly where nothing is there."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

from foreman.errors import ForemanError
from foreman.ollama.client import Upstream
from foreman.worker.warm import Warmer


class Show:
    """What /api/show names as each model's blob; a model it does not know is an error."""

    def __init__(self, paths: dict[str, str | None]) -> None:
        self.paths = paths

    async def blob_path(self, model: str) -> str | None:
        if model not in self.paths:
            raise ForemanError(f"model '{model}' not found", 404)
        return self.paths[model]


def no_read(path: str, stop: threading.Event) -> int:
    return 0


async def warm_in_turn(warmer: Warmer, models: list[str]) -> None:
    """Warm each model in turn, as the worker would while the queue drains."""
    for model in models:
        warmer.prepare(model)
        assert warmer._task is not None
        await warmer._task


async def test_a_model_that_cannot_be_warmed_is_said_once_per_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unknown and elsewhere-stored models log at debug once; an unreadable blob here is one info line."""
    here = tmp_path / "sha256-mistral"
    here.write_bytes(b"weights")
    show = Show(
        {"llama3:latest": "/usr/share/ollama/.ollama/models/blobs/sha256-x", "mistral:latest": str(here)}
    )
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != str(here) and real_access(p, mode))
    warmer = Warmer(cast(Upstream, show), read=no_read)
    with capture_logs() as logs:
        await warm_in_turn(warmer, ["nosuch:latest", "llama3:latest", "nosuch:latest", "mistral:latest"] * 3)
    said: list[dict[str, Any]] = [e for e in logs if e["event"] == "model.warm_skipped"]
    assert [(e["model"], e["reason"], e["log_level"]) for e in said] == [
        ("nosuch:latest", "no /api/show answer", "debug"),
        ("llama3:latest", "blob not readable by foreman", "debug"),
        ("mistral:latest", "blob not readable by foreman", "info"),
    ]
