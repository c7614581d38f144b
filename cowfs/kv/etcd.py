"""The KV interface on etcd (v3 API, 3.4 or later), through etcd3gw and etcd's HTTP/JSON gateway.

Meant for what the fleet keeps in etcd: small named references (branch heads, snapshot
names, leases) updated by compare-and-set, not a store's bulk metadata.

- Layout: family F, key K is the etcd key PREFIX + F + "/" + K (family names hold no
  '/', so families never overlap).  A scan is a range request, LIMIT keys a page; every
  page reads at the revision of the first, so a scan sees the family as of its first
  step (as the interface says) unless etcd compacts that revision away meanwhile (it says
  so; etcd 3.4 compacts only when told, --auto-compaction-retention is 0 by default).
- write(batch, expect) is one Txn: compare Value(k) == v for each expected value and
  Version(k) == 0 for each expected absence, then the puts and deletes (the last
  operation on a key wins: etcd refuses a key twice in one Txn); the failure branch reads
  the expected keys so that Conflict says what was found.  etcd caps a Txn at
  --max-txn-ops (128) operations per branch and a request at --max-request-bytes (1.5 MiB):
  a batch over either is refused before anything is sent (BatchTooLarge), never cut in
  parts, since parts would not be atomic.
- Durability: etcd acknowledges a write once a majority has it in its fsync'd log, so
  `sync` has nothing to wait for.
- Failures: a request that did not reach etcd (connection refused, connect timeout, "no
  leader") is retried with back-off on the next endpoint, then EngineUnavailable.  Reads
  are retried on any transport error or 5xx.  A write whose reply was lost may have been
  applied: it raises OutcomeUnknown instead of being sent twice.  Writes go on a fresh
  connection each (Connection: close), so that a connection etcd dropped while it was down
  or restarting never turns a write that was not sent into an unknown outcome.
- Leases (`acquire`): a key held by one holder at a time, kept by an etcd lease that the
  holder keeps alive; a second holder gets LeaseHeld naming the first, and takes over
  once the lease expires.  `Lease.fence` is an expectation that makes a write commit only
  while the lease is still held.
"""
from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
from typing import Any, Callable, Iterator, Sequence

from cowfs.kv.base import KV, Batch, Conflict, Expect
from cowfs.remote import OutcomeUnknown, Retry, one_line, optional

API_PATH = "/v3/"  # the gateway's path since etcd 3.4
_SAFE_REFUSALS = ("etcdserver: no leader", "etcdserver: too many requests")


class BatchTooLarge(ValueError):
    """A batch over etcd's transaction limits (operations or request bytes)."""


class ScanExpired(Exception):
    """etcd compacted away the revision a scan was reading at."""


class LeaseHeld(Exception):
    """The key is held under another holder's live lease."""

    def __init__(self, cf: str, key: bytes, holder: str, ttl: int) -> None:
        super().__init__(f"{cf}/{key.decode(errors='backslashreplace')} is held by {holder!r} "
                         f"(its lease expires in {ttl} s unless renewed)")
        self.holder = holder
        self.ttl = ttl


class LeaseLost(Exception):
    """This holder's lease expired or was revoked: the key may be someone else's now."""


class _Unreached(Exception):
    """The request never reached etcd: safe to send again."""


class _Lost(Exception):
    """The request was sent but no reply came: it may have been applied."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def lease_holder(value: bytes) -> str:
    """Who holds a key acquired by `EtcdKV.acquire`, from its value (holder, newline, lease id)."""
    return value.split(b"\n")[0].decode(errors="replace")


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with prefix (prefix non-empty, not all 0xff)."""
    p = prefix.rstrip(b"\xff")
    return p[:-1] + bytes([p[-1] + 1])


class EtcdKV(KV):
    def __init__(self, endpoints: str | Sequence[str], families: tuple[str, ...],
                 prefix: bytes = b"cowfs/", *, timeout: float = 5.0, retry: Retry = Retry(),
                 page_size: int = 512, max_txn_ops: int = 128,
                 max_request_bytes: int = 1536 * 1024) -> None:
        etcd3gw = optional("etcd3gw", "the etcd key-value backend")
        self._requests = optional("requests", "the etcd key-value backend")
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e]
        if not endpoints:
            raise ValueError("no etcd endpoint given")
        for cf in families:
            if not cf or "/" in cf:
                raise ValueError(f"bad family name {cf!r} (not empty, no '/')")
        if not prefix:
            raise ValueError("the etcd key prefix must not be empty")
        self.endpoints = list(endpoints)
        self.families = tuple(families)
        self.prefix = bytes(prefix)
        self.retry = retry
        self.page_size = page_size
        self.max_txn_ops = max_txn_ops
        self.max_request_bytes = max_request_bytes
        self._readers = []
        self._writers = []
        for url in self.endpoints:
            u = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"bad etcd endpoint {url!r} (http://HOST:PORT)")
            for clients, close in ((self._readers, False), (self._writers, True)):
                clients.append(etcd3gw.client(
                    host=u.hostname, port=u.port or 2379, protocol=u.scheme, timeout=timeout,
                    api_path=API_PATH, session=self._session(close)))
        self._current = 0
        self._lock = threading.Lock()
        self.closed = False

    # --- transport ------------------------------------------------------------------------

    def _session(self, close_after: bool) -> Any:
        requests = self._requests
        urllib3_exc = optional("urllib3.exceptions", "the etcd key-value backend")

        class Session(requests.Session):
            """requests' errors sorted into 'not sent' and 'sent, no reply'."""

            def request(self, *args: Any, **kwargs: Any) -> Any:
                try:
                    return super().request(*args, **kwargs)
                except requests.exceptions.ConnectTimeout as e:
                    raise _Unreached(one_line(e)) from e
                except requests.exceptions.ConnectionError as e:
                    reason = getattr(e.args[0], "reason", None) if e.args else None
                    if isinstance(reason, urllib3_exc.NewConnectionError):
                        raise _Unreached(one_line(e)) from e
                    raise _Lost(one_line(e)) from e
                except requests.exceptions.Timeout as e:
                    raise _Lost(one_line(e)) from e

        session = Session()
        if close_after:
            session.headers["Connection"] = "close"
        return session

    def _what(self) -> str:
        return f"etcd at {self.endpoints[self._current]}"

    def _request(self, path: str, payload: dict[str, Any], write: bool = False) -> Any:
        """POST path under the retry policy, moving to the next endpoint after a failure."""
        exc = optional("etcd3gw.exceptions", "the etcd key-value backend")
        if self.closed:
            raise ValueError("operation on a closed EtcdKV")

        def once() -> Any:
            i = self._current
            client = (self._writers if write else self._readers)[i]
            try:
                return client.post(client.get_url(path), data=json.dumps(payload))
            except (_Unreached, _Lost, exc.Etcd3Exception) as e:
                if len(self.endpoints) > 1:
                    with self._lock:
                        if self._current == i:
                            self._current = (i + 1) % len(self.endpoints)
                if isinstance(e, exc.Etcd3Exception):
                    raise _EtcdReply(e) from e
                raise

        def transient(e: BaseException) -> bool:
            if isinstance(e, _Unreached):
                return True
            if isinstance(e, _Lost):
                return not write
            if isinstance(e, _EtcdReply):
                if any(s in e.detail for s in _SAFE_REFUSALS):
                    return True
                return e.unavailable and not write
            return False

        try:
            return self.retry.run(once, transient, self._what())
        except _Lost as e:
            raise OutcomeUnknown(f"{self._what()}: a write was sent but its reply was lost "
                                 f"({e}); it may or may not have been applied") from None
        except _EtcdReply as e:
            if write and e.unavailable:
                raise OutcomeUnknown(f"{self._what()}: {e.detail}: a write may or may not "
                                     "have been applied") from None
            raise e.as_error(self._what()) from None

    # --- the KV interface -----------------------------------------------------------------

    def _key(self, cf: str, key: bytes) -> bytes:
        if cf not in self.families:
            raise KeyError(cf)
        return self.prefix + cf.encode() + b"/" + bytes(key)

    def get(self, cf: str, key: bytes) -> bytes | None:
        r = self._request("kv/range", {"key": _b64(self._key(cf, key))})
        kvs = r.get("kvs")
        return _unb64(kvs[0].get("value", "")) if kvs else None

    def scan(self, cf: str, start: bytes, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        family = self._key(cf, b"")
        low = family + max(bytes(start), bytes(prefix))
        high = _prefix_end(family + bytes(prefix))
        return self._scan(family, low, high)

    def _scan(self, family: bytes, low: bytes, high: bytes) -> Iterator[tuple[bytes, bytes]]:
        revision = 0
        while True:
            payload: dict[str, Any] = {"key": _b64(low), "range_end": _b64(high),
                                       "limit": self.page_size}
            if revision:
                payload["revision"] = revision
            try:
                r = self._request("kv/range", payload)
            except KVReplyError as e:
                if "compacted" in str(e):
                    raise ScanExpired(f"{self._what()}: revision {revision} of a scan was "
                                      "compacted away while it ran") from None
                raise
            if not revision:
                revision = int(r["header"]["revision"])
            kvs = r.get("kvs", [])
            for item in kvs:
                yield _unb64(item["key"])[len(family):], _unb64(item.get("value", ""))
            if not r.get("more") or not kvs:
                return
            low = _unb64(kvs[-1]["key"]) + b"\x00"

    def write(self, batch: Batch, expect: Sequence[Expect] = ()) -> None:
        final: dict[bytes, bytes | None] = {}
        for cf, key, value in batch.ops:  # the last operation on a key wins
            final[self._key(cf, key)] = None if value is None else bytes(value)
        compare, failure = [], []
        for cf, key, value in expect:
            k = _b64(self._key(cf, key))
            compare.append({"key": k, "target": "VERSION", "result": "EQUAL", "version": 0}
                           if value is None else
                           {"key": k, "target": "VALUE", "result": "EQUAL", "value": _b64(value)})
            failure.append({"request_range": {"key": k}})
        if not final and not compare:
            return
        success = [{"request_delete_range": {"key": _b64(k)}} if v is None else
                   {"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v in final.items()]
        self._check_limits(len(success), len(compare), sum(
            len(k) + len(v or b"") for k, v in final.items()) + sum(
            2 * len(key) + len(value or b"") for _cf, key, value in expect))
        r = self._request("kv/txn", {"compare": compare, "success": success,
                                     "failure": failure}, write=True)
        if r.get("succeeded"):
            return
        for (cf, key, value), resp in zip(expect, r.get("responses", [])):
            kvs = resp.get("response_range", {}).get("kvs")
            found = _unb64(kvs[0].get("value", "")) if kvs else None
            if found != value:
                raise Conflict(cf, key, value, found)
        raise Conflict(expect[0][0], expect[0][1], expect[0][2], None)  # not reached

    def _check_limits(self, ops: int, compares: int, payload: int) -> None:
        if ops > self.max_txn_ops or compares > self.max_txn_ops:
            raise BatchTooLarge(
                f"a batch of {ops} operations with {compares} expectations is over etcd's "
                f"{self.max_txn_ops} operations per transaction (--max-txn-ops); the etcd KV "
                "is for small reference updates and never splits a batch (the parts would "
                "not be atomic)")
        if payload + 64 * (ops + compares) > self.max_request_bytes - 4096:
            raise BatchTooLarge(
                f"a batch of about {payload} bytes is over etcd's request limit of "
                f"{self.max_request_bytes} bytes (--max-request-bytes)")

    def sync(self) -> None:
        """Nothing to wait for: etcd acknowledged each write once a majority had it on disk."""
        if self.closed:
            raise ValueError("operation on a closed EtcdKV")

    def close(self) -> None:
        self.closed = True
        for client in self._readers + self._writers:
            client.session.close()

    # --- leases ---------------------------------------------------------------------------

    def acquire(self, cf: str, key: bytes, holder: str, ttl: int) -> "Lease":
        """Hold cf/key for holder under a new lease of ttl seconds (keep it alive with
        Lease.keep_alive or start_keepalive).  LeaseHeld if someone holds it."""
        if ttl < 2:
            raise ValueError("a lease lasts at least 2 s (etcd's minimum TTL)")
        k = self._key(cf, key)
        asked = time.monotonic()   # etcd starts the lease's TTL after this (Lease.renewed)
        lease_id = int(self._request("lease/grant", {"TTL": ttl, "ID": 0})["ID"])
        value = holder.encode() + b"\n" + str(lease_id).encode()
        txn = {"compare": [{"key": _b64(k), "target": "VERSION", "result": "EQUAL",
                            "version": 0}],
               "success": [{"request_put": {"key": _b64(k), "value": _b64(value),
                                            "lease": lease_id}}],
               "failure": [{"request_range": {"key": _b64(k)}}]}
        try:
            r = self._request("kv/txn", txn, write=True)
        except OutcomeUnknown:
            # The value names our new lease: if it is there, the write was ours.
            if self.get(cf, key) == value:
                return Lease(self, cf, bytes(key), holder, lease_id, ttl, value, asked)
            raise
        if r.get("succeeded"):
            return Lease(self, cf, bytes(key), holder, lease_id, ttl, value, asked)
        self._request("lease/revoke", {"ID": lease_id})
        kvs = r["responses"][0]["response_range"].get("kvs", [])
        if not kvs:  # released between the compare and now: try again
            return self.acquire(cf, key, holder, ttl)
        other = lease_holder(_unb64(kvs[0].get("value", "")))
        left = int(self._request("lease/timetolive",
                                 {"ID": int(kvs[0].get("lease", 0))}).get("TTL", 0))
        raise LeaseHeld(cf, bytes(key), other, max(left, 0))


class Lease:
    """One holder's hold on a key of an EtcdKV.

    `renewed` is this process's monotonic time just before it sent the grant or keep-alive
    that etcd last answered: etcd restarts the lease's TTL when it handles that request, so
    the lease cannot expire, nor anyone else take the key, before `renewed + ttl` (etcd only
    ever extends leases, at a leader change).  That is the bound a holder stops at."""

    def __init__(self, kv: EtcdKV, cf: str, key: bytes, holder: str, lease_id: int, ttl: int,
                 value: bytes, renewed: float | None = None) -> None:
        self.kv = kv
        self.cf = cf
        self.key = key
        self.holder = holder
        self.id = lease_id
        self.ttl = ttl
        # A write that names this in its expect commits only while the lease holds.
        self.fence: Expect = (cf, key, value)
        self.lost = threading.Event()
        self.renewed = time.monotonic() if renewed is None else renewed
        self.on_renew: Callable[[float], None] | None = None  # called with `renewed` after each renewal
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def keep_alive(self) -> int:
        """Renew the lease; the seconds it now has.  LeaseLost if it had expired."""
        sent = time.monotonic()
        r = self.kv._request("lease/keepalive", {"ID": self.id})
        left = int(r.get("result", {}).get("TTL", -1))
        if left <= 0:
            self.lost.set()
            raise LeaseLost(f"{self.cf}/{self.key.decode(errors='backslashreplace')}: the "
                            f"lease of {self.holder!r} expired")
        self.renewed = sent
        if self.on_renew is not None:
            self.on_renew(sent)
        return left

    def start_keepalive(self) -> None:
        """Renew every ttl/3 seconds in a daemon thread until release(), every second (at
        most ttl/6) after a failed renewal; `lost` is set when the lease could not be renewed
        before it expired, or etcd says it has."""
        def run() -> None:
            wait = self.ttl / 3
            while not self._stop.wait(wait):
                try:
                    self.keep_alive()
                    wait = self.ttl / 3
                except LeaseLost:
                    return
                except Exception:   # noqa: BLE001 - etcd not reached (or refusing): try again soon
                    wait = min(1.0, self.ttl / 6)
                    if time.monotonic() - self.renewed >= self.ttl:
                        self.lost.set()
                        return
        self._thread = threading.Thread(target=run, name=f"lease {self.holder}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and revoke the lease (its key goes with it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost.is_set():
            try:
                self.kv._request("lease/revoke", {"ID": self.id})
            except KVReplyError as e:
                if "lease not found" not in str(e):  # expired already: nothing to revoke
                    raise


class KVReplyError(Exception):
    """etcd refused a request; the message is its reason."""


class _EtcdReply(Exception):
    """An error reply of etcd, inside the retry loop."""

    def __init__(self, e: Any) -> None:
        text = getattr(e, "detail_text", None) or str(e)
        try:
            parsed = json.loads(text)
            self.detail = parsed.get("message") or parsed.get("error") or text
            code = int(parsed.get("code", 0))
        except (ValueError, TypeError, AttributeError):
            self.detail, code = " ".join(str(text).split()), 0
        # gRPC Unavailable (14) and DeadlineExceeded (4): the cluster could not answer now.
        self.unavailable = code in (4, 14) or type(e).__name__ in (
            "ConnectionFailedError", "ConnectionTimeoutError", "InternalServerError")
        super().__init__(self.detail)

    def as_error(self, what: str) -> Exception:
        return KVReplyError(f"{what}: {self.detail}")
