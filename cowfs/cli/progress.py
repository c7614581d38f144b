"""Progress of long CLI commands (import, export, fsck, gc, dedup --wait, clone): a tqdm bar
on stderr when stderr is a terminal, nothing in scripts or with --json.

Every helper here yields a callable that the work calls with what it did; with the bar off
it is a no-op, so the work never needs to know whether anyone watches.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Callable, Iterator

Update = Callable[[int], None]


def shown(quiet: bool = False) -> bool:
    """Whether progress is drawn: stderr is a terminal and the output is not for a program."""
    return not quiet and sys.stderr.isatty()


def _width() -> dict[str, Any]:
    """tqdm's size: the terminal's, or 80x24 for one that reports none (a bare pty; tqdm
    draws nothing on a terminal of 0 rows)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        size = os.terminal_size((0, 0))
    return {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else {"ncols": 80, "nrows": 24}


@contextlib.contextmanager
def bar(label: str, total: int | None, unit: str = "B", quiet: bool = False) -> Iterator[Update]:
    """A bar for work of known size (total in `unit`s), or a counter when total is None."""
    if not shown(quiet):
        yield lambda n: None
        return
    from tqdm import tqdm

    binary = unit == "B"
    with tqdm(total=total, desc=label, unit=unit, unit_scale=True, unit_divisor=1024 if binary else 1000,
              file=sys.stderr, mininterval=0.2, leave=True, **_width()) as t:
        lock = threading.Lock()  # copier threads report concurrently

        def update(n: int) -> None:
            with lock:
                t.update(n)

        yield update
        if total is not None and t.n != total:  # the total was an estimate: the work is done
            if t.n < total:
                t.update(total - t.n)
            else:
                t.total = t.n
                t.refresh()


@contextlib.contextmanager
def stages(label: str, quiet: bool = False) -> Iterator[Callable[[str, int, int | None], None]]:
    """For work that reports (stage, done, total|None) as it goes: the bar follows the
    current stage and restarts when the stage changes."""
    if not shown(quiet):
        yield lambda stage, done, total: None
        return
    from tqdm import tqdm

    state: dict[str, Any] = {"stage": None, "bar": None}

    def report(stage: str, done: int, total: int | None) -> None:
        t = state["bar"]
        if stage != state["stage"]:
            if t is not None:
                t.close()
            t = state["bar"] = tqdm(total=total, desc=f"{label}: {stage}", unit="", file=sys.stderr,
                                    mininterval=0.2, leave=False, **_width())
            state["stage"] = stage
        if total is not None and t.total != total:
            t.total = total
        t.update(done - t.n)

    try:
        yield report
    finally:
        if state["bar"] is not None:
            state["bar"].close()


@contextlib.contextmanager
def waiting(label: str, quiet: bool = False, delay: float = 1.0) -> Iterator[None]:
    """An elapsed-time line for one call whose progress nobody can see (a control-file
    command, the daemon's answer): drawn after `delay` seconds, ticking until it returns."""
    if not shown(quiet):
        yield
        return
    from tqdm import tqdm

    done = threading.Event()
    t = tqdm(total=None, desc=label, bar_format="{desc}: {elapsed}", file=sys.stderr, delay=delay, leave=False,
             **_width())

    def tick() -> None:
        if done.wait(delay):
            return
        while True:
            t.refresh()
            if done.wait(0.5):
                return

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        t.close()
