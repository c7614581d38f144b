"""The lock by which the tests of a pytest-xdist run share the machine (mounting.MachineTurns,
taken in tests/conftest.py): tests marked ``exclusive`` run alone, the others together, and an
exclusive test waiting for its turn is not starved by the shared turns that keep coming (with
2 workers, the other worker's next test would otherwise start before it, again and again)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mounting import MachineTurns


class Taker(threading.Thread):
    """Takes a turn on its own open files (as another worker process would), records when it
    got it, and holds it until released."""

    def __init__(self, directory: Path, name: str, exclusive: bool, order: list[str]) -> None:
        super().__init__(name=name, daemon=True)
        self.turns = MachineTurns(directory)
        self.exclusive = exclusive
        self.order = order
        self.entered = threading.Event()
        self.release = threading.Event()

    def run(self) -> None:
        with self.turns.turn(self.exclusive):
            self.order.append(self.name)
            self.entered.set()
            self.release.wait(30)


@pytest.mark.timeout(60)
def test_an_exclusive_turn_waits_for_the_shared_ones_and_goes_before_later_ones(tmp_path):
    order: list[str] = []
    first = Taker(tmp_path, "shared-1", False, order)
    first.start()
    assert first.entered.wait(10)
    also = Taker(tmp_path, "shared-2", False, order)   # shared turns run together
    also.start()
    assert also.entered.wait(10)
    alone = Taker(tmp_path, "exclusive", True, order)
    alone.start()
    time.sleep(0.5)                                     # it now waits for the room
    later = Taker(tmp_path, "shared-3", False, order)
    later.start()
    time.sleep(0.5)
    assert order == ["shared-1", "shared-2"], "an exclusive turn began while shared ones ran, " \
        "or a shared turn asked for after it went first"
    first.release.set()
    first.join(10)
    time.sleep(0.3)
    assert order == ["shared-1", "shared-2"], "the exclusive turn began before every shared one ended"
    also.release.set()
    assert alone.entered.wait(10)
    time.sleep(0.3)
    assert order == ["shared-1", "shared-2", "exclusive"], "a shared turn ran with the exclusive one"
    alone.release.set()
    assert later.entered.wait(10)
    later.release.set()
    for t in (also, alone, later):
        t.join(10)
    assert order == ["shared-1", "shared-2", "exclusive", "shared-3"]
