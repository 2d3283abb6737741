"""A readers–writer lock: any number of readers at once, a writer alone. Writers go first once
waiting (a steady stream of searches cannot starve an ``add``)."""
from __future__ import annotations

import contextlib
import threading


class ReadWriteLock:
    """``with lock.reading():`` shares the lock with other readers; ``with lock.writing():`` waits
    until no reader or writer holds it and keeps new readers out meanwhile. Not reentrant."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._reading = _Reading(self)

    def reading(self) -> "_Reading":
        return self._reading  # a plain context manager, not a generator: a search takes it per call

    def _acquire_read(self) -> None:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def _release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class _Reading:
    """``with lock.reading():`` (reusable: it holds no state of its own)."""

    def __init__(self, lock: ReadWriteLock):
        self._lock = lock

    def __enter__(self) -> None:
        self._lock._acquire_read()

    def __exit__(self, *exc) -> None:
        self._lock._release_read()
