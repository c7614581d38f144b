"""Key-value backends: the only layer that knows which database holds the bytes."""
from cowfs.kv.base import KV, Batch, Conflict, Expect, LocalEngine, StoreLockedError

__all__ = ["KV", "Batch", "Conflict", "Expect", "LocalEngine", "StoreLockedError"]
