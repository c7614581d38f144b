"""What the remote engines (S3 object storage, etcd) share: their optional client packages,
the bounded retry policy, and the one error an unreachable engine ends in.

The embedded store needs none of this: the client packages are the optional extra
`cowfs[remote]` and are imported only when a remote backend is opened (`optional`), which
says how to install them when they are missing.
"""
from __future__ import annotations

import importlib
import random
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")


class MissingDependency(ImportError):
    """A remote backend was asked for but its client package is not installed."""


class EngineUnavailable(Exception):
    """The engine could not be reached, or kept failing, through every attempt of the retry
    policy.  The message is one line: engine, endpoint, attempts, time spent, last cause."""


class OutcomeUnknown(EngineUnavailable):
    """A write reached the engine but its reply did not come back: it may or may not have
    been applied (retrying it blindly could apply it twice or report a false conflict).
    The caller reads the state again and decides."""


def optional(module: str, purpose: str) -> ModuleType:
    """Import a client package of the `remote` extra, or say how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(
            f"{purpose} needs the Python package {module.split('.')[0]!r}, which is not "
            f"installed ({e}): pip install 'cowfs[remote]'") from e


@dataclass(frozen=True)
class Retry:
    """Exponential back-off with jitter, bounded in attempts: the worst case an operation
    can wait on a dead engine is known (`worst_case` seconds of sleep plus the client
    timeouts of each attempt).  Defaults: 5 attempts, sleeps of about 0.2, 0.4, 0.8, 1.6 s."""

    attempts: int = 5
    first_delay: float = 0.2
    max_delay: float = 2.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.first_delay < 0 or self.max_delay < self.first_delay:
            raise ValueError(f"bad retry policy {self}")

    def delays(self) -> Iterator[float]:
        """The sleeps between attempts (attempts - 1 of them), each 50-100 % of its step so
        that clients that failed together do not retry in step."""
        step = self.first_delay
        for _ in range(self.attempts - 1):
            yield step * random.uniform(0.5, 1.0)
            step = min(step * 2, self.max_delay)

    @property
    def worst_case(self) -> float:
        """The longest total sleep of one operation."""
        total, step = 0.0, self.first_delay
        for _ in range(self.attempts - 1):
            total += step
            step = min(step * 2, self.max_delay)
        return total

    def run(self, fn: Callable[[], T], transient: Callable[[BaseException], bool],
            what: str) -> T:
        """fn(), again after a sleep while it fails with an error `transient` accepts; a
        transient error on the last attempt becomes EngineUnavailable (what: the engine and
        endpoint, for the message).  Other errors propagate at once."""
        start = time.monotonic()
        delays = self.delays()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as e:
                if not transient(e):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise EngineUnavailable(
                        f"{what}: unavailable after {attempt} attempts in "
                        f"{time.monotonic() - start:.1f} s: {one_line(e)}") from e
                time.sleep(delay)


def one_line(e: BaseException) -> str:
    """An exception as one short line (client libraries nest long multi-line reprs)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
