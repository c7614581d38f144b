"""cowfs's read caches: L1/L2 chunk cache, readahead and learned prefetch (one module each)."""
from cowfs.cache.lru import ByteLRU
from cowfs.cache.tiers import ChunkCache

__all__ = ["ByteLRU", "ChunkCache"]
