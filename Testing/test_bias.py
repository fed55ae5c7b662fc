"""N4 bias-field correction (bias.py) against a known multiplicative field."""

from __future__ import annotations

import numpy as np
import pytest

from AnomalyDiffusionLib.bias import correct, n4_field


def _head(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two tissues in an ellipsoid, 2 mm voxels, a little noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices((40, 56, 48), float)
    mask = ((z - 20) / 18) ** 2 + ((y - 28) / 25) ** 2 + ((x - 24) / 21) ** 2 < 1
    tissue = np.where(((y - 28) / 14) ** 2 + ((x - 24) / 11) ** 2 < 1, 400.0, 650.0)
    img = np.where(mask, tissue * (1 + rng.normal(0, 0.02, mask.shape)), 0.0)
    return img.astype(np.float32), mask


def _field(shape) -> np.ndarray:
    """A smooth ±20 % gain: linear ramp across x plus a bump, about 60 mm wide."""
    z, y, x = np.indices(shape, float)
    ramp = (x - shape[2] / 2) / shape[2]
    bump = np.exp(-(((z - 14) ** 2 + (y - 20) ** 2) / (2 * 12.0**2)))
    f = 1 + 0.3 * ramp + 0.1 * bump
    return (f / f.mean()).astype(np.float32)


def test_n4_removes_most_of_a_smooth_gain_field():
    img, mask = _head()
    gain = _field(img.shape)
    spacing = (2.0, 2.0, 2.0)
    fixed, info = correct(img * gain, mask, spacing)
    clean, _ = correct(img, mask, spacing)
    before = (img * gain)[mask] / img[mask]
    after = fixed[mask] / clean[mask]
    cv = lambda r: float(np.std(r) / np.mean(r))  # noqa: E731
    assert cv(before) > 0.05
    assert cv(after) < cv(before) / 3
    g = gain[mask] / np.median(gain[mask])
    np.testing.assert_allclose(info["field_p5_p95"], np.percentile(g, [5, 95]), atol=0.03)  # the gain put in


def test_a_clean_image_is_left_nearly_alone_and_an_empty_mask_is_a_no_op():
    img, mask = _head(1)
    field = n4_field(img, mask, (2.0, 2.0, 2.0))
    inside = field[mask] / np.median(field[mask])
    assert np.percentile(np.abs(inside - 1), 95) < 0.05
    np.testing.assert_array_equal(n4_field(img, np.zeros_like(mask), (2.0, 2.0, 2.0)), np.ones_like(img))


def test_a_fourth_fitting_level_follows_a_field_that_changes_within_a_few_centimetres():
    """A ±15 % gain with a 40 mm period: 3 levels end on a 4-span mesh (about 2.4 cm per span here,
    too coarse for a 2 cm half-period) and leave it; the 8-span mesh of 4 levels removes most of it."""
    img, mask = _head()
    z, y, x = np.indices(img.shape, float)
    period = 20.0  # voxels of 2 mm
    gain = 1 + 0.15 * np.sin(2 * np.pi * x / period) * np.sin(2 * np.pi * y / period) * np.cos(2 * np.pi * z / period)
    gain = (gain / gain.mean()).astype(np.float32)
    spacing = (2.0, 2.0, 2.0)
    cv = lambda r: float(np.std(r) / np.mean(r))  # noqa: E731
    residual = {}
    for levels in (3, 4):
        fixed, _ = correct(img * gain, mask, spacing, levels)
        clean, _ = correct(img, mask, spacing, levels)
        residual[levels] = cv(fixed[mask] / clean[mask])
    before = cv(gain[mask])
    assert residual[3] > 0.8 * before
    assert residual[4] < before / 3


def test_four_levels_leave_a_clean_image_nearly_alone_and_levels_are_checked():
    img, mask = _head(1)
    field = n4_field(img, mask, (2.0, 2.0, 2.0), levels=4)
    inside = field[mask] / np.median(field[mask])
    assert np.percentile(np.abs(inside - 1), 95) < 0.05
    with pytest.raises(ValueError, match="levels"):
        n4_field(img, mask, (2.0, 2.0, 2.0), levels=0)
