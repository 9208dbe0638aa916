"""The queue in PostgreSQL, shared by several foreman nodes: storage, schema, and the node's life in the cluster."""
