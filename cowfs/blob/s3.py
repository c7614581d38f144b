"""A BlobStore on S3-compatible object storage (AWS S3, SeaweedFS, Ceph RADOS Gateway), through
botocore, the core of boto3 (signing, endpoints, credentials and connection pooling): its
client directly, since boto3's layer on top (resources, s3transfer) is not used here and its
import cost 0.14-0.4 s of every lazy mount's start (issue 23's ready time).

- Objects are keys PREFIX + name in one bucket (the bucket must exist: creating buckets is
  an operator's decision).  Credentials and region come from boto3's usual chain
  (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE, ~/.aws/credentials and config);
  the endpoint from the argument, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS.
- Write-once: put first asks whether the key exists (an existing object of the same bytes
  costs no upload: content-addressed pushes resume cheaply), then uploads with
  `If-None-Match: *`, so that of two writers racing on one name only one creates it; the
  other is then compared like an existing object.  An engine that ignores If-None-Match
  (older S3 servers) keeps only the HEAD check, which a racing writer of other bytes can
  slip past.
- A PUT is atomic on S3: a killed upload leaves no object, never a partial one.
- Errors: connection failures, timeouts, 5xx and throttling replies are retried with
  back-off (cowfs.remote.Retry, botocore's own retries off so the bound is ours); when the
  attempts run out, EngineUnavailable with one line naming endpoint and bucket.  Every
  operation here may be repeated safely (get, head, list, delete, conditional put), so
  retrying after a lost reply is correct.  Other replies become BlobError with S3's code.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Any, Callable, Iterator, TypeVar

from cowfs.blob.base import (BlobConflict, BlobEntry, BlobError, BlobNotFound, BlobStore,
                             check_name, check_range)
from cowfs.remote import Retry, optional

T = TypeVar("T")

_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException",
                    "RequestLimitExceeded", "InternalError", "ServiceUnavailable",
                    "ConditionalRequestConflict", "OperationAborted"}
_loader: Any = None  # botocore's parsed service models, shared by every store of the process
_loader_lock = threading.Lock()

# HEAD replies have no body: their code is the bare status.
_DENIED = {"403", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"}


class S3BlobStore(BlobStore):
    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, retry: Retry = Retry(),
                 connect_timeout: float = 2.0, read_timeout: float = 30.0,
                 page_size: int = 1000) -> None:
        botocore_config = optional("botocore.config", "the S3 blob store")
        botocore_session = optional("botocore.session", "the S3 blob store")
        self._exc = optional("botocore.exceptions", "the S3 blob store")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if prefix:
            check_name(prefix[:-1])
        if not 1 <= page_size <= 1000:
            raise ValueError(f"page_size {page_size}: S3 lists 1 to 1000 keys a page")
        self.bucket = bucket
        self.prefix = prefix
        self.retry = retry
        self.page_size = page_size
        config = botocore_config.Config(
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            retries={"max_attempts": 1, "mode": "standard"},  # ours: cowfs.remote.Retry
            max_pool_connections=32,
            # Path-style URLs: self-hosted engines (SeaweedFS, Ceph) are reached by address,
            # without the per-bucket DNS names virtual-host style needs.
            s3={"addressing_style": "path"} if endpoint_url else None)
        # A session of its own (credentials are read when the store opens), with the parsed
        # API models shared: a client costs 0.08 s instead of 0.24 s here.
        global _loader
        with _loader_lock:
            if _loader is None:
                _loader = optional("botocore.loaders", "the S3 blob store").create_loader()
            session = botocore_session.get_session()
            session.register_component("data_loader", _loader)
        self._client = session.create_client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        self.endpoint = self._client.meta.endpoint_url
        self._what = f"S3 endpoint {self.endpoint} (bucket {bucket})"

    # --- plumbing -------------------------------------------------------------------------

    def _transient(self, e: BaseException) -> bool:
        exc = self._exc
        if isinstance(e, (exc.ConnectionError, exc.HTTPClientError, exc.IncompleteReadError,
                          exc.ResponseStreamingError, exc.ChecksumError)):
            return True
        if isinstance(e, exc.ClientError):
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return status >= 500 or e.response.get("Error", {}).get("Code") in _TRANSIENT_CODES
        return False

    def _call(self, fn: Callable[[], T], key: str) -> T:
        """fn() under the retry policy; S3's refusals as BlobError naming the object."""
        exc = self._exc
        try:
            return self.retry.run(fn, self._transient, self._what)
        except exc.NoCredentialsError:
            raise BlobError(
                f"{self._what}: no credentials (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE / ~/.aws/credentials)") from None
        except exc.ClientError as e:
            err = e.response.get("Error", {})
            code = err.get("Code", "?")
            if code == "NoSuchBucket":
                raise BlobError(f"{self._what}: the bucket does not exist") from None
            if code in _DENIED:
                raise BlobError(
                    f"{self._what}: {key}: access denied ({code}): check the credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the "
                    "bucket's permissions") from None
            raise BlobError(f"{self._what}: {key}: {e.operation_name}: {code}: "
                            f"{err.get('Message', '')}".rstrip(": ")) from None
        except exc.BotoCoreError as e:
            raise BlobError(f"{self._what}: {key}: {e}") from None

    def _code(self, e: BaseException) -> str | None:
        if isinstance(e, self._exc.ClientError):
            return str(e.response.get("Error", {}).get("Code"))
        return None

    def _head(self, key: str) -> dict[str, Any] | None:
        def head() -> dict[str, Any] | None:
            try:
                return self._client.head_object(Bucket=self.bucket, Key=key)
            except self._exc.ClientError as e:
                if self._code(e) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
        return self._call(head, key)

    # --- the interface --------------------------------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        key = self.prefix + check_name(name)
        data = bytes(data)
        head = self._head(key)
        if head is None:
            def create() -> bool:
                try:
                    self._client.put_object(Bucket=self.bucket, Key=key, Body=data,
                                            IfNoneMatch="*")
                    return True
                except self._exc.ClientError as e:
                    if self._code(e) == "PreconditionFailed":  # another put created it
                        return False
                    raise
            if self._call(create, key):
                return
            head = self._head(key)
            if head is None:
                raise BlobError(f"{self._what}: {key}: the upload was refused as existing, "
                                "yet the object is gone (deleted meanwhile)")
        self._compare(name, key, head, data)

    def _compare(self, name: str, key: str, head: dict[str, Any], data: bytes) -> None:
        size = int(head["ContentLength"])
        if size != len(data):
            raise BlobConflict(f"{name}: exists with other content ({size} bytes, put of "
                               f"{len(data)})")
        # A single-part upload's ETag is the MD5 of its bytes; otherwise compare the bytes.
        if head.get("ETag", "").strip('"') == hashlib.md5(data, usedforsecurity=False).hexdigest():
            return
        if self._get(key, name, 0, None) != data:
            raise BlobConflict(f"{name}: exists with other content (same length)")

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        check_range(offset, length)
        return self._get(self.prefix + check_name(name), name, offset, length)

    def _get(self, key: str, name: str, offset: int, length: int | None) -> bytes:
        if length == 0:
            self.size(name)
            return b""
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            args["Range"] = f"bytes={offset}-{end}"

        def get() -> bytes | None:
            try:
                r = self._client.get_object(**args)
                return r["Body"].read()
            except self._exc.ClientError as e:
                code = self._code(e)
                if code in ("NoSuchKey", "404"):
                    raise BlobNotFound(name) from None
                if code == "InvalidRange":  # offset at or past the end
                    return None
                raise
        data = self._call(get, key)
        if data is None:
            self.size(name)  # BlobNotFound if it is the object that is missing
            return b""
        return data

    def size(self, name: str) -> int:
        key = self.prefix + check_name(name)
        head = self._head(key)
        if head is None:
            raise BlobNotFound(name)
        return int(head["ContentLength"])

    def delete(self, name: str) -> None:
        key = self.prefix + check_name(name)
        self._call(lambda: self._client.delete_object(Bucket=self.bucket, Key=key), key)

    def list(self, prefix: str = "") -> Iterator[BlobEntry]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix,
                                "MaxKeys": self.page_size}
        while True:
            page = self._call(lambda: self._client.list_objects_v2(**args), args["Prefix"])
            for obj in page.get("Contents", []):
                yield BlobEntry(obj["Key"][len(self.prefix):], int(obj["Size"]))
            if not page.get("IsTruncated"):
                return
            args["ContinuationToken"] = page["NextContinuationToken"]

    def close(self) -> None:
        self._client.close()
