"""A streamed job's output kept with its row (`jobs.output`), for every backend, or in the `chunks` table.

A short stream's chunks are packed into one value written by the statement
that ends the job, so its finish is one statement like a non-streamed job's;
a stream above `OUTPUT_LIMIT` bytes goes to the `chunks` table, one row per
chunk, as every stream did before. Replay (`GET /jobs/{id}/events`) sends one
event per chunk, so the boundaries must come back exactly, whatever the bytes
(newlines included): the packing is a count and each chunk's length, then
the chunks:

    <count: u32 LE> <length: u32 LE> * count <chunk bytes> * count

Lengths up front, not before each chunk: packing is one `struct.pack` and a
join, unpacking one `struct.unpack_from` and a slice per chunk.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import accumulate, pairwise

from foreman.errors import StoreError

# Bytes of chunks (their lengths' 4 bytes each included) kept with the row; above it, the chunks table.
# Packed is cheaper at every size measured (bench/stream_output.py, 8 to 8192 chunks, up to 1 MiB: the
# finish takes 1.5 to 16 times less CPU, replay up to 3.5 times less time, more the longer the stream,
# on both backends; bench/RESULTS.md, issue 25). The limit bounds what one value costs, as a value is written
# and read whole: SQLite builds the row in memory to write it, psycopg sends it and reads it back whole
# (as hex text, twice its size), a row with a large last column keeps less of the others on its page,
# and both hold at most about 1 GB in one value. 1 MiB keeps every reply up to about 8000 tokens of
# /api/chat (110 to 160 bytes a chunk) with its row; longer ones go to the chunks table, row by row.
OUTPUT_LIMIT = 1024 * 1024

_COUNT = struct.Struct("<I")


def pack(chunks: Sequence[bytes]) -> bytes | None:
    """`chunks` as one value for `jobs.output`; None when there are none, or they are over `OUTPUT_LIMIT` bytes."""
    if not chunks:
        return None
    limit = OUTPUT_LIMIT  # read at each call: bench/stream_output.py sets it to compare both ways
    n = len(chunks)
    size = 4 * (n + 1)
    for chunk in chunks:
        size += len(chunk)
    if size > limit:
        return None
    return struct.pack(f"<{n + 1}I", n, *map(len, chunks)) + b"".join(chunks)


def unpack(packed: bytes, job_id: str = "") -> list[bytes]:
    """The chunks `pack` packed, in order; StoreError if the value is damaged."""
    try:
        (n,) = _COUNT.unpack_from(packed)
        lengths = struct.unpack_from(f"<{n}I", packed, 4)
    except struct.error as exc:
        raise StoreError(f"the kept output of job {job_id} is damaged ({exc})") from exc
    start = 4 * (n + 1)
    ends = list(accumulate(lengths, initial=start))
    if ends[-1] != len(packed):
        raise StoreError(
            f"the kept output of job {job_id} is damaged ({ends[-1]} bytes expected, {len(packed)})"
        )
    return [packed[a:b] for a, b in pairwise(ends)]
