"""Per-volume self-calibration (selfcal.py) against hand cases and invariances."""

from __future__ import annotations

import numpy as np
import pytest

from AnomalyDiffusionLib.flair_reference import flair_zscore, threshold_mask
from AnomalyDiffusionLib.selfcal import (
    DEFAULT_Z,
    local_standardise,
    pixel_level,
    robust_standardise,
    robust_z,
    slice_covariates,
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
    assert robust_z(y)[45] < 3.5  # without the covariates the anomaly hides in the trend


def test_robust_z_is_invariant_to_affine_changes_of_the_statistic():
    """A scanner that scales and shifts every slice's statistic alike changes nothing."""
    rng = np.random.default_rng(2)
    y = rng.normal(0.0, 1.0, 60)
    y[[5, 6, 7]] += 6.0
    x = slice_covariates(rng.uniform(0.5, 1.0, 60), np.arange(60.0))
    assert np.allclose(robust_z(y, x), robust_z(3.0 * y + 7.0, x), atol=1e-6)


def test_constant_population_gives_zero():
    assert np.all(robust_z(np.full(20, 0.9)) == 0.0)


def _maps(seed: int = 3, lesion: float = 0.0):
    """Noise maps [40, 32, 32] with a disc of brain; ``lesion`` > 0 adds a bright block to slices 18-21."""
    rng = np.random.default_rng(seed)
    maps = np.abs(rng.normal(0.0, 1.0, (40, 32, 32)))
    yy, xx = np.mgrid[:32, :32]
    fg = np.broadcast_to(((yy - 16) ** 2 + (xx - 16) ** 2) < 14**2, maps.shape).copy()
    truth = np.zeros(maps.shape, bool)
    truth[18:22, 10:18, 10:18] = True
    maps[truth] += lesion
    return maps, fg, truth


def test_pixel_level_is_median_plus_z_mad_of_the_brain_pixels():
    maps, fg, _ = _maps()
    v = maps[fg]
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    assert pixel_level(maps, fg, 5.0) == pytest.approx(med + 5.0 * mad)
    maps[~fg] = 1e6  # outside the brain: ignored
    assert pixel_level(maps, fg, 5.0) == pytest.approx(med + 5.0 * mad)
    assert pixel_level(maps, np.zeros_like(fg), 5.0) == np.inf


def test_pixel_level_follows_a_global_change_of_the_maps():
    """A case whose maps are all scaled (another scanner's contrast) keeps the same mask."""
    maps, fg, _ = _maps(lesion=12.0)
    for a, b in ((3.0, 0.0), (0.2, 0.5)):
        assert np.array_equal(maps >= pixel_level(maps, fg, 8.0), a * maps + b >= pixel_level(a * maps + b, fg, 8.0))


def test_a_lesion_is_found_and_barely_moves_the_level():
    maps, fg, truth = _maps(lesion=12.0)
    healthy = pixel_level(_maps(lesion=0.0)[0], fg, DEFAULT_Z)
    level = pixel_level(maps, fg, DEFAULT_Z)
    assert abs(level - healthy) < 0.05 * healthy
    found = (maps >= level) & fg
    assert found[truth].mean() > 0.99 and (found & ~truth).sum() == 0


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


def test_robust_standardise_uses_the_brain_only_and_ignores_gain_and_offset():
    rng = np.random.default_rng(3)
    x = rng.normal(100.0, 10.0, (4, 16, 16))
    brain = np.zeros(x.shape, bool)
    brain[:, 2:14, 2:14] = True
    x[~brain] = -1000.0  # background far below: must not enter the statistics
    z = robust_standardise(x, brain)
    assert abs(np.median(z[brain])) < 1e-9 and 0.85 < np.std(z[brain]) < 1.15
    np.testing.assert_allclose(robust_standardise(3.0 * x + 7.0, brain), z, atol=1e-9)
    assert not robust_standardise(np.ones((2, 3)), np.ones((2, 3), bool)).any()  # constant: zeros


def _two_blob_forward(n: int = 6, s: int = 32):
    """A forward result whose map has two equal blobs in slice 2; only the first is FLAIR-bright."""
    from AnomalyDiffusionLib.fpdm import ForwardResult

    rng = np.random.default_rng(4)
    h = rng.uniform(0.0, 0.01, (n, 1, s, s)).astype(np.float32)
    h[2, 0, 4:12, 4:12] = 1.0
    h[2, 0, 20:28, 20:28] = 1.0
    flair = rng.normal(0.0, 0.05, (n, s, s)).astype(np.float32)
    flair[2, 4:12, 4:12] += 1.0  # the first blob is hyperintense, the second is not
    fg = np.ones((n, s, s), bool)
    zeros = np.zeros((n, 1), np.float32)
    fwd = ForwardResult(
        steps=np.arange(1),
        m=np.zeros((n, 1, 1), np.float32),
        mse_h=np.zeros((n, 1), np.float32),
        mse_u=np.zeros((n, 1), np.float32),
        t_e=zeros.astype(int),
        m_te=zeros,
        h=h,
        s_te=h,
        cosine=np.ones(n, np.float32),
        steps_run=np.ones(n, int),
        foreground=fg,
    )
    return fwd, flair


def test_the_flair_gate_keeps_only_hyperintense_anomalies():
    from AnomalyDiffusionLib.fpdm import Calibration, volume_segmentation

    fwd, flair = _two_blob_forward()
    cal = Calibration(w=1.0, cos_threshold=0.9, m_max=[1.0], median_size=3, min_component=64)  # 4 px at 32²
    plain, info = volume_segmentation(fwd, cal, 8.0)
    assert plain.masks[2, 8, 8] and plain.masks[2, 24, 24] and plain.unhealthy.tolist() == [0, 0, 1, 0, 0, 0]
    gated, info = volume_segmentation(fwd, cal, 8.0, flair=flair, hyper_z=2.0)
    assert gated.masks[2, 8, 8] and not gated.masks[2, 24, 24]
    assert gated.masks[2].sum() == plain.masks[2, :16, :16].sum()  # the bright blob is kept whole
    assert info["flair_hyper_z"] == 2.0 and info["slices_unhealthy"] == 1
    # a gate no pixel passes leaves every slice healthy
    none, _ = volume_segmentation(fwd, cal, 8.0, flair=flair, hyper_z=100.0)
    assert not none.masks.any() and not none.unhealthy.any()


def test_hysteresis_keeps_a_seeded_region_whole_and_drops_unseeded_ones():
    """3D hysteresis (grow_z): a lesion whose core passes the high level keeps its weaker rim and
    its weaker neighbouring slice; an equally weak region with no core anywhere is dropped."""
    from AnomalyDiffusionLib.fpdm import Calibration, volume_segmentation

    fwd, _ = _two_blob_forward()
    h = fwd.h
    h[2, 0] = np.random.default_rng(5).uniform(0.0, 0.01, h.shape[-2:])
    h[2, 0, 4:14, 4:14] = 0.2  # weak rim ...
    h[2, 0, 6:12, 6:12] = 1.0  # ... around a strong core
    h[3, 0, 4:14, 4:14] = 0.2  # the lesion continues, weakly, on the next slice
    h[2, 0, 20:28, 20:28] = 0.2  # a weak region without a core
    cal = Calibration(w=1.0, cos_threshold=0.9, m_max=[1.0], median_size=3, min_component=64)
    high, _ = volume_segmentation(fwd, cal, 200.0)  # the core only
    low, _ = volume_segmentation(fwd, cal, 30.0)  # every weak region too
    grown, info = volume_segmentation(fwd, cal, 200.0, grow_z=30.0)
    assert high.masks[2, 8, 8] and not high.masks[2, 5, 5] and not high.masks[3].any()
    assert low.masks[2, 24, 24] and low.masks[3, 8, 8]
    assert grown.masks[2, 5, 5] and grown.masks[3, 8, 8]  # the rim and the next slice
    assert not grown.masks[2, 24, 24]  # no seed, dropped
    assert info["grow_z"] == 30.0 and info["grow_level"] < info["pixel_level"]
    with pytest.raises(ValueError, match="grow_z"):
        volume_segmentation(fwd, cal, 10.0, grow_z=20.0)


def test_volume_components_keep_a_small_lesion_spread_over_slices_and_drop_a_speck():
    """A small lesion cut by the model grid into 3 × 3 = 9 px on each of 3 slices (27 px in 3D), and a
    lone 3 × 3 speck on another slice, with a small-component size of 16 px (256 px at 128²): per
    slice (the papers' appendix F) both go; as 3D components the lesion stays and the speck goes."""
    from AnomalyDiffusionLib.fpdm import Calibration, volume_segmentation

    fwd, _ = _two_blob_forward(n=8)
    h = fwd.h
    h[:] = np.random.default_rng(6).uniform(0.0, 0.01, h.shape)
    h[2:5, 0, 10:13, 10:13] = 1.0  # the small lesion on slices 2-4
    h[6, 0, 20:23, 20:23] = 1.0  # the speck
    cal = Calibration(w=1.0, cos_threshold=0.9, m_max=[1.0], median_size=1, min_component=256)
    per_slice, info = volume_segmentation(fwd, cal, 30.0, grow_z=10.0)
    assert not per_slice.masks.any() and info["components"] == "slice"
    in_3d, info = volume_segmentation(fwd, cal, 30.0, grow_z=10.0, components="volume")
    assert in_3d.unhealthy.tolist() == [0, 0, 1, 1, 1, 0, 0, 0] and info["components"] == "volume"
    assert in_3d.masks[2:5, 10:13, 10:13].all() and in_3d.masks.sum() == 27
    with pytest.raises(ValueError, match="components"):
        volume_segmentation(fwd, cal, 30.0, components="2d")


def test_seeded_components_keep_a_small_lesions_slices_and_drop_a_grown_speck_on_a_neighbour():
    """A large lesion on slices 2-3 whose weak rim grows onto slice 4 as a 3 × 3 speck with no seed of
    its own, and a small lesion of 3 × 3 px on slices 6-7 whose every slice holds a seed: the 3D
    filter keeps the speck (it connects to the large lesion), "seeded" drops it and keeps the small
    lesion, the per-slice filter drops both."""
    from AnomalyDiffusionLib.fpdm import Calibration, volume_segmentation

    fwd, _ = _two_blob_forward(n=10)
    h = fwd.h
    h[:] = np.random.default_rng(7).uniform(0.0, 0.01, h.shape)
    h[2:4, 0, 4:16, 4:16] = 1.0  # the large lesion
    h[4, 0, 8:11, 8:11] = 0.08  # its weak speck on the next slice (between the two levels)
    h[6:8, 0, 20:23, 20:23] = 1.0  # the small lesion, seeded on each of its slices
    cal = Calibration(w=1.0, cos_threshold=0.9, m_max=[1.0], median_size=1, min_component=256)  # 16 px at 32²
    kw = {"grow_z": 10.0}
    per_slice, _ = volume_segmentation(fwd, cal, 30.0, **kw)
    in_3d, _ = volume_segmentation(fwd, cal, 30.0, components="volume", **kw)
    seeded, info = volume_segmentation(fwd, cal, 30.0, components="seeded", **kw)
    assert per_slice.unhealthy.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert in_3d.unhealthy.tolist() == [0, 0, 1, 1, 1, 0, 1, 1, 0, 0]
    assert seeded.unhealthy.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0] and info["components"] == "seeded"


def test_seeded_components_count_flair_assisted_seeds_as_seeds():
    """A small lesion (3 × 3 px on slices 6-7) whose map stays between the growth level and z but is
    FLAIR-bright: with FLAIR-assisted seeds it starts a region, and the seeded filter keeps both of its
    slices (each holds FLAIR-assisted seeds of its own); the same lesion not FLAIR-bright is dropped."""
    from AnomalyDiffusionLib.fpdm import Calibration, volume_segmentation

    fwd, flair = _two_blob_forward(n=10)
    h = fwd.h
    h[:] = np.random.default_rng(7).uniform(0.0, 0.01, h.shape)
    h[2:4, 0, 4:16, 4:16] = 1.0  # a large lesion, seeded by the map
    h[6:8, 0, 20:23, 20:23] = 0.3  # the small lesion: above the growth and FLAIR-seed levels, below z
    flair[:] = np.random.default_rng(9).normal(0.0, 0.05, flair.shape)
    flair[2:4, 4:16, 4:16] += 1.0
    bright = flair.copy()
    bright[6:8, 20:23, 20:23] += 1.0
    cal = Calibration(w=1.0, cos_threshold=0.9, m_max=[1.0], median_size=1, min_component=256)  # 16 px at 32²
    kw = {"grow_z": 10.0, "seed_map_z": 20.0, "seed_flair_z": 3.0, "components": "seeded"}
    found, _ = volume_segmentation(fwd, cal, 200.0, flair=bright, **kw)
    assert found.unhealthy.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0]
    dull, _ = volume_segmentation(fwd, cal, 200.0, flair=flair, **kw)
    assert dull.unhealthy.tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0, 0]


def _biased_brain(n: int = 4, s: int = 64):
    """A round brain (radius 25.6 px) of FLAIR 1 with tissue noise of SD 0.05 under a smooth bias
    that brightens one side by up to 60 % (a Gaussian bump of SD 16 px centred 6 px outside the brain),
    and one small blob 30 % brighter than its surroundings on the other side."""
    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[:s, :s]
    fg2 = (yy - s / 2) ** 2 + (xx - s / 2) ** 2 < (0.4 * s) ** 2
    bias = 1.0 + 0.6 * np.exp(-((xx - 1.0 * s) ** 2 + (yy - s / 2) ** 2) / (2 * 16.0**2))
    flair = np.repeat((bias * fg2)[None], n, 0) * (1.0 + rng.normal(0.0, 0.05, (n, s, s)))
    blob = (yy - s / 2) ** 2 + (xx - 0.25 * s) ** 2 < 2.5**2
    flair[1][blob] *= 1.3
    return flair, np.repeat(fg2[None], n, 0), blob


def test_local_standardise_removes_a_smooth_bias_and_keeps_a_small_bright_blob():
    """A global robust z calls a patch of the bright-biased side strongly hyperintense (z >= 3: 0.13 %
    of N(0, 1)); with the smooth background removed (sigma 8 px: far above the blob's radius of
    2.5 px, below the bias's scale) far fewer tissue pixels do, and the blob stands out."""
    flair, fg, blob = _biased_brain()
    glob = robust_standardise(flair, fg)
    local = local_standardise(flair, fg, 8.0)
    tissue = fg.copy()
    tissue[1][blob] = False
    assert np.mean(glob[tissue] >= 3.0) > 0.05
    assert np.mean(local[tissue] >= 3.0) < 0.025
    assert np.median(local[1][blob]) > 4.0


def test_local_standardise_ignores_gain_and_offset_and_the_outside():
    flair, fg, _ = _biased_brain()
    a = local_standardise(flair, fg, 8.0)
    b = local_standardise(3.0 * flair + 7.0, fg, 8.0)
    assert np.allclose(a[fg], b[fg], atol=1e-6)
    outside = flair.copy()
    outside[~fg] = 50.0  # a bright skull or background does not leak into the brain's background
    assert np.allclose(local_standardise(outside, fg, 8.0)[fg], a[fg], atol=1e-6)


def test_flair_assisted_seeds_find_a_weak_bright_region_and_nothing_else():
    """A FLAIR-bright region whose map stays below the seed level z is found with the second kind of
    seed (map above seed_map_z and FLAIR above seed_flair_z); an equally weak region that is not
    FLAIR-bright, and a FLAIR-bright region without any map signal, are not."""
    from AnomalyDiffusionLib.fpdm import Calibration, volume_segmentation

    fwd, flair = _two_blob_forward()
    h = fwd.h
    h[2, 0] = np.random.default_rng(6).uniform(0.0, 0.01, h.shape[-2:])
    h[2, 0, 4:12, 4:12] = 0.2  # weak map, FLAIR-bright (flair[2, 4:12, 4:12] += 1)
    h[2, 0, 20:28, 20:28] = 0.2  # weak map, FLAIR-normal
    flair[4, 20:28, 4:12] += 1.0  # FLAIR-bright, no map signal
    cal = Calibration(w=1.0, cos_threshold=0.9, m_max=[1.0], median_size=3, min_component=64)
    kw = {"flair": flair, "hyper_z": 1.0, "grow_z": 10.0}
    plain, _ = volume_segmentation(fwd, cal, 200.0, **kw)
    assert not plain.masks.any()  # the map alone never reaches z
    seeded, info = volume_segmentation(fwd, cal, 200.0, seed_map_z=20.0, seed_flair_z=3.0, **kw)
    assert seeded.masks[2, 8, 8] and not seeded.masks[2, 24, 24] and not seeded.masks[4].any()
    assert seeded.unhealthy.tolist() == [0, 0, 1, 0, 0, 0]
    assert info["seed_map_z"] == 20.0 and info["seed_flair_z"] == 3.0
    # a FLAIR seed level no pixel reaches changes nothing
    strict, _ = volume_segmentation(fwd, cal, 200.0, seed_map_z=20.0, seed_flair_z=1e6, **kw)
    assert not strict.masks.any()
    with pytest.raises(ValueError, match="go together"):
        volume_segmentation(fwd, cal, 200.0, seed_map_z=20.0, **kw)
    with pytest.raises(ValueError, match="grow_z <= seed_map_z <= z"):
        volume_segmentation(fwd, cal, 200.0, seed_map_z=5.0, seed_flair_z=3.0, **kw)
    with pytest.raises(ValueError, match="seeds only"):
        volume_segmentation(fwd, cal, 200.0, flair_bias_px=8.0, **kw)
    with pytest.raises(ValueError, match="need the FLAIR"):
        volume_segmentation(fwd, cal, 200.0, grow_z=10.0, seed_map_z=20.0, seed_flair_z=3.0)
