"""The SQLite backend of `foreman.storage.Storage`: one file, WAL, one thread that owns the connection.

- `schema`: the file: vetting it is foreman's, migrations, pragmas, and the columns a job is read from;
- `counts`: the waiting counts kept beside the table;
- `reads`: the read models: one job, pages of jobs, output, counts by state;
- `store`: `Store`, the synchronous queue: intake, claims and transitions over one connection;
- `storage`: `SqliteStorage`, the `Storage` for coroutines, running `Store` on its own thread.
"""
