"""Metadata: inode records, directory entries and xattrs, versioned by layer (branches/snapshots)."""
