"""AnoDODE's case-level evaluation reference (dode.evaluate.score_case, behind evaluate_dode.py --real-case)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_tiny_bundle

from AnomalyDiffusionLib.bundle import open_bundle
from AnomalyDiffusionLib.dode.evaluate import MIN_BRAIN_FRACTION, case_files, score_case
from AnomalyDiffusionLib.dode.model import dode_from_bundle
from AnomalyDiffusionLib.errors import AnomalyDiffusionError
from AnomalyDiffusionLib.phantom import PhantomOptions, make_subject, write_case
from AnomalyDiffusionLib.volumes import load_case, read_labelmap_like


def test_score_case_scores_every_brain_slice_and_labels_the_lesion_ones(tmp_path):
    """Untrained tiny model (plumbing, not accuracy): one score per slice whose brain covers ≥ 5 % of
    the slice, lesion flags from the mask, the summary consistent with the per-slice rows."""
    ph = make_subject(3, PhantomOptions(spacing=3.0, n_lesions=1, modalities=("flair", "t2")))
    paths = write_case(ph, tmp_path, "case1")
    assert case_files(tmp_path / "case1") == (paths["flair"], paths["seg"])
    model = dode_from_bundle(open_bundle(make_tiny_bundle(tmp_path / "b", methods=("dode",))))
    res = score_case(model, tmp_path / "case1", 64, method="rk4", steps=2, seed=0)

    case = load_case({"flair": paths["flair"]})
    seg = read_labelmap_like(paths["seg"], case)
    frac = case.mask.reshape(case.shape[0], -1).mean(1)
    want = np.flatnonzero(frac >= MIN_BRAIN_FRACTION)
    rows = res["per_slice"]
    assert [r["slice"] for r in rows] == want.tolist() and res["slices"] == len(want)
    lesion = [int((seg[k] > 0).any()) for k in want]
    assert [r["lesion"] for r in rows] == lesion and res["lesion_slices"] == sum(lesion) > 0
    scores = np.array([r["score"] for r in rows])
    assert np.isfinite(scores).all()
    les = np.array(lesion, bool)
    assert res["mean_score_lesion"] == pytest.approx(scores[les].mean(), abs=1e-3)
    assert res["mean_score_other"] == pytest.approx(scores[~les].mean(), abs=1e-3)
    assert 0.0 <= res["auroc"] <= 1.0
    # the same seed gives the same scores
    again = score_case(model, tmp_path / "case1", 64, method="rk4", steps=2, seed=0)
    assert [r["score"] for r in again["per_slice"]] == [r["score"] for r in rows]


def test_case_files_need_a_flair_and_a_mask(tmp_path):
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkUInt8), str(tmp_path / "x_flair.nii.gz"))
    with pytest.raises(AnomalyDiffusionError, match="_seg"):
        case_files(tmp_path)
