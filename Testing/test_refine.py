"""Native-resolution refinement (AnomalyDiffusionLib.refine) against hand-built volumes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from AnomalyDiffusionLib.errors import InputError
from AnomalyDiffusionLib.flair_reference import flair_zscore
from AnomalyDiffusionLib.options import DetectOptions
from AnomalyDiffusionLib.pipeline import refine_settings
from AnomalyDiffusionLib.refine import refine_to_flair

ISO = (1.0, 1.0, 1.0)


def ball(shape, centre, radius, spacing=ISO) -> np.ndarray:
    """Voxels within ``radius`` mm of ``centre`` (z, y, x voxel indices); ``spacing`` (x, y, z) mm."""
    zz, yy, xx = np.indices(shape, dtype=float)
    d2 = (
        ((zz - centre[0]) * spacing[2]) ** 2
        + ((yy - centre[1]) * spacing[1]) ** 2
        + ((xx - centre[2]) * spacing[0]) ** 2
    )
    return d2 <= radius**2


def test_a_coarse_mask_takes_the_bright_lesions_exact_extent():
    lesion = ball((40, 40, 40), (20, 20, 20), 8.0)
    z = np.where(lesion, 6.0, 0.0)
    coarse = np.zeros_like(lesion)
    coarse[16:26, 14:26, 15:27] = True  # a blocky, shifted finding that overlaps the lesion
    out = refine_to_flair(coarse, z, ISO, level=2.0, reach_mm=6.0)
    assert np.array_equal(out, lesion)  # the whole ball lies within 6 mm of the block


def test_the_reach_bounds_how_far_the_flair_may_extend_a_finding():
    lesion = ball((40, 40, 40), (20, 20, 20), 10.0)
    z = np.where(lesion, 6.0, 0.0)
    seed = np.zeros_like(lesion)
    seed[20, 20, 20] = True
    out = refine_to_flair(seed, z, ISO, level=2.0, reach_mm=4.0)
    assert np.array_equal(out, lesion & ball(lesion.shape, (20, 20, 20), 4.0))


def test_a_bright_spot_away_from_every_finding_and_dull_mask_voxels_stay_out():
    z = np.zeros((30, 30, 30))
    z[5:8, 5:8, 5:8] = 8.0  # bright, but 20 mm from the finding
    z[20:23, 20:23, 20:23] = 8.0
    mask = np.zeros(z.shape, bool)
    mask[19:24, 19:24, 19:24] = True  # 5³ block around the 3³ bright one
    out = refine_to_flair(mask, z, ISO, level=2.0, reach_mm=3.0)
    expected = np.zeros_like(mask)
    expected[20:23, 20:23, 20:23] = True
    assert np.array_equal(out, expected)


def test_a_keep_level_keeps_the_models_faint_voxels_and_still_adds_the_bright_rim():
    """A faint lesion core (z 1.5) the model found, in a bright rim (z 4) it partly missed, beside
    dark CSF (z -2) its blocky mask spilled into: with keep_level 1 the core stays, the rim is
    added and the CSF goes; with the default (keep = level 2.5) the faint core is dropped too."""
    shape = (30, 30, 30)
    rim = ball(shape, (15, 15, 15), 7.0)
    core = ball(shape, (15, 15, 15), 4.0)
    z = np.where(rim, 4.0, 0.0)
    z[core] = 1.5
    z[15:18, 15:18, 24:27] = -2.0  # CSF beside the lesion
    mask = ball(shape, (15, 15, 15), 5.0)
    mask[15:18, 15:18, 20:27] = True  # the spill
    kept = refine_to_flair(mask, z, ISO, level=2.5, reach_mm=3.0, keep_level=1.0)
    assert np.array_equal(kept, rim)
    strict = refine_to_flair(mask, z, ISO, level=2.5, reach_mm=3.0)
    assert np.array_equal(strict, rim & ~core)
    everything = refine_to_flair(mask, z, ISO, level=2.5, reach_mm=3.0, keep_level=-np.inf)
    assert np.array_equal(everything, rim | mask)


def test_nothing_found_stays_nothing_and_a_finding_without_bright_voxels_vanishes():
    z = np.full((10, 10, 10), 5.0)
    assert not refine_to_flair(np.zeros(z.shape, bool), z, ISO, 2.0, 10.0).any()
    mask = np.zeros(z.shape, bool)
    mask[4:6, 4:6, 4:6] = True
    assert not refine_to_flair(mask, np.zeros(z.shape), ISO, 2.0, 10.0).any()


def test_the_reach_is_in_millimetres_across_thick_slices():
    z = np.zeros((9, 20, 20))
    z[:, 8:12, 8:12] = 5.0  # a bright column through every slice
    mask = np.zeros(z.shape, bool)
    mask[4, 8:12, 8:12] = True
    out = refine_to_flair(mask, z, (1.0, 1.0, 5.0), level=2.0, reach_mm=6.0)
    assert [int(s.any()) for s in out] == [0, 0, 0, 1, 1, 1, 0, 0, 0]  # 5 mm away: in; 10 mm: out


def test_the_refinement_ignores_the_scanners_gain_and_offset():
    rng = np.random.default_rng(0)
    brain = ball((24, 32, 32), (12, 16, 16), 14.0)
    flair = rng.normal(100.0, 5.0, brain.shape) * brain
    flair[ball(brain.shape, (12, 12, 14), 4.0)] += 60.0
    mask = np.zeros(brain.shape, bool)
    mask[11:14, 11:14, 13:16] = True
    a = refine_to_flair(mask, flair_zscore(flair, brain), ISO, 2.0, 6.0)
    b = refine_to_flair(mask, flair_zscore(3.0 * flair + 7.0 * brain, brain), ISO, 2.0, 6.0)
    assert a.sum() > mask.sum() and np.array_equal(a, b)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="differ"):
        refine_to_flair(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3)), ISO, 2.0, 1.0)
    with pytest.raises(ValueError, match="reach_mm"):
        refine_to_flair(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 2)), ISO, 2.0, -1.0)


def test_refine_settings_follow_the_flag_the_bundle_and_faithful():
    with_refine = SimpleNamespace(
        name="b", manifest={"pipeline": {"refine": "flair", "refine_flair_z": 2.5, "refine_reach_mm": 6.0}}
    )
    without = SimpleNamespace(name="b", manifest={"pipeline": {}})
    assert refine_settings(with_refine, DetectOptions()) == (2.5, 6.0, None)
    with_refine.manifest["pipeline"]["refine_keep_flair_z"] = 1.0
    assert refine_settings(with_refine, DetectOptions()) == (2.5, 6.0, 1.0)
    assert refine_settings(with_refine, DetectOptions(refine="none")) is None
    assert refine_settings(with_refine, DetectOptions(faithful=True)) is None
    assert refine_settings(without, DetectOptions()) is None
    with pytest.raises(InputError, match="no refinement settings"):
        refine_settings(without, DetectOptions(refine="flair"))
