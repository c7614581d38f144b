"""The small key-value interface the rest of cowfs is written against.

Everything above this module sees named column families of raw bytes, ordered iteration,
atomic multi-family batches with an optional compare-and-set, and an explicit durability
barrier.  That is all a distributed engine (etcd, FoundationDB, TiKV) has to provide.
What only an embedded engine has (memtables, a read-only error state to reopen from,
manual compaction, files on a local disk) is the separate `LocalEngine` interface, which
the store layer (cowfs.store) uses explicitly when its backend has it.

Backends: cowfs.kv.rocks.RocksKV (RocksDB, the store's engine, also a LocalEngine),
cowfs.kv.memory.MemoryKV (sorted in-memory maps, for tests of the core without a disk),
cowfs.kv.sqlite.SQLiteKV (one SQLite file several processes share: the local reference store)
and cowfs.kv.etcd.EtcdKV (etcd, for the fleet's small named references; needs cowfs[remote]).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator, Protocol, Sequence, runtime_checkable


class StoreLockedError(Exception):
    """The database is opened read-write by another process."""


class Conflict(Exception):
    """A compare-and-set write found a key not as expected: nothing of its batch was written."""

    def __init__(self, cf: str, key: bytes, expected: bytes | None, found: bytes | None) -> None:
        def show(v: bytes | None) -> str:
            return "absent" if v is None else f"{len(v)} bytes {v[:16].hex()}"
        super().__init__(f"{cf}/{key.hex()}: expected {show(expected)}, found {show(found)}")
        self.cf = cf
        self.key = key
        self.expected = expected
        self.found = found


# (column family, key, the value the key must hold, or None: the key must be absent)
Expect = tuple[str, bytes, bytes | None]


class Batch:
    """An ordered list of puts and deletes that a backend applies atomically (a later
    operation on the same key wins).  `expect`: compare-and-set conditions that travel with
    the batch to a backend that splits it (cowfs.kv.split.SplitKV: the reference store's
    part is written only if they hold); a backend that does not split ignores them."""

    __slots__ = ("ops", "expect")

    def __init__(self) -> None:
        self.ops: list[tuple[str, bytes, bytes | None]] = []
        self.expect: list[Expect] = []

    def expects(self, cf: str, key: bytes, value: bytes | None) -> None:
        """Write only if (cf, key) holds value (None: absent) when written; the first
        condition on a key wins (it is what the key held before this batch)."""
        for c, k, _v in self.expect:
            if c == cf and k == key:
                return
        self.expect.append((cf, key, value))

    def put(self, cf: str, key: bytes, value: bytes) -> None:
        self.ops.append((cf, key, value))

    def delete(self, cf: str, key: bytes) -> None:
        self.ops.append((cf, key, None))

    def __len__(self) -> int:
        return len(self.ops)


class KV(ABC):
    """Ordered byte-string maps ("column families") with atomic, optionally conditional batches.

    Families are fixed when the backend is opened; naming another raises KeyError.
    """

    @abstractmethod
    def get(self, cf: str, key: bytes) -> bytes | None: ...

    @abstractmethod
    def scan(self, cf: str, start: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """Yield (key, value) from the first key >= start while keys begin with prefix.

        The iteration sees the family as it was at its first step: writes made meanwhile (by
        this thread between two steps, or by another) do not show in it."""

    @abstractmethod
    def write(self, batch: Batch, expect: Sequence[Expect] = ()) -> None:
        """Apply the batch atomically; durable against process death, not yet power loss.

        expect: compare-and-set.  The batch is applied only if every (cf, key, value) holds
        at the moment it is applied (value None: the key is absent; b"" is a present, empty
        value); otherwise `Conflict` is raised and nothing is written.  Checks and batch are
        one atomic step with respect to every other writer of the backend, so a caller that
        read some keys, computed a batch from them and names them in `expect` knows that no
        one changed them in between (optimistic concurrency: on Conflict, read again and
        recompute).

        It maps one to one onto etcd's transaction (one key space, family as a key prefix):
            Txn(compare=[Value(cf/key) == v          for each expected value v,
                         Version(cf/key) == 0        for each expected absence],
                success=[Put(cf/key, value) / Delete(cf/key) for each batch operation],
                failure=[])
        and raise Conflict when the response says `succeeded: false`.  (etcd's Value
        comparison on a missing key is false, hence Version == 0 for absence; mod_revision
        comparisons are the cheaper form once values carry their revision.)  FoundationDB and
        TiKV's transactional API: in one transaction, read the expected keys (their read
        conflict ranges make a concurrent change abort the commit), compare, then set/clear
        and commit; a commit conflict is a Conflict too.  Limits of those engines (etcd:
        128 operations and 1.5 MiB per transaction by default; FoundationDB: 10 MB) are below
        what a large flush or a gc chunk writes today, so a remote engine will need batches
        cut to its limit, with only the last one conditional or a commit record.
        """

    @abstractmethod
    def sync(self) -> None:
        """Return once every earlier write survives a power loss (blocking: call in a thread)."""

    @abstractmethod
    def close(self) -> None: ...


@runtime_checkable
class LocalEngine(Protocol):
    """What an embedded engine on the local disk offers beyond KV (RocksKV does); the store
    uses it for disk-space checks, recovery from write errors and `cowfs gc`'s compaction.
    A remote KV does not implement it, and code above the store never calls it."""

    # True while the engine is open for reads only (a `recover` could not reopen it for
    # writing): it refuses writes until a later `recover` succeeds.
    read_only: bool

    def unflushed_bytes(self) -> int:
        """Bytes accepted but not yet in the engine's final files (memtables)."""

    def memory(self) -> dict[str, int]:
        """Bytes the engine holds in memory, by kind (memtables, caches, table readers)."""

    def recover(self) -> None:
        """Resume writing after an I/O error (for example a full disk that has space again).
        May replace the engine's handles: no other thread may use it meanwhile."""

    def flush(self) -> None:
        """Write what memtables hold to the engine's final files (blocking: in a thread)."""

    def compact(self) -> None:
        """Reclaim the space of deleted keys now (blocking: call in a thread)."""

    # Bytes of keys and values written since the last rotate_wal (about the log's growth).
    wal_bytes: int

    def rotate_wal(self, fill: int = 0) -> None:
        """Start a new write-ahead log, a recycled one if the engine has one, after filling
        logs of `fill` bytes to recycle (blocking: call in a thread; see RocksKV)."""

    def disk_usage(self) -> tuple[int, int]:
        """(bytes the engine occupies on disk without its write-ahead log, bytes of the log)."""
