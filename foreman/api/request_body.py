"""A queued request's body as the job keeps it: decoded, when the client compressed it.

Codex sends `/v1/responses` bodies with `Content-Encoding: zstd`, which Ollama
decodes (`middleware/openai.go`, `server/cloud_proxy.go`): a zstd window of at
most 8 MiB, at most 20 MiB of decoded JSON. foreman decodes such a body the
same way (and gzip or deflate too), holds it to the same limit, and the job
stores the JSON itself: the worker sends it to Ollama uncompressed.

foreman's server leaves bodies as they came (`auto_decompress=False` in
`create_app`): a passed-through request reaches Ollama byte for byte with its
own Content-Encoding, and a body that is not what its header says gets
Ollama's 400 here instead of aiohttp dropping the connection.
"""

from __future__ import annotations

import asyncio
import sys
import zlib
from typing import Protocol

from aiohttp import hdrs, web

from foreman.errors import BadRequest, ForemanError

if sys.version_info >= (3, 14):
    from compression.zstd import DecompressionParameter, ZstdDecompressor, ZstdError
else:
    from backports.zstd import DecompressionParameter, ZstdDecompressor, ZstdError

# Ollama's maxDecompressedBodySize (middleware/openai.go), and its decoder's
# zstd.WithDecoderMaxMemory(8<<20): the largest window a frame may ask for.
MAX_DECODED = 20 << 20
_ZSTD_WINDOW_LOG = 23


class _Decoder(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    def decompress(self, data: bytes, /, max_length: int) -> bytes: ...


def _new_decoder(encoding: str) -> _Decoder | None:
    if encoding == "zstd":
        return ZstdDecompressor(options={DecompressionParameter.window_log_max: _ZSTD_WINDOW_LOG})
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    return None


async def read_body(request: web.Request, max_body: int, read_timeout: float) -> bytes:
    """The whole body, decoded; 408 if it does not arrive in time, 413 over a limit, 400 if undecodable."""
    if request.content.is_eof():
        raw = await request.read()  # all there already: no timer to set
    else:
        try:
            async with asyncio.timeout(read_timeout):
                raw = await request.read()  # aiohttp holds it to FOREMAN_MAX_BODY
        except TimeoutError as exc:
            raise ForemanError("the request body did not arrive in time", 408) from exc
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if encoding in ("", "identity"):
        return raw
    return decode(raw, encoding, min(max_body, MAX_DECODED))


def decode(raw: bytes, encoding: str, limit: int) -> bytes:
    """`raw` decoded from `encoding` (concatenated frames or members too); at most `limit` bytes."""
    if _new_decoder(encoding) is None:
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}: send zstd, gzip, deflate or none")
    out = bytearray()
    rest = raw
    try:
        while rest:
            decoder = _new_decoder(encoding)
            assert decoder is not None
            out += decoder.decompress(rest, limit + 1 - len(out))
            if len(out) > limit:
                raise ForemanError(f"the decoded request body is larger than {limit} bytes", 413)
            if not decoder.eof:
                raise BadRequest(f"failed to decompress {encoding} body: it ends mid-stream")
            rest = decoder.unused_data
    except (ZstdError, zlib.error) as exc:
        raise BadRequest(f"failed to decompress {encoding} body") from exc
    return bytes(out)
