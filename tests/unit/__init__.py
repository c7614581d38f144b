"""Unit tests of the core (kv, meta, chunks) without FUSE, on the in-memory KV."""
