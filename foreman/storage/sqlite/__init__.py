"""The SQLite backend of `foreman.storage.Storage`: one file, WAL; the hot path on the event loop, the rest beside it.

- `schema`: the file: vetting it is foreman's, migrations, pragmas (a job's columns are `foreman/storage/rows.py`'s);
- `counts`: the waiting counts kept beside the table;
- `reads`: the read models: one job, pages of jobs, output, counts by state;
- `queue_file`: `QueueFile`, the synchronous queue: intake, claims and transitions over one connection;
- `checkpoints`: the thread that checkpoints the write-ahead log, so no commit does;
- `storage`: `SqliteStorage`, the `Storage` for coroutines: `QueueFile` on the loop for the hot path, a
  second connection on the store's thread for what can take long.
"""
