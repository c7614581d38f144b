"""cowfs: a copy-on-write FUSE filesystem for AI-agent sandboxes."""

__version__ = "0.1.0"
