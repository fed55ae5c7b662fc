"""Progress reporting and cooperative cancellation shared by the library, CLI and Slicer module.

Long-running functions take ``progress: ProgressCallback | None`` and ``cancel: CancelToken | None``.
The callback receives ``(stage, fraction, message)`` with ``fraction`` in [0, 1] for that stage; the
CLI turns it into a progress bar or JSON lines, Slicer into its progress bar. Functions call
``cancel.check()`` between units of work, which raises :class:`~AnomalyDiffusionLib.errors.Cancelled`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from .errors import Cancelled

ProgressCallback = Callable[[str, float, str], None]
T = TypeVar("T")


class CancelToken:
    """Thread-safe flag: one side calls :meth:`cancel`, the worker calls :meth:`check`."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancellation was requested."""
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def report(progress: ProgressCallback | None, stage: str, fraction: float, message: str = "") -> None:
    """Call ``progress`` if given, clamping ``fraction`` to [0, 1]."""
    if progress is not None:
        progress(stage, min(max(float(fraction), 0.0), 1.0), message)


def tracked(
    items: Iterable[T],
    total: int,
    stage: str,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    message: str = "",
) -> Iterator[T]:
    """Yield ``items``, checking ``cancel`` before each and reporting the fraction done after each."""
    report(progress, stage, 0.0, message)
    for i, item in enumerate(items):
        if cancel is not None:
            cancel.check()
        yield item
        report(progress, stage, (i + 1) / max(total, 1), message)
