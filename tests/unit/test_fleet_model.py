"""The pushed prefetch model's object (cowfs/fleet/model.py): one zstd frame of its JSON, named
by its hash, refused whole when damaged."""
import json

import blake3
import pytest
import zstandard

from cowfs.fleet import model
from cowfs.fleet.objects import CorruptObject

FILES = [[f"venv/lib/python3.11/site-packages/pkg{i // 40}/mod{i}.py", (i % 7) + 1] for i in range(2000)]
NEXT = [[i, [[(i + 1) % 2000, 3], [(i + 7) % 2000, 1]]] for i in range(2000)]


def test_a_model_is_stored_compressed_and_decodes_to_what_was_encoded():
    mid, data = model.encode_model(FILES, NEXT)
    plain = json.dumps({"v": 1, "files": FILES, "next": NEXT}, separators=(",", ":")).encode()
    assert mid == blake3.blake3(data).hexdigest()
    assert len(data) * 5 < len(plain), (len(data), len(plain))
    doc = model.decode_model(mid, data)
    assert doc["files"] == FILES and doc["next"] == NEXT


def test_a_plain_json_model_still_reads():
    plain = json.dumps({"v": 1, "files": FILES[:3], "next": [[0, [[1, 2]]]]}).encode()
    assert model.decode_model(blake3.blake3(plain).hexdigest(), plain)["files"] == FILES[:3]


def test_a_damaged_or_oversized_frame_is_a_corrupt_object(monkeypatch):
    _mid, data = model.encode_model(FILES, NEXT)
    bad = data[:len(data) // 2]
    with pytest.raises(CorruptObject, match="model/"):
        model.decode_model(blake3.blake3(bad).hexdigest(), bad)
    monkeypatch.setattr(model, "MODEL_MAX", 1000)
    with pytest.raises(CorruptObject, match="model/"):
        model.decode_model(_mid, data)
    wrong = zstandard.ZstdCompressor().compress(b'{"v": 1, "files": [["a", -1]], "next": []}')
    with pytest.raises(CorruptObject, match="chunk bitmask"):
        model.decode_model(blake3.blake3(wrong).hexdigest(), wrong)
