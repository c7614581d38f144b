"""Key-value backends: the only layer that knows which database holds the bytes."""
from cowfs.kv.base import KV, Batch, StoreLockedError

__all__ = ["KV", "Batch", "StoreLockedError"]
