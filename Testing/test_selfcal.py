"""Per-volume self-calibration (selfcal.py) against hand cases and invariances."""

from __future__ import annotations

import numpy as np
import pytest

from AnomalyDiffusionLib.flair_reference import flair_zscore, threshold_mask
from AnomalyDiffusionLib.selfcal import (
    MIN_SLICES,
    Z_SLICE,
    null_threshold,
    robust_z,
    slice_covariates,
    volume_decision,
    volume_m_max,
)


def test_robust_z_of_a_gaussian_population_is_standard_and_outliers_stand_out():
    rng = np.random.default_rng(0)
    y = rng.normal(5.0, 2.0, 400)
    y[:10] += 20.0  # ten outliers, 10 SD away
    z = robust_z(y)
    assert np.all(z[:10] > 8.0)
    inl = z[10:]
    assert abs(np.median(inl)) < 0.15
    assert 0.85 < np.std(inl) < 1.15  # the MAD scale recovers the SD despite the outliers


def test_robust_z_removes_a_trend_in_the_covariates():
    """A healthy statistic that depends on slice position (quadratically) and brain area gives no
    outlier once the covariates are regressed out; without them, the extreme slices look anomalous."""
    rng = np.random.default_rng(1)
    pos = np.linspace(-60.0, 80.0, 90)
    area = 1.0 - ((pos - 10.0) / 80.0) ** 2
    y = 3.0 * ((pos - 10.0) / 70.0) ** 2 - 2.0 * area + rng.normal(0.0, 0.05, len(pos))
    y[45] += 1.0  # one anomalous slice, 20 noise SD
    x = slice_covariates(area, pos)
    z = robust_z(y, x)
    assert z[45] > 10.0
    rest = np.delete(z, 45)
    assert 0.8 < np.std(rest) < 1.2 and np.abs(rest).max() < 5.0  # N(0, 1)-like: 90 draws
    assert robust_z(y)[45] < Z_SLICE  # without the covariates the anomaly hides in the trend


def test_robust_z_is_invariant_to_affine_changes_of_the_statistic():
    """A scanner that scales and shifts every slice's statistic alike changes nothing."""
    rng = np.random.default_rng(2)
    y = rng.normal(0.0, 1.0, 60)
    y[[5, 6, 7]] += 6.0
    x = slice_covariates(rng.uniform(0.5, 1.0, 60), np.arange(60.0))
    assert np.allclose(robust_z(y, x), robust_z(3.0 * y + 7.0, x), atol=1e-6)


def test_constant_population_gives_zero():
    assert np.all(robust_z(np.full(20, 0.9)) == 0.0)


def _population(k_lesion: tuple[int, ...], n: int = 60, shift: float = 0.0, seed: int = 3):
    rng = np.random.default_rng(seed)
    pos = np.arange(n, dtype=float) * 2.0
    area = 1.0 - ((np.arange(n) - n / 2) / (0.6 * n)) ** 2
    cos = 0.97 + rng.normal(0.0, 0.004, n) - shift
    m = 0.05 * np.exp(rng.normal(0.0, 0.1, (n, 2))) * (1.0 + 3.0 * shift)
    for k in k_lesion:
        cos[k] -= 0.08
        m[k] *= 3.0
    return cos, m, area, pos


def test_volume_decision_flags_the_lesion_slices_whatever_the_bundle_threshold_says():
    """Healthy slices plus K lesion slices: the K are flagged, the rest not, also when a contrast
    shift moves every slice's cosine below the bundle's threshold (the bundle calls all unhealthy)."""
    k = (28, 29, 30, 31, 32)
    for shift in (0.0, 0.1):
        cos, m, area, pos = _population(k, shift=shift)
        bundle = cos <= 0.948
        dec = volume_decision(cos, m, area, pos, bundle)
        assert not dec.fallback
        assert set(np.flatnonzero(dec.unhealthy)) == set(k)
    assert bundle.all()  # with the shift, the fixed threshold calls every slice unhealthy


def test_volume_decision_on_a_healthy_population_flags_nothing():
    cos, m, area, pos = _population(())
    assert not volume_decision(cos, m, area, pos, np.zeros(len(cos), bool)).unhealthy.any()


def test_too_few_slices_fall_back_to_the_bundle_decision():
    cos, m, area, pos = _population((), n=MIN_SLICES - 1)
    bundle = np.arange(len(cos)) % 2 == 0
    dec = volume_decision(cos, m, area, pos, bundle)
    assert dec.fallback and np.array_equal(dec.unhealthy, bundle)


def test_volume_m_max_is_the_largest_unhealthy_m_te_and_never_below_the_bundle():
    m = np.array([[0.1, 0.2], [0.5, 0.1], [0.3, 0.4]])
    assert volume_m_max(m, np.array([True, False, True]), [0.2, 0.3]) == [0.3, 0.4]
    assert volume_m_max(m, np.array([True, False, True]), [0.35, 0.1]) == [0.35, 0.4]
    assert volume_m_max(m, np.zeros(3, bool), [0.2, 0.3]) == [0.2, 0.3]


def test_null_threshold_is_the_quantile_of_healthy_brain_pixels_only():
    maps = np.zeros((3, 4, 4), np.float32)
    maps[0] = np.arange(16).reshape(4, 4)  # healthy
    maps[1] = 100.0  # unhealthy: ignored
    maps[2] = 50.0  # healthy but outside the brain: ignored
    fg = np.ones((3, 4, 4), bool)
    fg[2] = False
    thr = null_threshold(maps, fg, np.array([True, False, True]), quantile=0.5)
    assert thr == pytest.approx(7.5)
    assert null_threshold(maps, fg, np.zeros(3, bool)) is None


def test_flair_reference_finds_a_bright_block_and_ignores_the_rest():
    rng = np.random.default_rng(4)
    flair = rng.normal(100.0, 5.0, (20, 30, 30)).astype(np.float32)
    brain = np.zeros(flair.shape, bool)
    brain[2:18, 3:27, 3:27] = True
    flair[~brain] = 0.0
    flair[8:12, 10:16, 10:16] += 60.0  # 12 robust SD brighter
    z = flair_zscore(flair, brain)
    mask = threshold_mask(z, brain, 2.0)
    truth = np.zeros_like(brain)
    truth[8:12, 10:16, 10:16] = True
    inner = np.zeros_like(brain)
    inner[9:11, 11:15, 11:15] = True
    assert mask[inner].all()
    assert (mask & ~truth).sum() < 0.01 * brain.sum()
    assert np.all(z[~brain] == 0.0)
