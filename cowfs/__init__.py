"""cowfs: a copy-on-write FUSE filesystem for AI-agent sandboxes.

``import cowfs`` is cheap: the Python API (cowfs.api: init_store, mount, Mount, the exceptions)
is loaded on first use of one of its names.
"""

__version__ = "0.1.0"

_API = ("init_store", "mount", "open_mount", "Mount", "Listing", "Ref", "Change", "CowfsError",
        "AlreadyExists", "SnapshotExists", "NotFound", "InvalidArgument", "Busy", "ReadOnly", "QuotaExceeded",
        "PermissionDenied", "MountError", "NotMounted", "StoreError")


def __getattr__(name: str):  # PEP 562: lazy re-exports
    if name in _API:
        from cowfs import api

        return getattr(api, name)
    raise AttributeError(f"module 'cowfs' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
