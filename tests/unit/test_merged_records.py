"""Garbage collection's merges and the nodes in memory (cowfs.core.views.Views.records_moved):
a node whose record a merge moved must know the layer it is in now, or its next save
overwrites that record in the head without releasing its reference, and the old data's
count stays one too high forever (fsck: "reference count 1, expected 0"; seen once in
test_soak_with_rollbacks).  In process, no mount (the `fs` fixture, tests/conftest.py)."""
from __future__ import annotations

import stat

from cowfs.background.gc import run_gc
from cowfs.commands.authz import Caller
from cowfs.commands.branching import Branching
from cowfs.fsck import Fsck
from cowfs.store import ROOT_INO

ROOT = Caller(0, 0)


async def test_a_record_merged_twice_into_the_head_is_released_by_the_next_save(fs):
    """Line A - S - head, a file's record in A and its node in memory: deleting A merges it
    into S (not the head: the node keeps its layer), deleting S then merges S into the head;
    the record is in the head now, and rewriting the file must release the first data."""
    cmd = Branching(fs)
    view = fs.primary
    node = await fs.make(fs.node(view, ROOT_INO), b"f", stat.S_IFREG | 0o644, 0, 0)
    fs.looked_up(node)  # the kernel holds it (a cached dentry), as in the soak: it stays in memory
    await fs.write(node, 0, b"a" * 70_000)
    await fs.flush()
    await cmd.snapshot(view, "a", ROOT)
    await cmd.snapshot(view, "s", ROOT)
    for name in ("a", "s"):  # the older first: a merges into s, then s into the head
        await cmd.delete(view, name, ROOT, dict)
        await run_gc(fs, forks=False)
    assert fs.store.catalog.parents[view.lv.top] == 0, "one layer left: the head"
    assert view.nodes.get(node.ino) is node
    await fs.write(node, 0, b"b" * 70_000)
    await fs.flush()
    report = Fsck(fs.store).run()
    assert report.clean, report.problems
