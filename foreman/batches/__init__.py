"""OpenAI's Files and Batch APIs on foreman's queue: each line of a batch runs as a batch-class job.

- `lines`: the input file read and checked (OpenAI's validation errors), and the output and error lines;
- `service`: `Batches`, what moves a batch along its lifecycle, on every node, from the database alone.

The handlers are in `foreman/api/files.py` and `foreman/api/batches.py`; the tables in
`foreman/storage/batches.py`. The user's view is docs/batches.md.
"""
