"""The remote gc's repack plan and the forwards object (cowfs/fleet/repack.py, objects.py): which
packs are repacked, and a forwards object that does not hash to its name or is not a map of
pack ids is refused.  The repack itself runs on real engines: tests/test_fleet_repack.py."""
from __future__ import annotations

import blake3
import pytest

from cowfs.fleet.objects import CorruptObject, Loc, decode_forwards, encode_forwards
from cowfs.fleet.repack import REPACK_MIN_DEAD, plan


def _pack(name: str, sizes: list[int]) -> dict[bytes, Loc]:
    out, off = {}, 0
    for i, n in enumerate(sizes):
        out[blake3.blake3(f"{name}{i}".encode()).digest()] = Loc(name, b"c", b"R", off, n, n)
        off += n
    return out


def test_plan_repacks_packs_under_the_share_that_free_enough_and_uncovered_forwarded_ones():
    mib = 1 << 20
    packs = {"a" * 64: _pack("a", [mib] * 4),      # 1 of 4 live: repacked
             "b" * 64: _pack("b", [mib] * 4),      # 2 of 4 live: at the share, kept
             "c" * 64: _pack("c", [1000] * 4),     # 1 of 4 live but frees < REPACK_MIN_DEAD: kept
             "d" * 64: _pack("d", [mib] * 4)}      # forwarded, one live blob its forward lacks
    sizes = {p: sum(loc.length for loc in blobs.values()) for p, blobs in packs.items()}
    live = {p: list(blobs)[:n] for (p, blobs), n in zip(packs.items(), (1, 2, 1, 3))}
    uncovered = {"d" * 64: [list(packs["d" * 64])[2]]}
    p = plan(packs, live, sizes, uncovered, 0.5)
    assert sorted(p.copy) == ["a" * 64, "d" * 64]
    assert [h for h, _loc in p.copy["a" * 64]] == live["a" * 64]
    assert [h for h, _loc in p.copy["d" * 64]] == uncovered["d" * 64]
    assert p.live_bytes == 2 * mib and p.old_bytes == 8 * mib
    assert sizes["c" * 64] - 1000 < REPACK_MIN_DEAD
    assert plan(packs, live, sizes, {}, 0.75).copy.keys() == {"a" * 64, "b" * 64}
    assert not plan(packs, live, sizes, {}, 0.0).copy


def test_forwards_round_trip_and_refuse_damage():
    moved = {"a" * 64: ["c" * 64, "b" * 64]}
    fid, data = encode_forwards(moved)
    assert decode_forwards(fid, data) == {"a" * 64: ["b" * 64, "c" * 64]}
    assert encode_forwards({"a" * 64: ["b" * 64, "c" * 64]})[0] == fid      # the same map, the same id
    with pytest.raises(CorruptObject, match="does not hash to its name"):
        decode_forwards(fid, data + b" ")
    for bad in (b'{"v":1,"moved":{"xy":["' + b"b" * 64 + b'"]}}', b'{"v":1,"moved":{"' + b"a" * 64 + b'":[]}}',
                b'{"v":2,"moved":{}}', b"[]"):
        with pytest.raises(CorruptObject, match="forwards/"):
            decode_forwards(blake3.blake3(bad).hexdigest(), bad)
