"""cowfs.background.cloning.Pace: the clone measurer's walk sleeps between slices so that it
takes at most QUIET_SHARE of wall time on a quiet mount and BUSY_SHARE while requests come
(its Python holds the GIL, which request handlers would otherwise wait for)."""
from __future__ import annotations

import pytest

from cowfs.background import cloning, quiet


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(cloning.time, "monotonic", c.monotonic)
    monkeypatch.setattr(cloning.time, "sleep", c.sleep)
    return c


def test_a_walk_sleeps_for_its_share_quiet_and_busy(clock):
    requests = [0]
    pace = cloning.Pace(lambda: requests[0])
    clock.now += 0.002  # a slice of the walk: 2 ms
    pace()
    q = cloning.QUIET_SHARE
    assert clock.slept[-1] == pytest.approx(0.002 * (1 - q) / q)  # quiet: no request yet
    requests[0] += 3  # requests arrive: the next slices leave them the GIL
    clock.now += 0.002
    pace()
    b = quiet.BUSY_SHARE
    assert clock.slept[-1] == pytest.approx(0.002 * (1 - b) / b)
    # still busy within QUIET_AFTER of the last request, quiet again after it
    clock.now += 0.002
    pace()
    assert clock.slept[-1] == pytest.approx(0.002 * (1 - b) / b)
    clock.now += quiet.QUIET_AFTER  # a slice that long: no request meanwhile
    pace()
    assert clock.slept[-1] == pytest.approx(quiet.QUIET_AFTER * (1 - q) / q)


def test_over_many_slices_the_walk_takes_its_share_of_wall_time(clock):
    pace = cloning.Pace(lambda: 0)
    start, walked = clock.now, 0.0
    for _ in range(1000):
        clock.now += 0.001
        walked += 0.001
        pace()
    assert walked / (clock.now - start) == pytest.approx(cloning.QUIET_SHARE)


def test_a_worker_made_at_mount_waits_for_a_quiet_moment_first(monkeypatch):
    """The dedup worker's Quiet counts the mount as a request (`mark`): its first batch does
    not run beside the first requests of the clients that start with the mount."""
    c = Clock()
    monkeypatch.setattr(quiet.time, "monotonic", c.monotonic)
    requests = [0]
    at_mount = quiet.Quiet(lambda: requests[0])
    at_mount.mark()
    other = quiet.Quiet(lambda: requests[0])
    assert not at_mount() and other()
    c.now += quiet.QUIET_AFTER / 2
    requests[0] += 1
    assert not at_mount() and not other()
    c.now += quiet.QUIET_AFTER
    assert at_mount() and other()
