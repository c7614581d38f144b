"""The chunk layer's column families (the store opens them; only chunks/ reads them)."""
from __future__ import annotations

CF_OBJECTS = "objects"  # hash -> object value (codec: R, Z, N, D inline; P a pointer into a pack)
CF_REFS = "refs"  # hash -> Ref (chunks.refs)
CF_PENDING = "pending"  # chunk hash -> b"": created, not yet considered for delta encoding
CF_SIMILAR = "similar"  # super-feature -> hash of a whole chunk that had it (checked on use)
CF_SPACE = "space"  # SPACE_KEY -> packed Space
SPACE_KEY = b"space"
# chunk hash -> the cache pack a lazy mount wrote it to when it fetched it, the time, and
# the F record it had (where on the remote it is again once evicted: chunks.remotecache)
CF_FETCHED = "fetched"
FAMILIES = (CF_OBJECTS, CF_REFS, CF_PENDING, CF_SIMILAR, CF_SPACE, CF_FETCHED)
