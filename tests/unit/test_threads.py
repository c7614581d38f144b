"""cowfs.threads.run_in_c_thread, the light hand-off every fsync's WAL sync goes through: it
returns fn's value, raises its exception, runs it off the trio thread, and is not
cancellable (a sync the caller stopped waiting for could not report what it made durable)."""
from __future__ import annotations

import threading
import time

import pytest
import trio

from cowfs import threads


def test_returns_the_value_from_another_thread():
    async def main():
        return await threads.run_in_c_thread(lambda a, b: (a + b, threading.get_ident()), 2, 3)
    value, ident = trio.run(main)
    assert value == 5
    assert ident != threading.get_ident()


def test_raises_what_fn_raises():
    def boom():
        raise OSError(5, "sync failed")

    async def main():
        await threads.run_in_c_thread(boom)
    with pytest.raises(OSError, match="sync failed"):
        trio.run(main)


def test_a_cancelled_caller_still_waits_for_fn():
    done = []

    def slow():
        time.sleep(0.2)
        done.append(True)

    async def main():
        with trio.move_on_after(0.01) as scope:
            await threads.run_in_c_thread(slow)
        return scope.cancelled_caught
    t0 = time.monotonic()
    trio.run(main)
    assert done == [True]
    assert time.monotonic() - t0 >= 0.2
