"""cowfs log: the snapshot/branch history of a lineage or a store, drawn as a graph (as
`git log --graph` draws commits).

build_history() turns a listing (what `cowfs list --json` prints) into GraphNodes, children
before parents; render_graph() lays them out in columns.  Both are pure, so the layout is
tested without a mount.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import click

from cowfs.cli.admin import listing_of
from cowfs.cli.params import target_arg
from cowfs.cli.textfmt import count, human


@dataclass
class GraphNode:
    """One row of the history graph (not a filesystem node)."""
    id: str
    kind: str                      # "branch" (a live head), "snapshot" or "fork" (a branch made from a branch)
    name: str
    line: str                      # the branch whose history it is on
    time: float
    parent: str | None = None      # id of the node this state came from
    row: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def build_history(listing: dict[str, Any]) -> list[GraphNode]:
    """Nodes of the snapshot/branch history, newest first, children before parents."""
    snaps = {s["name"]: s for s in listing["snapshots"]}
    branches = {b["name"]: b for b in listing["branches"]}
    nodes: dict[str, GraphNode] = {}
    for s in snaps.values():
        nodes["s:" + s["name"]] = GraphNode("s:" + s["name"], "snapshot", s["name"], s.get("parent") or "?",
                                            s["created"], row=s)
    for b in branches.values():
        p = b.get("parent")
        if p is not None and p in branches:
            nodes["f:" + b["name"]] = GraphNode("f:" + b["name"], "fork", b["name"], p, b["created"], row=b)
    # Events on each line, in time order: snapshots taken on it and forks made from it.
    lines: dict[str, list[GraphNode]] = {}
    for n in nodes.values():
        lines.setdefault(n.line, []).append(n)
    for evs in lines.values():
        evs.sort(key=lambda n: (n.time, n.kind != "fork"))

    def origin(line: str) -> tuple[str | None, str]:
        b = branches.get(line)
        if b is None:
            return None, ""                 # deleted, or outside this mount's lineage
        p = b.get("parent")
        if p is None:
            return None, ""
        if p in snaps:
            return "s:" + p, ""
        if p in branches:
            return "f:" + line, ""
        return None, f"{p} not listed"

    for line, evs in lines.items():
        prev, note = origin(line)
        for n in evs:
            n.parent = prev
            if prev is None and note:
                n.note = note
            prev = n.id
    for b in branches.values():
        evs = lines.get(b["name"], [])
        parent, note = (evs[-1].id, "") if evs else origin(b["name"])
        t = max([b["created"]] + [n.time for n in evs])
        nodes["b:" + b["name"]] = GraphNode("b:" + b["name"], "branch", b["name"], b["name"], t, parent, b, note)

    # Topological order (children first), newest first among the ready ones.
    pending_children: dict[str, int] = {nid: 0 for nid in nodes}
    for n in nodes.values():
        if n.parent in pending_children:
            pending_children[n.parent] += 1
    rank = {"branch": 2, "fork": 1, "snapshot": 0}
    ready = [n for n in nodes.values() if pending_children[n.id] == 0]
    order: list[GraphNode] = []
    while ready:
        ready.sort(key=lambda n: (n.time, rank[n.kind], n.name))
        n = ready.pop()
        order.append(n)
        if n.parent in pending_children:
            pending_children[n.parent] -= 1
            if pending_children[n.parent] == 0:
                ready.append(nodes[n.parent])
    return order


def _transition(cols: list[str | None], new: list[str | None], targets: list[int]) -> list[str]:
    """Lines drawing columns cols[i] moving left to position targets[i] (one step per line)."""
    pos = list(range(len(cols)))
    lines = []
    while any(p > t for p, t in zip(pos, targets)):
        width = 2 * max(len(cols), 1)
        chars = [" "] * width
        for i, (p, t) in enumerate(zip(pos, targets)):
            if cols[i] is None:
                continue
            if p > t:
                chars[2 * p - 1] = "/"
                pos[i] = p - 1
            elif chars[2 * p] == " ":
                chars[2 * p] = "|"
        lines.append("".join(chars).rstrip())
    return lines


def _compact(cols: list[str | None], merge: str | None = None) -> tuple[list[str | None], list[str]]:
    """Drop holes, and join every column waiting for MERGE into its first one; return the new
    columns and the lines drawing the moves (always to the left)."""
    new: list[str | None] = []
    targets = []
    first_merge = None
    for i, c in enumerate(cols):
        if c is None:
            targets.append(i)               # holes draw nothing and never move
        elif c == merge and first_merge is not None:
            targets.append(first_merge)
        else:
            if c == merge:
                first_merge = len(new)
            targets.append(len(new))
            new.append(c)
    return new, _transition(cols, new, targets)


def render_graph(order: list[GraphNode], mark: Callable[[GraphNode], str]) -> list[tuple[str, GraphNode | None]]:
    """git-log-style graph rows: (graph text, node) for node rows, (graph text, None) for joins."""
    cols: list[str | None] = []
    rows: list[tuple[str, GraphNode | None]] = []
    for n in order:
        if n.id not in cols:
            cols.append(n.id)
        if cols.count(n.id) > 1:
            cols, lines = _compact(cols, merge=n.id)
            rows += [(ln, None) for ln in lines]
        col = cols.index(n.id)
        graph = " ".join(mark(n) if i == col else ("|" if c is not None else " ") for i, c in enumerate(cols))
        rows.append((graph.rstrip(), n))
        cols[col] = n.parent
        if n.parent is None:
            if col == len(cols) - 1:
                cols.pop()
                while cols and cols[-1] is None:
                    cols.pop()
            else:
                cols, lines = _compact(cols)
                rows += [(ln, None) for ln in lines]
    return rows


def _when(t: float, same_day: bool) -> str:
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M", time.localtime(t))



def _mounted(row: dict[str, Any]) -> bool:
    return bool(row.get("mounted_here") or row.get("mounted_at"))


def history_json(order: list[GraphNode], where: str, mount: str | None) -> dict[str, Any]:
    return {"mount" if mount else "store": where, "nodes": [
        {"id": n.id, "kind": n.kind, "name": n.name, "branch": n.line, "parent": n.parent, "time": n.time,
         "created": n.row.get("created"), "logical_bytes": n.row.get("logical_bytes"),
         "inodes": n.row.get("inodes"), "mounted_here": bool(n.row.get("mounted_here")) if n.kind == "branch" else None,
         "mounted_at": n.row.get("mounted_at") if n.kind == "branch" else None,
         "note": n.note or None} for n in order]}


def history_lines(order: list[GraphNode]) -> list[str]:
    """The graph with a line of figures per snapshot and branch (styled for a terminal)."""
    def mark(n: GraphNode) -> str:
        if n.kind == "branch":
            return "@" if _mounted(n.row) else "o"
        return "*" if n.kind == "snapshot" else "."

    rows = render_graph(order, mark)
    gw = max(len(g) for g, _ in rows)
    days = {time.strftime("%Y-%m-%d", time.localtime(n.row.get("created", n.time))) for n in order}
    same_day = len(days) == 1 and days == {time.strftime("%Y-%m-%d")}
    nw = max(len(n.name) for n in order if n.kind != "fork")
    out = []
    for graph, n in rows:
        if n is None:
            out.append(graph)
            continue
        pad = " " * (gw - len(graph) + 2)
        if n.kind == "fork":
            out.append(f"{graph}{pad}" + click.style(f"(branch {n.name} made from {n.line})", dim=True))
            continue
        created = _when(n.row["created"], same_day)
        size = f"{human(n.row.get('logical_bytes')):>10}  {count(n.row.get('inodes')):>7} inodes"
        if n.kind == "branch":
            name = click.style(f"{n.name:<{nw}}", fg="green", bold=True)
            extra = []
            if n.row.get("mounted_here"):
                extra.append("mounted here")
            if n.row.get("mounted_at"):
                extra.append(f"mounted at {', '.join(n.row['mounted_at'])}")
            if n.row.get("parent"):
                extra.append(f"from {n.row['parent']}")
            if n.note:
                extra.append(n.note)
            out.append(f"{graph}{pad}{name}  branch    {created}  {size}  {', '.join(extra)}".rstrip())
        else:
            name = click.style(f"{n.name:<{nw}}", fg="yellow")
            extra = [f"on {n.line}"] + ([n.note] if n.note else [])
            out.append(f"{graph}{pad}{name}  snapshot  {created}  {size}  {', '.join(extra)}".rstrip())
    return out


@click.command()
@target_arg
@click.option("--json", "as_json", is_flag=True, help="Print the history as JSON (nodes in display order).")
def log(target: str, as_json: bool) -> None:
    """The snapshot/branch history of the lineage mounted at TARGET (any path inside a
    mount), or of a whole store (TARGET a store directory; root or its owner), as a graph.

    \b
    @ the branch mounted at TARGET    o another branch (its live state)
      (of a store: a mounted branch)
    * a snapshot                      . where a branch was made from a branch
    Newest first; each line of the graph is one branch.
    """
    listing, where, mount = listing_of(target)
    order = build_history(listing)
    if as_json:
        click.echo(json.dumps(history_json(order, where, mount)))
        return
    if not order:
        click.echo("no history")
        return
    for line in history_lines(order):
        click.echo(line)


COMMANDS = (log,)
