"""Landmark intensity standardisation (intensity.py, volumes.normalise) against hand cases and the
invariance it exists for: a monotone change of the scanner's intensity curve."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from AnomalyDiffusionLib.errors import InputError
from AnomalyDiffusionLib.intensity import LANDMARK_PERCENTILES, IntensityReference, landmarks, standardise
from AnomalyDiffusionLib.phantom import PhantomOptions, make_subject
from AnomalyDiffusionLib.volumes import case_from_images, normalise

ROOT = Path(__file__).resolve().parents[1]
REF = (0.36, 0.51, 0.61, 0.72)  # about the default bundle's FLAIR reference


def _brain(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 3D 'brain': tissue classes with noise, a dark background, and a small bright lesion (2 %)."""
    rng = np.random.default_rng(seed)
    shape = (20, 48, 48)
    _, yy, xx = np.indices(shape)
    mask = ((yy - 24) ** 2 + (xx - 24) ** 2) < 20**2
    tissue = np.where(xx < 24, 300.0, 420.0) + np.where(yy < 20, 80.0, 0.0)
    img = tissue + rng.normal(0.0, 25.0, shape)
    lesion = mask & ((yy - 30) ** 2 + (xx - 30) ** 2 < 3**2)
    img[lesion] = 800.0 + rng.normal(0.0, 20.0, int(lesion.sum()))
    img[~mask] = 0.0
    return np.clip(img, 0, None).astype(np.float32), mask


def test_the_map_sends_each_anchor_and_landmark_where_it_belongs():
    case = (0.2, 0.4, 0.5, 0.8)
    x = np.array([0.0, 0.2, 0.3, 0.4, 0.5, 0.8, 0.9, 1.0, 1.3])
    y = standardise(x, case, REF)
    want = [0.0, 0.36, (0.36 + 0.51) / 2, 0.51, 0.61, 0.72, 0.86, 1.0, 1.3]  # linear between; above 1 untouched
    np.testing.assert_allclose(y, want, atol=1e-6)


def test_with_its_own_landmarks_as_reference_it_is_the_papers_scaling():
    img, mask = _brain()
    own = landmarks(img, mask)
    np.testing.assert_allclose(normalise(img, mask, reference=own), normalise(img, mask), atol=1e-6)


@pytest.mark.parametrize("gamma", [0.8, 1.25])
def test_a_gamma_is_undone(gamma):
    """A gamma on the scanner's intensities moves the percentile-scaled image by several hundredths;
    standardised to the same reference, the two agree to a hundredth, and the bright lesion stays the
    brightest tissue."""
    img, mask = _brain()
    top = float(img.max())
    bent = top * (img / top) ** gamma
    plain = np.abs(normalise(bent, mask) - normalise(img, mask))[mask].mean()
    a, b = normalise(img, mask, reference=REF), normalise(bent, mask, reference=REF)
    fixed = np.abs(a - b)[mask].mean()
    assert plain > 0.03
    assert fixed < 0.01
    assert fixed < plain / 4
    lesion = img > 700
    assert np.all(b[lesion] >= np.percentile(b[mask & ~lesion], 99))


def test_scanner_gain_changes_nothing():
    img, mask = _brain()
    np.testing.assert_allclose(
        normalise(img, mask, reference=REF), normalise(3.7 * img, mask, reference=REF), atol=1e-5
    )


def test_a_flat_or_binary_brain_is_refused_with_a_message():
    mask = np.ones((4, 8, 8), bool)
    img = np.where(np.indices(mask.shape)[2] < 6, 1.0, 2.0).astype(np.float32)  # two values: percentiles repeat
    with pytest.raises(InputError, match=r"do not increase.*--intensity percentile"):
        normalise(img, mask, reference=REF)


def test_reference_validation():
    with pytest.raises(ValueError, match="must increase"):
        IntensityReference((50.0, 25.0), {"flair": (0.3, 0.5)})
    with pytest.raises(ValueError, match="2 increasing values"):
        IntensityReference((25.0, 50.0), {"flair": (0.5, 0.5)})
    with pytest.raises(ValueError, match=r"must lie in \(0, 99"):
        IntensityReference((25.0, 99.5), {"flair": (0.3, 0.5)})
    ref = IntensityReference(LANDMARK_PERCENTILES, {"flair": REF})
    assert IntensityReference.from_manifest(ref.as_manifest("x")) == ref


def test_intensity_reference_script_measures_the_training_subjects(tmp_path):
    """The script's reference is the median (for 2 subjects: the mean) of the subjects' own landmarks,
    the same subjects train_fpdm.py --phantom draws (the last 25 % healthy)."""
    out = tmp_path / "ref.json"
    cmd = [sys.executable, str(ROOT / "training" / "intensity_reference.py"), "--phantom", "2", "--phantom-seed", "7"]
    done = subprocess.run([*cmd, "--phantom-spacing", "3", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    block = json.loads(out.read_text())
    marks = []
    for seed in (7, 8):  # round(0.25 * 2) = 0 healthy subjects: both keep their lesions
        ph = make_subject(seed, PhantomOptions(spacing=3.0, modalities=("flair", "t2")))
        case = case_from_images({m: ph.images[m] for m in ("flair", "t2")})
        marks.append(landmarks(case.arrays["flair"], case.mask))
    np.testing.assert_allclose(block["modalities"]["flair"], np.mean(marks, 0), atol=1e-5)
    assert block["percentiles"] == list(LANDMARK_PERCENTILES) and block["subjects"] == 2
    bad = subprocess.run([*cmd[:2], "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode != 0 and "give --phantom N" in bad.stderr
