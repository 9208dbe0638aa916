"""The PostgreSQL backend of `foreman.storage.Storage`: one database shared by every node given its URL.

- `schema`: the tables, their version, the advisory locks, and the refusal of a database that is not foreman's;
- `connection`: the pool, what a lost database becomes (503), and the helpers every query module shares;
- `intake`: writing new jobs, the idempotency key held across nodes;
- `claims`: what waits (with what the other nodes hold) and taking it, `FOR UPDATE SKIP LOCKED`;
- `transitions`: a taken job's way to its end, putting back what a stopped node ran, pruning in turn;
- `reads`: the read models: one job, pages of jobs, output, positions, counts;
- `cache`: the embedding cache's table;
- `storage`: `PostgresStorage`, the `Storage` for coroutines: one pool connection per call;
- `relay`: `PostgresRelay`, the `foreman.storage.relay.Relay` between the nodes: events, watches, cancels, members;
- `node`: this node's membership while its worker runs: heartbeat, leases, LISTEN/NOTIFY.
"""
