"""The CLI's human output: data (the JSON that --json prints) in, lines out.

One style everywhere: sizes in binary units, counts with separators, times local, file
names quoted as git quotes them.  Pure functions, so each format is tested without a mount.
"""
from __future__ import annotations

from typing import Any

from cowfs.cli.textfmt import count, duration, human, percent, quote_path, table, when

MARKS = {"added": "+", "removed": "-", "modified": "M", "renamed": "R"}


def _row(label: str, text: str) -> str:
    return f"{label:<12}{text}"


def stats_lines(d: dict[str, Any]) -> list[str]:
    out = []
    if d.get("store"):
        out.append(_row("store", d["store"] + ("" if d.get("daemon_pid") else "  (not mounted)")))
    if d.get("daemon_pid"):
        out.append(_row("daemon", f"pid {d['daemon_pid']}, up {duration(d.get('uptime_s', 0))}, "
                                  f"memory {human(d.get('rss_bytes'))} (peak {human(d.get('peak_rss_bytes'))})"))
    if d.get("branch"):
        where = f" at {d['mountpoint']}" if d.get("mountpoint") else ""
        quota = ""
        if d.get("quota_bytes") or d.get("quota_inodes"):
            quota = (f" of quota {human(d['quota_bytes']) if d.get('quota_bytes') else 'none'}, "
                     f"{count(d['quota_inodes']) if d.get('quota_inodes') else 'none'} inodes")
        out.append(_row("branch", f"{d['branch']}{where}: {human(d.get('usage_bytes'))} logical, "
                                  f"{human(d.get('usage_allocated_bytes'))} allocated, "
                                  f"{count(d.get('usage_inodes'))} inodes{quota}"))
        others = [b for b in d.get("mounted_branches", []) if b != d["branch"]]
        if others:
            out.append(_row("also mounted", ", ".join(others)))
        ro = d.get("read_only") or {}
        if ro.get("read_only"):     # its remote hold was lost (cowfs.fleet.holds)
            out.append(_row("read-only", f"since {when(ro['since'])}: "
                                         f"{ro.get('why') or 'the hold of its remote branch was lost'}"))
    if "logical_bytes" in d:
        out.append(_row("data", f"{human(d['logical_bytes'])} in files, {human(d.get('unique_bytes'))} unique, "
                                f"{human(d.get('chunk_bytes'))} stored in {count(d.get('chunks'))} chunks"
                                + (f", {human(d['remote_bytes'])} still on the remote of a lazy mount"
                                   if d.get("remote_bytes") else "")))
        out.append(_row("saved", f"{human(d.get('dedup_saved_bytes'))} by dedup, "
                                 f"{human(d.get('delta_saved_bytes'))} by delta encoding, "
                                 f"{human(d.get('compression_saved_bytes'))} by compression"))
    if "stored_bytes" in d:
        out.append(_row("on disk", f"{human(d['stored_bytes'])} stored, and a write-ahead log of "
                                   f"{human(d.get('wal_bytes'))} ({human(d.get('unflushed_bytes'))} of recent "
                                   "writes not yet flushed out of it)"))
    if "background_queue" in d:
        dd = d.get("dedup") or {}
        state = "" if dd.get("enabled", True) else " (off: -o dedup=off)"
        out.append(_row("background", f"{count(d['background_queue'])} chunks queued{state}; "
                                      f"{count(d.get('delta_chunks'))} of {count(d.get('chunks'))} chunks are deltas"))
    lazy = d.get("lazy")
    if lazy:
        out.append(_row("lazy mount", f"of {lazy['remote']}: {count(lazy['chunks_fetched'])} chunks fetched "
                                      f"({human(lazy['bytes_fetched'])}; {human(lazy['bytes_transferred'])} in "
                                      f"{count(lazy['gets'])} GETs), {count(lazy['failures'])} failed fetches"))
        rc = lazy.get("cache") or {}
        if rc:
            limit = human(rc["limit"]) if rc["limit"] else "no bound"
            out.append(_row("remote cache", f"{human(rc['bytes'])} of {limit} in {count(rc['packs'])} packs; "
                                            f"{count(rc['chunks_evicted'])} chunks evicted "
                                            f"({human(rc['bytes_evicted'])}), {count(rc['refetches'])} fetched again"))
    shared = d.get("shared") or {}
    if shared:
        out.append(_row("shared", f"{count(shared.get('inodes', 0))} inodes of copied trees share their "
                                  f"originals' records ({count(shared.get('ranges', 0))} ranges)"))
    cache = d.get("cache") or {}
    for level in ("l1", "l2"):
        c = cache.get(level)
        if c:
            out.append(_row(f"cache {level}", f"{human(c.get('bytes'))} of {human(c.get('max_bytes'))}, "
                                              f"{count(c.get('entries'))} entries, {percent(c.get('hit_rate'))} hits "
                                              f"({count(c.get('hits'))} hits, {count(c.get('misses'))} misses, "
                                              f"{count(c.get('evictions'))} evictions)"))
    pf = cache.get("prefetch") or {}
    for source in ("readahead", "learned"):
        p = pf.get(source)
        if p:
            out.append(_row(source, f"{count(p.get('prefetched'))} chunks prefetched, {count(p.get('used'))} "
                                    f"read (precision {percent(p.get('precision'))}), "
                                    f"{count(p.get('served_reads'))} reads served"))
    if pf:
        out.append(_row("recall", f"{percent(pf.get('recall'))} of {count(pf.get('chunk_reads'))} chunk reads"))
    reqs = d.get("requests") or {}
    if reqs:
        top = sorted(reqs.items(), key=lambda kv: -kv[1])[:6]
        out.append(_row("requests", f"{count(sum(reqs.values()))} ("
                                    + ", ".join(f"{k} {count(v)}" for k, v in top) + ")"))
    if "commits" in d:
        out.append(_row("commits", f"{count(d['commits'])} ({count(max(0, d['commits'] - d.get('syncs_done', 0)))} "
                                   f"since the last disk sync), {human(d.get('dirty_bytes'))} dirty, "
                                   f"{count(d.get('flushes'))} flushes"))
    return out


def list_lines(listing: dict[str, Any]) -> list[str]:
    rows = []
    for r in listing.get("snapshots", []) + listing.get("branches", []):
        # a mount's listing says which branch is its own; a store's, where each is mounted
        note = "mounted here" if r.get("mounted_here") else ", ".join(r.get("mounted_at") or [])
        rows.append([r["name"], r["kind"], str(r.get("parent") or "-"), when(r["created"]),
                     human(r.get("logical_bytes")), human(r.get("allocated_bytes")), count(r.get("inodes")), note])
    return table(["NAME", "KIND", "PARENT", "CREATED", "LOGICAL", "ALLOCATED", "INODES", ""], rows, right={4, 5, 6})


def diff_lines(changes: list[dict[str, Any]]) -> list[str]:
    out = []
    for c in changes:
        extra = f" (from {quote_path(c['from'])})" if c.get("from") is not None else ""
        out.append(f"{MARKS[c['change']]}\t{quote_path(c['path'])}{extra}")
    return out


def diff_nul(changes: list[dict[str, Any]]) -> bytes:
    """MARK NUL PATH NUL per change; a rename: R NUL FROM NUL PATH NUL (names as their bytes)."""
    out = bytearray()
    for c in changes:
        out += MARKS[c["change"]].encode() + b"\0"
        if c.get("from") is not None:
            out += c["from"].encode("utf-8", "surrogateescape") + b"\0"
        out += c["path"].encode("utf-8", "surrogateescape") + b"\0"
    return bytes(out)


def gc_line(d: dict[str, Any]) -> str:
    where = "by its daemon" if d.get("daemon") else "offline"
    packs = ""
    if d.get("packs_deleted") or d.get("packs_repacked") or d.get("packs_condemned") or d.get("packs_waiting"):
        packs = (f"; packs: {count(d.get('packs_condemned'))} condemned, {count(d.get('packs_deleted'))} deleted, "
                 f"{count(d.get('packs_repacked'))} repacked ({human(d.get('pack_bytes_copied'))} copied)")
        if d.get("packs_waiting"):
            packs += f", {count(d.get('packs_waiting'))} condemned waiting for other writers"
    if d.get("dup_published") or d.get("dup_open") or d.get("dup_rewritten"):
        packs += (f"; chunks packed twice across databases: {count(d.get('dup_published'))} published, "
                  f"{count(d.get('dup_rewritten'))} rewritten here, {count(d.get('dup_open'))} waiting for daemons")
    return (f"removed {count(d.get('versions_removed'))} metadata versions ({where}){packs}; "
            f"the store takes {human(d.get('disk_bytes'))} on disk")


def remote_gc_line(name: str, f: dict[str, Any]) -> str:
    """`cowfs remote gc`'s one line (cowfs.fleet.gc's figures)."""
    deleted, repacked = ("would delete", "would repack") if f["dry_run"] else ("deleted", "repacked")
    return (f"{name}: {deleted} {f['deleted']} objects ({human(f['deleted_bytes'])}); {f['condemned']} newly "
            f"unreachable, {f['waiting']} waiting for the grace period; {f['live_packs']} packs in use "
            f"({human(f['unreachable_bytes_in_live_packs'])} unreachable inside them); {repacked} "
            f"{f['repacked_packs']} packs ({human(f['repacked_bytes'])}, {human(f['repack_copied_bytes'])} live copied)")


def dedup_lines(d: dict[str, Any]) -> list[str]:
    shared = d.get("shared") or {}
    return [f"queue {count(d.get('background_queue'))} chunks; {count(d.get('delta_chunks'))} of "
            f"{count(d.get('chunks'))} chunks are deltas, saving {human(d.get('delta_saved_bytes'))}",
            f"{count(shared.get('inodes', 0))} inodes of copied trees share their originals' records "
            f"({count(shared.get('ranges', 0))} ranges)"]


def fsck_lines(d: dict[str, Any]) -> list[str]:
    out = [f"problem: {p}" for p in d["problems"]]
    out += [f"repaired: {r}" for r in d["repaired"]]
    out += [f"cannot repair: {u}" for u in d["unrepairable"]]
    c = d["counts"]
    verdict = "clean" if d["clean"] else f"{len(d['problems'])} problems"
    out.append(f"{d['store']}: {count(c.get('inodes', 0))} inodes in all views, {count(c.get('entries', 0))} "
               f"entries, {count(c.get('objects', 0))} objects checked: {verdict}")
    if c.get("remote_chunks"):
        out.append(f"{count(c['remote_chunks'])} chunks are on the remote of a lazy mount (not fetched yet)")
    return out

