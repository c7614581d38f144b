"""The fleet: snapshots pushed to and pulled from a remote (S3-compatible object storage for
immutable content-addressed objects, etcd for the named references that point at them).

    config   the user's remotes (~/.config/cowfs/remotes.json): name, s3:// URL, etcd
    objects  the remote's object formats: packs and their indexes, directory trees, commits
    remote   one opened remote: its blob store, its references, its pack indexes
    state    what this user's machine remembers (SQLite in ~/.cache/cowfs): the stat cache of
             pushes, which local snapshot is which remote commit, the base of each branch
    push     a snapshot read through its mount into packs, trees and a commit; then the CAS
    pull     a commit's tree written into a directory (a branch mounted for it)
    check    every reference names objects that exist (and, verified, hash right)
    gc       what no reference reaches, removed after a grace period, never beside a push
    lazy     a lazy mount: a commit's tree written into a new store without its data (F objects
             that name where each chunk is on the remote), and the fetcher its daemon reads with

Push and pull touch no store internals: a push reads the snapshot through the mount, a pull
writes through a mount, as `cowfs import` and `cowfs export` do (docs/architecture.md "The
fleet").  A lazy mount is the exception: it builds its store's tree in process (lazy.py).  The embedded store needs none of it (boto3 and etcd3gw load only when a remote opens).
"""


class FleetError(Exception):
    """A fleet command could not do what it was asked; the message says why, in one line."""


class RefConflict(FleetError):
    """A reference was not where the push expected it: nothing was overwritten."""
