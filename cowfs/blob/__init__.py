"""Blob stores: write-once named objects (local files now, object storage for the fleet).
The S3 backend is imported from cowfs.blob.s3 only when wanted (it needs `cowfs[remote]`)."""
from cowfs.blob.base import BlobConflict, BlobEntry, BlobError, BlobNotFound, BlobStore, check_name

__all__ = ["BlobStore", "BlobEntry", "BlobError", "BlobNotFound", "BlobConflict", "check_name"]
