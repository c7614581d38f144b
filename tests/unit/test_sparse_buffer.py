"""core.node.Sparse against a model: random writes and cuts over a stored chunk, compared
with the same applied to a copy of the chunk (merge, length, covered, written ranges)."""
from __future__ import annotations

import random

from cowfs.core.node import Sparse

CHUNK = 64 << 10


def test_sparse_matches_writes_applied_to_the_stored_chunk():
    rnd = random.Random(35)
    for _ in range(300):
        stored = rnd.randbytes(rnd.choice([1, 100, 4096, CHUNK - 1, CHUNK]))
        s = Sparse(b"h", len(stored))
        model = bytearray(stored)
        written = bytearray(CHUNK)  # 1 where a write put a byte
        for _ in range(rnd.randrange(1, 12)):
            if rnd.random() < 0.1 and len(model) > 1:
                n = rnd.randrange(len(model))
                s.trim(n)
                del model[n:]
                written[n:] = bytes(CHUNK - n)
                continue
            co = rnd.choice([rnd.randrange(CHUNK), rnd.randrange(CHUNK // 4096) * 4096])
            n = min(rnd.choice([1, 7, 4096, 5000, 8192]), CHUNK - co)
            piece = rnd.randbytes(n)
            s.put(co, memoryview(piece))
            if len(model) < co:
                model.extend(bytes(co - len(model)))
            model[co : co + n] = piece
            written[co : co + n] = b"\1" * n
        assert len(s) == len(model)
        assert s.merge(stored) == model
        if s.whole():
            assert s.data == model
        spans = list(s.written(0, CHUNK))
        assert all(e1 < s2 for (_s1, e1), (s2, _e2) in zip(spans, spans[1:]))  # disjoint, apart
        mark = bytearray(len(model))
        for a, e in spans:
            mark[a:e] = b"\1" * (e - a)
        assert mark == written[: len(model)]
        for _ in range(10):
            a = rnd.randrange(CHUNK)
            b = rnd.randrange(a + 1, CHUNK + 1)
            clip = min(b, len(model))
            assert s.covered(a, b) == all(written[a:clip])  # nothing to read past its end: covered
