"""One process per node name: a session advisory lock on the name, held by a connection of its own.

Two processes with one FOREMAN_NODE would each take the other's jobs for
their own: each recovers "its" running jobs at boot and renews "its" leases,
so a job runs twice. The lock is taken before the node reads or writes a job,
and PostgreSQL lets go of it when the holder's session ends, kill -9 included.
"""

from __future__ import annotations

import os
import socket

import psycopg
from psycopg.rows import TupleRow

from foreman.errors import StoreBusy

# pg_try_advisory_lock(int4, int4) keys: this class, and the hash of the node's name.
LOCK_NODE_CLASS = 0x464E  # "FN"

Connection = psycopg.AsyncConnection[TupleRow]


async def hold_node_name(url: str, node: str, where: str) -> Connection:
    """A connection that holds `node`'s name on this database; StoreBusy naming the holder if another has it."""
    # Shown to whoever is refused (pg_stat_activity), so they know which process to stop.
    label = f"foreman node {node} pid {os.getpid()} on {socket.gethostname()}"[:63]
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, application_name=label)
    try:
        if await take(conn, node):
            return conn
        cursor = await conn.execute(
            "SELECT a.application_name, a.client_addr::text FROM pg_locks l"
            " JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s"
            " AND l.objid = hashtext(%s)::oid AND l.objsubid = 2",
            (LOCK_NODE_CLASS, node),
        )
        row = await cursor.fetchone()
    except BaseException:
        await conn.close()
        raise
    await conn.close()
    holder = (
        "another process" if row is None else f"{row[0] or 'a session'} from {row[1] or 'a local socket'}"
    )
    raise StoreBusy(
        f"node {node!r} is already running on {where} ({holder}); two processes with one FOREMAN_NODE"
        " would run jobs twice: stop that one, or give this one another FOREMAN_NODE"
    )


async def take(conn: Connection, node: str) -> bool:
    """Try to take `node`'s name on `conn`'s session; False if another session holds it."""
    cursor = await conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LOCK_NODE_CLASS, node))
    row = await cursor.fetchone()
    return bool(row and row[0])
