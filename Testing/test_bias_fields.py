"""benchmarks/bias_fields.py: the fields it applies (the benchmark itself runs detect: see its README)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bias_fields


def _images() -> dict[str, sitk.Image]:
    rng = np.random.default_rng(0)
    out = {}
    for m in ("flair", "t2"):
        img = sitk.GetImageFromArray(rng.uniform(10.0, 100.0, (4, 5, 6)).astype(np.float32))
        img.SetSpacing((0.9, 0.9, 3.0))
        img.SetOrigin((-10.0, 5.0, 2.0))
        img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0))
        out[m] = img
    return out


def test_a_field_multiplies_flair_and_t2_voxel_by_voxel_and_keeps_the_geometry():
    images = _images()
    field = np.linspace(0.8, 1.2, 4 * 5 * 6).reshape(4, 5, 6)
    out = bias_fields.biased(images, field)
    for m in ("flair", "t2"):
        expected = sitk.GetArrayFromImage(images[m]) * field
        assert np.allclose(sitk.GetArrayFromImage(out[m]), expected, rtol=1e-6)
        assert out[m].GetSpacing() == images[m].GetSpacing()
        assert out[m].GetOrigin() == images[m].GetOrigin()
        assert out[m].GetDirection() == images[m].GetDirection()


def test_no_field_leaves_the_images_as_they_are():
    images = _images()
    out = bias_fields.biased(images, None)
    for m in ("flair", "t2"):
        assert np.array_equal(sitk.GetArrayFromImage(out[m]), sitk.GetArrayFromImage(images[m]))


def _head_with_lesion(corner: int) -> tuple[np.ndarray, np.ndarray]:
    """A head of FLAIR 100 (air 0 around it) with a 4-voxel cube of 130 starting at ``corner``."""
    flair = np.zeros((20, 20, 20), np.float32)
    flair[2:18, 2:18, 2:18] = 100.0
    lesion = np.zeros(flair.shape, bool)
    lesion[corner : corner + 4, corner : corner + 4, corner : corner + 4] = True
    flair[lesion] = 130.0
    return flair, lesion


def test_lesion_contrast_is_the_ratio_of_lesion_to_surrounding_medians():
    """A cube of 130 in a head of 100 (background 0 outside): contrast 1.3, whatever the ring width."""
    flair, lesion = _head_with_lesion(8)
    assert bias_fields.lesion_contrast(flair, lesion, 2.0) == pytest.approx(1.3)
    assert bias_fields.lesion_contrast(flair, lesion, 1.0, ring_mm=3.0) == pytest.approx(1.3)


def test_lesion_contrast_leaves_the_air_out_of_the_ring():
    """A lesion at the edge of the head: its ring reaches the air (0), which must not count."""
    flair, lesion = _head_with_lesion(2)
    assert bias_fields.lesion_contrast(flair, lesion, 1.0, ring_mm=4.0) == pytest.approx(1.3)
