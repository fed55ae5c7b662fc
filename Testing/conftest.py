"""Shared helpers for the test suite."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

os.environ.setdefault("MPLBACKEND", "Agg")

REAL_CASE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "TCGA-DU-7294"


def image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    """A SimpleITK image from a ``[z, y, x]`` array with the given geometry."""
    img = sitk.GetImageFromArray(np.asarray(array))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(v) for v in np.asarray(direction).ravel()))
    return img


def head(shape=(20, 30, 40), seed=0) -> np.ndarray:
    """An asymmetric 'head': ellipsoid of texture on a zero background, so orientation errors show."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=float)
    c = (np.array(shape) - 1) / 2
    r = (
        ((z - c[0]) / (0.45 * shape[0])) ** 2
        + ((y - c[1]) / (0.42 * shape[1])) ** 2
        + ((x - c[2]) / (0.4 * shape[2])) ** 2
    )
    vol = (100 + 50 * rng.random(shape) + 3 * x + 2 * y + z) * (r < 1)
    return vol.astype(np.float32)


@pytest.fixture
def real_case() -> Path:
    if not (REAL_CASE / "TCGA-DU-7294_fla.nii.gz").is_file():
        pytest.skip("real case ../shared/data/TCGA-DU-7294 not available")
    return REAL_CASE
