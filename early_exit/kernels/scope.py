"""`ThreadScope`: a `with` block that changes how a model computes for the threads inside it only; `entered_together`
to enter several."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from types import TracebackType
from typing import Self


class ThreadScope:
    """Base of the kernels' `with` blocks. The first entry over all threads calls `_open` and the last exit
    `_close` (exceptions included); `active` tells whether the current thread is inside a block, so that what
    `_open` installs can behave as before for every other thread. Blocks nest and may be entered from several
    threads at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread = threading.local()
        self._depth = 0  # blocks open over all threads

    @property
    def active(self) -> bool:
        """Whether the current thread is inside a block of this object."""
        return getattr(self._thread, "depth", 0) > 0

    def __enter__(self) -> Self:
        with self._lock:
            if self._depth == 0:
                self._open()
            self._depth += 1
        self._thread.depth = getattr(self._thread, "depth", 0) + 1
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._thread.depth -= 1
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                self._close()

    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError


@contextmanager
def entered_together(*scopes: AbstractContextManager) -> Iterator[None]:
    """One `with` block over several, entered in order and left in reverse."""
    with ExitStack() as stack:
        for scope in scopes:
            stack.enter_context(scope)
        yield
