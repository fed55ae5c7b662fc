"""Exceptions with messages meant for the person who supplied the input.

Every user-facing failure raises an ``AnomalyDiffusionError`` subclass whose message names the problem
and the file in one sentence; the CLI prints that sentence and exits non-zero.
"""


class AnomalyDiffusionError(Exception):
    """Base class of all errors this library raises on purpose."""


class InputError(AnomalyDiffusionError, ValueError):
    """An input file or array is missing, unreadable or unsuitable (wrong dimension, NaN, empty, ...)."""


class GeometryError(InputError):
    """Volumes that should describe the same anatomy do not overlap, or a geometry cannot be honoured."""


class Cancelled(AnomalyDiffusionError):
    """Raised inside long work when the caller asked to stop (cooperative cancellation)."""
