"""Deterministic fake model output: reply tokens, token ids and embeddings.

Everything is derived from a hash of the model and the input, so tests can compute
the expected text with :func:`reply_tokens` and different prompts get different
replies.
"""

from __future__ import annotations

import hashlib
import math
import struct

from .names import base_name

_VOCAB = (
    "the", "queue", "model", "answer", "is", "a", "quiet", "river", "of", "tokens",
    "and", "every", "request", "waits", "its", "turn", "while", "weights", "load",
    "slowly", "into", "memory", "then", "words", "flow", "out", "one", "by",
    "bright", "green", "small", "lamp", "stone", "cloud", "paper", "north", "seven",
    "blue", "quick", "fox", "jumps", "over", "lazy", "dog", "under", "open", "sky",
    "with", "care", "for", "each", "byte", "here", "there", "now", "soon", "later",
    "maybe", "surely", "indeed", "again", "still", "always",
)  # fmt: skip


def _digest(*parts: str) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.digest()


def reply_tokens(model: str, prompt: str, count: int) -> list[str]:
    """The ``count`` tokens the stub answers ``prompt`` with on ``model``.

    ``model`` is used in its canonical form (``llama3:latest``); the reply starts
    ``"Hello", " from", " llama3"`` and continues with words chosen by a hash of
    the model, the prompt and the position.
    """
    head = ["Hello", " from", f" {base_name(model)}"]
    tokens = head[:count]
    for i in range(len(tokens), count):
        index = int.from_bytes(_digest(model, prompt, str(i))[:4], "big") % len(_VOCAB)
        tokens.append(f" {_VOCAB[index]}")
    return tokens


def count_tokens(text: str) -> int:
    """A crude token count: whitespace-separated words, at least 1 for non-empty text."""
    words = len(text.split())
    return max(words, 1) if text else 0


def token_ids(text: str) -> list[int]:
    """Made-up token ids for ``text`` (the ``context`` array of ``/api/generate``)."""
    return [int.from_bytes(_digest(word)[:2], "big") % 32000 + 1 for word in text.split()] or [1]


def embedding(model: str, text: str, dims: int) -> list[float]:
    """An L2-normalised vector of ``dims`` floats derived from a hash of ``model`` and ``text``.

    The stub passes the model's digest as ``model``, so the vectors change when
    a pull changes the digest.
    """
    seed = hashlib.sha256(_digest(model, text))
    blocks = []
    for block in range((dims + 7) // 8):
        hasher = seed.copy()
        hasher.update(block.to_bytes(4, "big"))
        blocks.append(hasher.digest())
    values = struct.unpack(f">{len(blocks) * 8}I", b"".join(blocks))[:dims]
    return normalise([value / 0xFFFFFFFF * 2.0 - 1.0 for value in values])


def normalise(vector: list[float]) -> list[float]:
    """Scale ``vector`` to unit length (left alone if it is all zeros)."""
    norm = math.sqrt(sum(v * v for v in vector))
    if norm < 1e-12:
        return vector
    # Round through float32, as Ollama's vectors are float32.
    count = len(vector)
    return list(struct.unpack(f"{count}f", struct.pack(f"{count}f", *(v / norm for v in vector))))
