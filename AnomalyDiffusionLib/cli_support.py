"""Terminal-side helpers shared by the CLI and the training scripts: progress sinks, argument parsing."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from .errors import InputError


def parse_slice_range(text: str | None) -> tuple[int | None, int | None]:
    """``"60:100"`` → (60, 100); ``":100"`` → (None, 100); ``None`` → (None, None)."""
    if not text:
        return None, None
    parts = text.split(":")
    if len(parts) != 2:
        raise InputError(f"slice range must look like START:STOP, got '{text}'")
    try:
        start = int(parts[0]) if parts[0].strip() else None
        stop = int(parts[1]) if parts[1].strip() else None
    except ValueError:
        raise InputError(f"slice range must be integers START:STOP, got '{text}'") from None
    return start, stop


def add_slice_range_argument(parser: argparse.ArgumentParser) -> None:
    """``--slices START:STOP`` of the training/evaluation scripts; read it with :func:`parse_slice_range`."""
    parser.add_argument(
        "--slices",
        default=None,
        metavar="START:STOP",
        help="axial slices START:STOP only (canonical indices; BMAD uses 60:100 of the 155 BraTS slices, "
        "30:50 is the same 40 mm band of a 2 mm phantom)",
    )


class TqdmProgress:
    """Progress callback drawing one tqdm bar per stage on a terminal. When the stream is not a
    terminal (a log file, a batch job) it prints a plain line each time a stage passes another
    ``plain_step`` of its work instead. Use as a context manager so the last bar is closed."""

    def __init__(self, force: bool = False, stream: TextIO | None = None, plain_step: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        self.enabled = force or self.stream.isatty()
        self.plain_step = plain_step
        self._bar = None
        self._stage: str | None = None
        self._next = 0.0
        self._t0 = time.monotonic()

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if not self.enabled:
            if stage != self._stage:
                self._stage, self._next = stage, 0.0
            if fraction >= self._next or (fraction >= 1.0 and self._next <= 1.0):
                elapsed = time.monotonic() - self._t0
                self.stream.write(f"[{elapsed:7.1f} s] {stage}: {100 * fraction:5.1f}% {message}\n")
                self.stream.flush()
                self._next = (int(fraction / self.plain_step) + 1) * self.plain_step
            return
        from tqdm import tqdm

        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(
                total=1000,
                desc=stage,
                file=self.stream,
                leave=False,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}",
            )
        assert self._bar is not None
        self._bar.n = round(1000 * fraction)
        if message:
            self._bar.set_postfix_str(message, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlProgress:
    """Progress callback printing one JSON object per update: ``{"stage", "fraction", "message",
    "time"}`` — the machine-readable stream the Slicer module parses."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self._t0 = time.monotonic()

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        rec = {
            "stage": stage,
            "fraction": round(float(fraction), 4),
            "message": message,
            "time": round(time.monotonic() - self._t0, 3),
        }
        self.stream.write(json.dumps(rec) + "\n")
        self.stream.flush()

    def __enter__(self) -> JsonlProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
