"""The synthetic phantom: real anatomy, determinism, lesions where the contrast changes, writers."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from AnomalyDiffusionLib import phantom as P
from AnomalyDiffusionLib.volumes import read_volume

FAST = P.PhantomOptions(spacing=2.0)


@pytest.fixture(scope="module")
def subject():
    return P.make_subject(11, P.PhantomOptions(spacing=2.0, n_lesions=1))


def test_templates_come_from_the_nilearn_wheel():
    folder = P.template_dir()
    assert all((folder / f).is_file() for f in P.TEMPLATE_FILES.values())
    anat = P.load_anatomy(2.0)
    brain = anat.brain > 0.5
    # intracranial volume incl. CSF; MNI space is ~15 % larger than an average adult head (≈1.5 L)
    litres = brain.sum() * 8 / 1e6
    assert 1.5 < litres < 2.2
    assert 0.3 < anat.gm[brain].mean() < 0.6 and 0.2 < anat.wm[brain].mean() < 0.5


def test_same_seed_same_subject_and_different_seeds_differ(subject):
    again = P.make_subject(11, P.PhantomOptions(spacing=2.0, n_lesions=1))
    other = P.make_subject(12, P.PhantomOptions(spacing=2.0, n_lesions=1))
    a = sitk.GetArrayFromImage(subject.images["flair"])
    assert np.array_equal(a, sitk.GetArrayFromImage(again.images["flair"]))
    assert np.array_equal(subject.mask, again.mask)
    b = sitk.GetArrayFromImage(other.images["flair"])
    assert not np.array_equal(subject.mask, other.mask)
    brain = (a > 0) & (b > 0)
    assert np.corrcoef(a[brain], b[brain])[0, 1] < 0.9  # the warp moved the anatomy


def _boundary_gradient(img: np.ndarray, mask: np.ndarray, interior: np.ndarray) -> float:
    """Mean gradient magnitude on the mask's boundary voxels, away from the brain's own outer edge."""
    g = ndimage.gaussian_gradient_magnitude(img.astype(float), 0.7)
    boundary = mask & ~ndimage.binary_erosion(mask) & interior
    return float(g[boundary].mean())


@pytest.mark.parametrize("modality", ["flair", "t2"])
def test_lesion_mask_lies_where_the_contrast_changes(subject, modality):
    img = sitk.GetArrayFromImage(subject.images[modality])
    mask = subject.mask
    brain = img > 0
    interior = ndimage.binary_erosion(brain, iterations=3)
    ring = ndimage.binary_dilation(mask, iterations=2) & ~mask & brain
    # the lesion is hyperintense on FLAIR and T2 relative to the tissue just around it
    assert img[mask].mean() > 1.15 * img[ring].mean()
    # the mask's own boundary has a stronger edge than the same boundary shifted by 2 voxels
    g_true = _boundary_gradient(img, mask, interior)
    for axis in range(3):
        for shift in (-2, 2):
            assert g_true > 1.05 * _boundary_gradient(img, np.roll(mask, shift, axis=axis), interior)


def test_healthy_subject_has_no_lesion_and_labels_are_brats_codes(subject):
    healthy = P.make_subject(5, P.PhantomOptions(spacing=2.0, n_lesions=0))
    assert not healthy.mask.any() and healthy.lesions == []
    labels = set(np.unique(sitk.GetArrayFromImage(subject.labels)).tolist())
    assert labels <= {0, 1, 2, 4} and 2 in labels and (1 in labels or 4 in labels)


def test_lesions_are_bright_but_not_always_the_brightest_thing():
    """T2: CSF outshines every lesion. FLAIR: lesions are hyperintense overall, yet for some subjects
    normal tissue in most lesion slices is brighter (99th percentile) than the lesion's median."""
    subtle = 0
    for seed in range(6):
        s = P.make_subject(seed, P.PhantomOptions(spacing=2.0, n_lesions=1, modalities=("flair", "t2")))
        m = s.mask
        t2 = sitk.GetArrayFromImage(s.images["t2"])
        assert np.percentile(t2[(t2 > 0) & ~m], 99.9) > t2[m].mean()
        fl = sitk.GetArrayFromImage(s.images["flair"])
        assert np.median(fl[m]) > 1.15 * np.median(fl[(fl > 0) & ~m])
        ks = np.flatnonzero(m.sum((1, 2)) > 20)
        brighter = [np.percentile(fl[k][~m[k] & (fl[k] > 0)], 99) > np.median(fl[k][m[k]]) for k in ks]
        subtle += np.mean(brighter) > 0.5
    assert 1 <= subtle < 6


def test_brats_writer_layout_and_oblique_anisotropic_geometry(tmp_path):
    paths = P.write_brats_folder(tmp_path / "brats", 2, seed=3, options=FAST, healthy_fraction=0.5)
    for i, p in enumerate(paths):
        assert p.name == f"Case_{i}"
        for m in ("flair", "t2", "t1", "t1ce", "seg"):
            assert (p / f"Case_{i}_{m}.nii.gz").is_file()
    seg1 = sitk.GetArrayFromImage(sitk.ReadImage(str(paths[1] / "Case_1_seg.nii.gz")))
    assert seg1.max() == 0  # the healthy one

    case = P.make_subject(3, P.PhantomOptions(spacing=2.0, n_lesions=1, modalities=("flair",)))
    d = P.oblique_direction((10, 5, -20), flip=(1,))
    moved = P.resample_case(case, P.make_grid(case.labels, (1.2, 1.2, 3.0), d))
    out = P.write_case(moved, tmp_path, "Oblique")
    back = read_volume(out["flair"])
    assert np.allclose(back.GetDirection(), d.ravel(), atol=1e-6)
    assert np.allclose(back.GetSpacing(), (1.2, 1.2, 3.0))
    # the lesion volume survives the move to the new grid (mL)
    ml_before = case.mask.sum() * 8.0 / 1000
    ml_after = moved.mask.sum() * 1.2 * 1.2 * 3.0 / 1000
    assert ml_after == pytest.approx(ml_before, rel=0.1)


def test_brats_grid_shape():
    case = P.make_subject(2, P.PhantomOptions(spacing=2.0, n_lesions=1, modalities=("flair",), brats_grid=True))
    assert case.images["flair"].GetSize() == (240, 240, 155)
    assert case.images["flair"].GetSpacing() == (1.0, 1.0, 1.0)
    assert case.mask.any()


def test_clinical_grid_is_oblique_anisotropic_and_keeps_the_lesion(tmp_path):
    base = P.make_subject(6, P.PhantomOptions(spacing=2.0, n_lesions=1, modalities=("flair",)))
    case = P.make_subject(6, P.PhantomOptions(spacing=2.0, n_lesions=1, modalities=("flair",), clinical_grid=True))
    img = case.images["flair"]
    assert img.GetSpacing() == pytest.approx((0.9, 0.9, 3.0))
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-9) and not np.allclose(np.abs(d), np.eye(3), atol=0.01)
    assert case.mask.sum() * 0.9 * 0.9 * 3.0 == pytest.approx(base.mask.sum() * 8.0, rel=0.1)
    with pytest.raises(ValueError, match="not both"):
        P.make_subject(6, P.PhantomOptions(spacing=2.0, brats_grid=True, clinical_grid=True))
