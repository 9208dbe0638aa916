"""The client side: the commands that talk to a running daemon over its HTTP API.

Nothing here imports the daemon's modules (worker, store, scheduler), so
`foreman status` starts as fast as a small HTTP client can.
"""
