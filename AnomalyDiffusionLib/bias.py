"""Bias-field correction of a case before the models see it (beyond both papers).

A receive coil's smooth gain field multiplies every tissue by a slowly varying factor; on FLAIR a
20 % field makes a whole lobe look as bright as a faint lesion, and the per-volume decision
(:mod:`~AnomalyDiffusionLib.selfcal`) judges both the map and FLAIR against the whole brain. BraTS
data and the papers' training sets are bias corrected upstream; clinical scans often are not. N4
(Tustison et al., IEEE TMI 29, 2010; SimpleITK's ``N4BiasFieldCorrectionImageFilter``) estimates the
field as a B-spline on a shrunken copy of the brain and divides it out at full resolution.

Pure functions of arrays; the pipeline applies it per modality on the case's brain mask when the
bundle's ``pipeline.bias_correction`` (or ``detect --bias-correction``) says ``n4`` (the default since
bundle 3.7), and the native-resolution refinement then thresholds the corrected FLAIR
(``DetectResult.refinement_flair_z``). N4 also removes the brightness a lesion borrows from a bright
region of the field: a faint lesion is then judged by its own contrast alone (the robustness phantom
of ``Testing/test_robustness.py`` and training/README.md, 3.7).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

#: voxels of the shrunken copy N4 fits on: enough for a field smooth over centimetres, and a few
#: seconds for any head
FIT_VOXELS = 150_000
#: N4's iterations per fitting level; a fit on ``levels`` levels uses the first ``levels`` (the B-spline
#: mesh starts at one span per axis and doubles each level: 3 levels end at 4 spans, 4 at 8)
ITERATIONS = (50, 50, 30, 30, 20)
#: fitting levels unless a bundle says otherwise (``pipeline.bias_levels``): 3, as bundle 3.7 shipped. 4
#: levels follow fields that change within 2 cm but also take part of a 4-6 cm lesion for field (the
#: development phantoms: training/README.md, decision 40)
LEVELS = 3


def n4_field(
    array: np.ndarray,
    mask: np.ndarray,
    spacing: Sequence[float],
    fit_voxels: int = FIT_VOXELS,
    levels: int = LEVELS,
) -> np.ndarray:
    """N4's multiplicative bias field of ``array`` [z, y, x] (``spacing`` x, y, z in mm) estimated on the
    brain ``mask`` on ``levels`` fitting levels (1-5; more follow shorter-range fields: 4 levels end on
    an 8-span mesh, about 2 cm per span across a brain): float32, same shape, 1 where nothing is
    corrected (outside the brain it is the B-spline's extension). ``array / field`` is the corrected
    image."""
    if not 1 <= levels <= len(ITERATIONS):
        raise ValueError(f"N4 fitting levels must be 1-{len(ITERATIONS)}, not {levels}")
    a = np.asarray(array, np.float32)
    m = np.asarray(mask, bool)
    if not m.any():
        return np.ones_like(a)
    # N4 works on log intensities: it needs positive values in the mask
    floor = max(float(np.percentile(a[m], 1)), 1e-6) * 1e-3
    img = sitk.GetImageFromArray(np.where(m, np.maximum(a, floor), floor))
    img.SetSpacing([float(s) for s in spacing])
    msk = sitk.GetImageFromArray(m.astype(np.uint8))
    msk.CopyInformation(img)
    shrink = max(1, round((m.size / float(fit_voxels)) ** (1.0 / 3.0)))
    small = sitk.Shrink(img, [shrink] * 3)
    small_mask = sitk.Shrink(msk, [shrink] * 3)
    if not np.any(sitk.GetArrayViewFromImage(small_mask)):
        return np.ones_like(a)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(ITERATIONS[:levels]))
    n4.Execute(small, small_mask)
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img))
    return np.exp(log_field).astype(np.float32)


def correct(
    array: np.ndarray, mask: np.ndarray, spacing: Sequence[float], levels: int = LEVELS
) -> tuple[np.ndarray, dict]:
    """``array`` with N4's field (fitted on ``levels`` levels) divided out, and what was corrected: the
    field's 5th and 95th percentiles in the brain, relative to its median (a 20 % field gives about
    [0.8, 1.2])."""
    field = n4_field(array, mask, spacing, levels=levels)
    m = np.asarray(mask, bool)
    inside = field[m] if m.any() else np.ones(1, np.float32)
    med = float(np.median(inside))
    info = {"field_p5_p95": [round(float(np.percentile(inside, q)) / med, 4) for q in (5, 95)]}
    return (np.asarray(array, np.float32) / field).astype(np.float32), info
