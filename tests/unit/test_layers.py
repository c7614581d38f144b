"""The layering of cowfs/, checked on the source (ast, no import): docs/layers.md.

1. Imports go down the layers only (a module may import from its own layer and those below):

       cli, api, mount_helper           the user's side: CLI, Python API, mount(8) helper
       daemon, offline                  running the filesystem (a daemon, or offline maintenance)
       fuse                             the FUSE adapter
       core, commands, background,      the filesystem's semantics, the control-file commands,
         fsck, treecopy                 background work, the store checker, the tree copier
       store, storedir, homes           the store: engines opened, layers composed; its file names;
                                        the homes of branches with a daemon of their own
       meta, chunks, cache              versioned metadata, content-addressed chunks, the chunk cache
       kv, blob                         the storage engines (KV, blob store)
       errors, faults, threads,         leaves any layer may use; they import no cowfs module
         private, remote, libc

   Every import counts: at module level, inside functions, and under TYPE_CHECKING.
2. No module is over MAX_LINES lines unless its docstring says why ("Over 500 lines: ...").
3. The KV key layout and the value layout of records are known only where they are defined:
   outside kv/, blob/, meta/ (the metadata families: inodes, entries, xattrs, links, changes,
   orphans, the catalog) and chunks/ (the chunk families), no module calls the raw KV
   (`kv.get/scan/put/delete`), writes a batch by family (`batch.put(CF_X, ...)`), slices a
   key (`key[8:-9]`) or decodes a fixed slice (`int.from_bytes(v[:8], ...)`) -- except the
   modules in LAYOUT_EXCEPTIONS, each with its reason.
4. The store directory's entries (db, packs, the marker, pid files, the admin socket) are
   named in paths only in cowfs/storedir.py.
"""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "cowfs"
MAX_LINES = 500

LAYERS: list[tuple[str, ...]] = [  # bottom first
    ("cowfs.errors", "cowfs.faults", "cowfs.threads", "cowfs.private", "cowfs.remote", "cowfs.libc"),
    ("cowfs.kv", "cowfs.blob"),
    ("cowfs.meta", "cowfs.chunks", "cowfs.cache"),
    ("cowfs.store", "cowfs.storedir", "cowfs.homes"),
    ("cowfs.core", "cowfs.commands", "cowfs.background", "cowfs.fsck", "cowfs.treecopy",
     "cowfs.fleet"),
    ("cowfs.fuse",),
    ("cowfs.daemon", "cowfs.offline"),
    ("cowfs.cli", "cowfs.api", "cowfs.mount_helper", "cowfs.__main__", "cowfs"),
]

# Modules that still read or write families they do not own, and why.
LAYOUT_EXCEPTIONS = {
    "cowfs/fsck.py": "the checker reads every family raw on purpose: it must find what the owners' "
                     "parsers would hide (stray versions, dangling references) and repair it",
    "cowfs/background/dedup.py": "chunk-layer work (the similarity index, delta plans, the dictionary) "
                                 "run by the background worker on the chunk families directly; it "
                                 "belongs in chunks/ behind an interface, a move of its own",
    "cowfs/store.py": "the composition of the engines: it creates the families, writes the format and "
                      "the inode counter and counts usage at an upgrade; the KV-wide keys it owns go "
                      "to kv/ when the engine becomes configurable",
}
OWNERS = ("cowfs/kv/", "cowfs/blob/", "cowfs/meta/", "cowfs/chunks/")
STORE_FILE_NAMES = {"db", "packs", "refs.sqlite", "cowfs-store.json", "daemon.pid", "warmer.pid", "daemon.sock",
                    "zygote.sock", "homes"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = _modules()


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _layer(module: str) -> int:
    best, rank = "", -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > len(best):
                best, rank = n, i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS (and docs/layers.md)"
    return rank


def _imports(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, module) of every cowfs module the module imports."""
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names if a.name.split(".")[0] == "cowfs"]
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module and n.module.split(".")[0] == "cowfs":
            for a in n.names:
                sub = f"{n.module}.{a.name}"
                out.append((n.lineno, sub if sub in MODULES else n.module))
    return out


def test_every_module_is_in_a_layer():
    for name in MODULES:
        _layer(name)


def test_no_module_imports_from_a_layer_above_it():
    bad = []
    for name, path in MODULES.items():
        mine = _layer(name)
        for line, target in _imports(_tree(path)):
            if _layer(target) > mine:
                bad.append(f"{_rel(path)}:{line}: {name} (layer {mine}) imports {target} (layer {_layer(target)})")
    assert not bad, "\n".join(bad)


def test_the_leaves_import_no_cowfs_module():
    for name in LAYERS[0]:
        assert not _imports(_tree(MODULES[name])), name


def test_no_module_over_500_lines_without_a_reason_at_its_top():
    bad = []
    for path in MODULES.values():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(_tree(path)) or ""
        if lines > MAX_LINES and "over 500 lines:" not in doc.lower():
            bad.append(f"{_rel(path)}: {lines} lines, and its docstring does not say why (\"Over 500 lines: ...\")")
    assert not bad, "\n".join(bad)


def _receiver(e: ast.expr) -> str | None:
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Attribute):
        return e.attr
    return None


def _fixed_slice(s: ast.expr) -> bool:
    if not isinstance(s, ast.Slice):
        return False
    ends = [x for x in (s.lower, s.upper) if x is not None]

    def number(x: ast.expr) -> bool:
        if isinstance(x, ast.UnaryOp):
            x = x.operand
        return isinstance(x, ast.Constant) and isinstance(x.value, int)
    return bool(ends) and all(number(x) for x in ends)


def layout_uses(tree: ast.Module, rel: str) -> list[str]:
    """Where the module rel reads or writes the KV or a key/record layout itself (rule 3)."""
    out = []
    for n in ast.walk(tree):
        what = None
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute):
            method, recv = n.func.attr, _receiver(n.func.value)
            first = n.args[0] if n.args else None
            if recv == "kv" and method in ("get", "scan", "put", "delete"):
                what = f"raw KV call {ast.unparse(n.func)}()"
            elif (method in ("put", "delete") and recv != "meta" and isinstance(first, ast.Name)
                  and first.id.startswith("CF_")):
                what = f"batch write by family {ast.unparse(n.func)}({first.id}, ...)"
            elif method == "from_bytes" and isinstance(first, ast.Subscript) and _fixed_slice(first.slice):
                what = f"decodes a fixed slice: {ast.unparse(n)}"
        elif isinstance(n, ast.Subscript) and _fixed_slice(n.slice):
            recv = _receiver(n.value)
            if recv is not None and (recv in ("k", "key") or recv.endswith("_key")):
                what = f"slices a key: {ast.unparse(n)}"
        if what:
            out.append(f"{rel}:{n.lineno}: {what}")
    return out


def test_only_the_storage_layers_know_the_key_and_record_layout():
    bad = []
    for path in MODULES.values():
        rel = _rel(path)
        if rel.startswith(OWNERS) or rel in LAYOUT_EXCEPTIONS:
            continue
        bad += layout_uses(_tree(path), rel)
    assert not bad, "\n".join(sorted(bad))


def test_the_layout_exceptions_are_still_needed():
    """An exception whose module no longer touches the layout must go from the list."""
    for rel in LAYOUT_EXCEPTIONS:
        assert layout_uses(_tree(ROOT / rel), rel), f"{rel} no longer needs its LAYOUT_EXCEPTIONS entry"


def test_the_store_directory_is_named_in_one_module():
    bad = []
    for path in MODULES.values():
        rel = _rel(path)
        if rel == "cowfs/storedir.py":
            continue
        for n in ast.walk(_tree(path)):  # a name in a path: os.path.join(store, "packs"), ...
            if isinstance(n, ast.Call) and _receiver(n.func) in ("join", "open", "Path"):
                bad += [f"{rel}:{n.lineno}: {x.value!r}" for x in n.args
                        if isinstance(x, ast.Constant) and x.value in STORE_FILE_NAMES]
    assert not bad, "\n".join(bad)


def test_the_checks_find_what_they_look_for():
    """The rules' detectors, on the forms the issue named (#21): a key parsed by slicing, a raw
    scan, a batch written by family, an upward import."""
    src = ("from cowfs.daemon import mounts\n"
           "def f(kv, batch, key):\n"
           "    kv.scan(CF_DIRENTS, b'')\n"
           "    batch.put(CF_ORPHANS, key, b'')\n"
           "    return key[8:-9], int.from_bytes(key[8:16], 'big')\n")
    tree = ast.parse(src)
    found = layout_uses(tree, "probe.py")
    assert len(found) == 5, found  # scan, put, key[8:-9], key[8:16], from_bytes
    assert _imports(tree) == [(1, "cowfs.daemon.mounts")]
    assert _layer("cowfs.daemon.mounts") > _layer("cowfs.core.orphans")
