"""One batch's work in parts that two threads share, so neither idles while the other has parts left.

Attribution runs two busy threads: the read-ahead thread decodes and searches, the caller runs the
attributor. When the search is the larger share, the caller would wait for each batch while the
read-ahead thread searches alone. With :class:`SharedParts` the read-ahead thread hands a batch
over as soon as it is decoded and then runs its parts from the front; the caller, when it reaches
the batch, runs from the back the parts that nobody has begun, then waits for the rest. Each part
runs at most once, in one of the two threads, and the results come back in the parts' order. An
interrupt in either thread stops the parts that have not begun (:meth:`SharedParts.cancel`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedParts(Generic[T]):
    """Parts of one batch's work, each a callable run once by whichever thread claims it first."""

    def __init__(self, parts: Sequence[Callable[[], T]]) -> None:
        self._parts = list(parts)
        self._results: list[T | None] = [None] * len(self._parts)
        self._errors: list[BaseException | None] = [None] * len(self._parts)
        self._finished = [threading.Event() for _ in self._parts]
        self._front, self._back = 0, len(self._parts)  # parts [front, back) are not begun yet
        self._lock = threading.Lock()

    def _claim(self, from_back: bool) -> int | None:
        with self._lock:
            if self._front >= self._back:
                return None
            if from_back:
                self._back -= 1
                return self._back
            self._front += 1
            return self._front - 1

    def _run(self, part: int) -> None:
        try:
            self._results[part] = self._parts[part]()
        except BaseException as exc:
            self._errors[part] = exc  # raised in the thread that asks for the results
            if not isinstance(exc, Exception):
                raise  # an interrupt goes up at once, in the thread it landed in
        finally:
            self._finished[part].set()

    def cancel(self) -> None:
        """Begin no more parts (the results are no longer wanted; parts running finish). The parts
        never begun end as cancelled, so nothing waits for them."""
        with self._lock:
            never_begun = range(self._front, self._back)
            self._back = self._front
        for part in never_begun:
            self._errors[part] = RuntimeError("cancelled: the results of this batch were no longer wanted")
            self._finished[part].set()

    def run_from_front(self) -> None:
        """Run parts, from the first, until none is left to begin (the thread that made the batch)."""
        while (part := self._claim(from_back=False)) is not None:
            self._run(part)

    def results(self) -> list[T]:
        """Every part's result in order: runs from the back the parts not yet begun, then waits for
        the others. The first part's error (in part order) is raised here; an interrupt at once."""
        try:
            while (part := self._claim(from_back=True)) is not None:
                self._run(part)
            for finished in self._finished:
                finished.wait()
        except BaseException:  # an interrupt: the other thread begins no more of these parts
            self.cancel()
            raise
        for error in self._errors:
            if error is not None:
                raise error
        return list(self._results)
