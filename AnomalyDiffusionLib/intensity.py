"""Intensity standardisation of a case to its bundle's training data (beyond both papers).

Both papers scale each volume by one number, the 99th percentile of its brain voxels (AnoFPDM
appendix B), so everything below that percentile keeps the shape of the scanner's intensity curve.
A different sequence, gamma or coil moves tissue relative to that anchor, and the model, trained on
one family of curves, sees contrast it never saw: on a phantom passed through a gamma of 0.8 the
64² AnoFPDM map of bundle 3.2 no longer found its lesion at all (issue 15).

The landmark standardisation of Nyúl & Udupa (Magn. Reson. Med. 42, 1999) undoes such monotone
changes: a case's brain-intensity percentiles (landmarks) are mapped piecewise linearly onto the
same percentiles of the training data. Here the map is anchored where the paper's scaling is:
0 → 0 and the 99th percentile → 1, so it reduces to the paper's scaling when a case's landmarks
equal the reference. The landmarks are the 10th … 75th percentiles only: a lesion rarely fills a
quarter of the brain, so they describe healthy tissue, and a bright lesion keeps its excess over it
(Nyúl's upper deciles would pull a large lesion down onto the brightest healthy tissue).

Pure functions of arrays; the reference lives in a bundle's manifest (``intensity_reference``),
made by ``training/intensity_reference.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InputError

#: brain-intensity percentiles matched to the reference (healthy tissue: see the module docstring)
LANDMARK_PERCENTILES: tuple[float, ...] = (10.0, 25.0, 50.0, 75.0)
#: the percentile the paper's scaling divides by; landmarks are expressed as fractions of it
SCALE_PERCENTILE = 99.0


@dataclass(frozen=True)
class IntensityReference:
    """The training data's landmarks: ``values[modality]`` at ``percentiles`` of the brain voxels, as
    fractions of the ``scale_percentile`` (each strictly increasing, within (0, 1))."""

    percentiles: tuple[float, ...]
    values: Mapping[str, tuple[float, ...]]
    scale_percentile: float = SCALE_PERCENTILE

    def __post_init__(self) -> None:
        if not self.percentiles or not all(0 < p < self.scale_percentile for p in self.percentiles):
            raise ValueError(f"landmark percentiles must lie in (0, {self.scale_percentile}): {self.percentiles}")
        if np.any(np.diff(self.percentiles) <= 0):
            raise ValueError(f"landmark percentiles must increase: {self.percentiles}")
        for m, v in self.values.items():
            xs = np.concatenate([[0.0], np.asarray(v, float), [1.0]])
            if len(v) != len(self.percentiles) or np.any(np.diff(xs) <= 0):
                n = len(self.percentiles)
                raise ValueError(f"reference landmarks of {m} must be {n} increasing values in (0, 1)")

    @classmethod
    def from_manifest(cls, block: Mapping) -> IntensityReference:
        """From a manifest's ``intensity_reference`` block."""
        return cls(
            percentiles=tuple(float(p) for p in block["percentiles"]),
            values={m: tuple(float(x) for x in v) for m, v in block["modalities"].items()},
            scale_percentile=float(block.get("scale_percentile", SCALE_PERCENTILE)),
        )

    def as_manifest(self, data: str) -> dict:
        """The manifest block; ``data`` says what the landmarks were measured on."""
        return {
            "percentiles": list(self.percentiles),
            "scale_percentile": self.scale_percentile,
            "modalities": {m: [round(float(x), 6) for x in v] for m, v in self.values.items()},
            "data": data,
        }


def percentile_scale(array: np.ndarray, mask: np.ndarray, percentile: float = SCALE_PERCENTILE) -> np.ndarray:
    """AnoFPDM appendix B's scaling, before clipping: ``(x − m) / (q − m)`` with ``q`` the ``percentile``
    of the ``mask`` voxels and ``m = min(0, their minimum)`` (0 for ordinary MR magnitudes). float32,
    same shape as ``array``; raises :class:`InputError` for an empty mask or a flat brain."""
    fg = np.asarray(array)[np.asarray(mask, bool)]
    if fg.size == 0:
        raise InputError("cannot normalise: the foreground mask is empty")
    m = min(0.0, float(fg.min()))
    q = float(np.percentile(fg, percentile))
    if q <= m:
        raise InputError(
            f"cannot normalise: the {percentile:g}th percentile of the foreground is not above its minimum"
        )
    return ((np.asarray(array, np.float32) - m) / (q - m)).astype(np.float32)


def landmarks(
    array: np.ndarray,
    mask: np.ndarray,
    percentiles: Sequence[float] = LANDMARK_PERCENTILES,
    scale_percentile: float = SCALE_PERCENTILE,
) -> np.ndarray:
    """The brain voxels' intensity at ``percentiles`` on the paper's scale (:func:`percentile_scale`,
    so the ``scale_percentile`` is 1). [P]."""
    scaled = percentile_scale(array, mask, scale_percentile)
    return np.percentile(scaled[np.asarray(mask, bool)].astype(np.float64), list(percentiles))


def standardise(scaled: np.ndarray, case_marks: Sequence[float], reference: Sequence[float]) -> np.ndarray:
    """Map intensities already divided by the scale percentile (``scaled``, any shape) piecewise
    linearly so that 0 → 0, each of the case's landmarks → the reference's, and 1 → 1; values above
    1 stay as they are (the caller saturates them). Raises :class:`InputError` when the case's
    landmarks do not increase strictly within (0, 1) (e.g. a binary or heavily quantised image)."""
    xs = np.concatenate([[0.0], np.asarray(case_marks, float), [1.0]])
    ys = np.concatenate([[0.0], np.asarray(reference, float), [1.0]])
    if xs.shape != ys.shape:
        raise ValueError(f"{len(case_marks)} case landmarks against {len(reference)} reference values")
    if np.any(np.diff(xs) <= 0):
        raise InputError(
            "cannot standardise intensities: the brain's intensity percentiles do not increase "
            f"({', '.join(f'{v:.3f}' for v in xs[1:-1])} of the 99th); use --intensity percentile"
        )
    v = np.asarray(scaled)
    out = np.interp(v, xs, ys)
    return np.where(v > 1.0, v, out).astype(np.result_type(v.dtype, np.float32), copy=False)
