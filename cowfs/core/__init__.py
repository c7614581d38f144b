"""The filesystem's semantics over the store: what a POSIX operation, a write or a flush does
to the inodes of a branch or snapshot (docs/architecture.md; docs/layers.md for the map)."""
