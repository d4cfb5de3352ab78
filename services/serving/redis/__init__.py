"""Redis plumbing every store shares: one URL for a node, Sentinel or Cluster
(`topology`), redis-py's errors mapped to the store tree (`errors`), Lua scripts by SHA
with one fallback (`scripts`)."""
