"""The authorization rules (cowfs/commands/authz.py, docs/architecture.md "Authorization") on a
catalog in memory: what a branch owns, what it may delete, and that a name it does not own
answers exactly as a name that does not exist.  The same rules run through real mounts as the
unprivileged user in tests/test_authz.py; here every case of a random forest of branches and
snapshots is checked against a brute-force model, including after deletes re-parent."""
from __future__ import annotations

import errno
import random

import pytest

from cowfs.commands.authz import Owners
from cowfs.commands.reply import plain
from cowfs.errors import FSError
from cowfs.kv.base import Batch
from cowfs.meta.layers import Branch, Snapshot, Usage
from unit.helpers import Meta


class Forest:
    """A catalog of branches and snapshots, and the model of who made what from what."""

    def __init__(self) -> None:
        self.m = Meta()
        self.cat = self.m.catalog
        self.made_from: dict[str, str | None] = {}   # branch -> the branch it was forked from
        self.taken_in: dict[str, str | None] = {}    # snapshot -> the branch it was taken in

    def branch(self, name: str, parent_branch: str | None) -> None:
        b = Batch()
        self.cat.save_branch(Branch(name=name, head=self.cat.new_layer(0, b), view=self.cat.new_view(b),
                                    parent_branch=parent_branch), b)
        self.m.kv.write(b)
        self.made_from[name] = parent_branch

    def snapshot(self, name: str, branch: str) -> None:
        b = Batch()
        self.cat.save_snapshot(Snapshot(name=name, layer=self.cat.new_layer(0, b), view=self.cat.new_view(b),
                                        branch=branch), b)
        self.m.kv.write(b)
        self.taken_in[name] = branch

    def delete(self, name: str) -> None:
        """Deletes as the catalog does, and in the model: what the deleted branch owned passes
        to the branch it was made from."""
        b = Batch()
        self.cat.remove(name, b)
        self.m.kv.write(b)
        if name in self.made_from:
            up = self.made_from.pop(name)
            for k, v in self.made_from.items():
                if v == name:
                    self.made_from[k] = up
            for k, v in self.taken_in.items():
                if v == name:
                    self.taken_in[k] = up
        self.taken_in.pop(name, None)

    def model_owns(self, v: str, name: str) -> bool:
        """v owns itself, every branch whose chain of made_from reaches v, and their snapshots."""
        cur = self.taken_in[name] if name in self.taken_in else name
        while cur is not None:
            if cur == v:
                return True
            cur = self.made_from.get(cur)
        return False


def random_forest(seed: int) -> Forest:
    rng = random.Random(seed)
    f = Forest()
    f.branch("main", None)
    for i in range(40):
        live = sorted(f.made_from)
        what = rng.random()
        if what < 0.35:
            f.branch(f"b{i}", rng.choice(live))
        elif what < 0.8:
            f.snapshot(f"s{i}", rng.choice(live))
        elif len(live) > 1 or f.taken_in:
            f.delete(rng.choice([n for n in live if n != "main"] + sorted(f.taken_in)))
    return f


@pytest.mark.parametrize("seed", range(12))
def test_ownership_is_the_line_of_branches_even_after_deletes(seed):
    f = random_forest(seed)
    owners = Owners(f.cat)
    names = sorted(f.made_from) + sorted(f.taken_in)
    for v in sorted(f.made_from):
        for name in names:
            assert (owners.owned(v, name) is not None) == f.model_owns(v, name), (v, name)
        assert {s.name for s in owners.snapshots(v)} == {n for n in f.taken_in if f.model_owns(v, n)}
        assert {b.name for b in owners.branches(v)} == {n for n in f.made_from if f.model_owns(v, n)}
    for name in names:  # the store's administrator owns everything
        assert owners.owned(None, name) is not None


@pytest.mark.parametrize("seed", range(12))
def test_what_a_branch_does_not_own_answers_as_a_name_that_does_not_exist(seed):
    f = random_forest(seed)
    owners = Owners(f.cat)
    for v in sorted(f.made_from):
        for name in sorted(f.made_from) + sorted(f.taken_in):
            if f.model_owns(v, name):
                continue
            with pytest.raises(FSError) as foreign:
                owners.check_delete(v, name, {})
            with pytest.raises(FSError) as missing:
                owners.check_delete(v, "no-such-name", {})
            assert foreign.value.errno == missing.value.errno == errno.ENOENT
            assert str(foreign.value).replace(name, "X") == str(missing.value).replace("no-such-name", "X")
            if name in f.taken_in:
                with pytest.raises(FSError) as e:
                    owners.snapshot(v, name)
                assert e.value.errno == errno.ENOENT


def test_delete_never_takes_a_mounted_branch_its_own_branch_or_another_sandboxs_restore_points():
    f = Forest()
    f.branch("main", None)
    f.snapshot("before-step", "main")
    f.branch("fork", "main")
    f.snapshot("mine", "fork")
    f.branch("sub", "fork")
    f.snapshot("subsnap", "sub")
    owners = Owners(f.cat)
    mounted = {"main": ["/a"], "fork": ["/b"]}
    # the case: the fork's mount may delete neither main's snapshot nor main
    for name in ("before-step", "main"):
        with pytest.raises(FSError) as e:
            owners.check_delete("fork", name, mounted)
        assert e.value.errno == errno.ENOENT
    with pytest.raises(FSError) as e:
        owners.check_delete("fork", "fork", mounted)          # the branch mounted here
    assert e.value.errno == errno.EBUSY and "/b" not in str(e.value)  # a sandbox is not told where
    assert owners.check_delete("fork", "mine", mounted) == "snapshot"
    assert owners.check_delete("fork", "sub", mounted) == "branch"
    assert owners.check_delete("fork", "subsnap", mounted) == "snapshot"
    with pytest.raises(FSError) as e:                          # sub mounted elsewhere: busy
        owners.check_delete("fork", "subsnap", {**mounted, "sub": ["/c"]})
    assert e.value.errno == errno.EBUSY
    with pytest.raises(FSError) as e:                          # the administrator is told where
        owners.check_delete(None, "main", mounted)
    assert e.value.errno == errno.EBUSY and "/a" in str(e.value)
    assert owners.check_delete(None, "before-step", mounted) == "snapshot"


def test_names_are_store_wide_but_a_taken_name_says_nothing_of_its_owner():
    f = Forest()
    f.branch("main", None)
    f.snapshot("secret", "main")
    f.branch("fork", "main")
    owners = Owners(f.cat)
    with pytest.raises(FSError) as e:
        owners.name_free("fork", "secret")
    assert e.value.errno == errno.EEXIST and "snapshot" not in str(e.value) and "main" not in str(e.value)
    with pytest.raises(FSError) as e:
        owners.name_free("main", "secret")
    assert e.value.errno == errno.EEXIST and "snapshot 'secret'" in str(e.value)
    for bad in ("", ".hidden", "a/b", "x" * 129, "é"):
        with pytest.raises(FSError) as e:
            owners.name_free(None, bad)
        assert e.value.errno == errno.EINVAL


def test_a_fork_is_not_told_which_snapshot_of_its_parent_it_was_made_from():
    f = Forest()
    f.branch("main", None)
    f.snapshot("base", "main")
    b = Batch()
    f.cat.save_branch(Branch(name="fork", head=f.cat.new_layer(0, b), view=f.cat.new_view(b), parent="base",
                             parent_branch="main"), b)
    f.m.kv.write(b)
    f.made_from["fork"] = "main"
    owners = Owners(f.cat)
    fork = f.cat.branches["fork"]
    assert owners.parent_of("fork", fork) is None
    assert owners.parent_of("main", fork) == "base"
    assert owners.parent_of(None, fork) == "base"
    rows = plain(owners.listing("fork", lambda item: Usage(0, 0, 0), {}))
    assert [r["name"] for r in rows["branches"]] == ["fork"] and rows["branches"][0]["parent"] is None
    assert rows["snapshots"] == [] and "mounted_at" not in rows["branches"][0]
    admin = plain(owners.listing(None, lambda item: Usage(0, 0, 0), {"fork": ["/b"]}))
    assert {r["name"]: r["mounted_at"] for r in admin["branches"]} == {"main": [], "fork": ["/b"]}
