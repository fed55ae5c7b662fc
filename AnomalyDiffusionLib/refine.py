"""Native-resolution refinement of a found lesion along the FLAIR's own edges (beyond both papers).

AnoFPDM's masks are made on the model's slices (64² for the CPU bundle: about 3.75 mm per pixel on a
240 mm field of view), then resampled to the input grid, so a lesion's boundary is as coarse as the
model's pixel and its median filter; and the model flags only the slices where its map rises, which
leaves the lesion's thin top and bottom slices out. The lesions this product targets are
FLAIR-hyperintense, and the FLAIR at its own resolution draws their boundary sharply.

:func:`refine_to_flair` keeps the model as the detector and lets the FLAIR set the extent, with
the robust FLAIR z-score (:func:`~AnomalyDiffusionLib.flair_reference.flair_zscore`, the same score
as the FLAIR-threshold reference):

- the model's voxels are kept where their z exceeds ``keep_level`` (the core; by default
  ``level``): this trims the blocky 64² mask where it spills into darker tissue or CSF;
- the voxels around them whose z exceeds ``level`` and that lie within ``reach_mm`` of the model's
  mask are added when they are connected (26-neighbourhood) to the core: this gives the lesion the
  boundary the FLAIR draws, and the thin top and bottom slices the model did not flag.

A ``keep_level`` below ``level`` keeps a faint lesion the model found (FLAIR z of 1–2 is common on
thick, partial-volumed slices, where the model, which also sees T2, does better than any FLAIR
threshold) while a bright one still gets its FLAIR boundary. A refinement can only reshape what the
model found, never add a lesion elsewhere: a bright spot farther than ``reach_mm`` from every
finding stays out, and a healthy case without a finding stays empty.

The consequence to say plainly: with refinement on, the segmentation's **boundary comes from the
FLAIR intensity**, and only the decision *where* comes from the anomaly model. ``summary.json`` records
the volume before and after (``refinement``). The levels and reach are a bundle's
(``pipeline.refine_flair_z``, ``refine_reach_mm``, ``refine_keep_flair_z``), chosen on development
phantoms by
``training/choose_volume_z.py``; ``detect --refine none`` or ``--faithful`` turn it off.

Pure functions of arrays.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def refine_to_flair(
    mask: np.ndarray,
    flair_z: np.ndarray,
    spacing: tuple[float, float, float],
    level: float,
    reach_mm: float,
    keep_level: float | None = None,
) -> np.ndarray:
    """The model's ``mask`` [z, y, x] (bool) refined to the FLAIR: its voxels with ``flair_z`` >
    ``keep_level`` (None: ``level``), and the voxels with ``flair_z`` > ``level`` within ``reach_mm``
    (Euclidean, in mm, with ``spacing`` = (x, y, z) mm as :class:`~AnomalyDiffusionLib.volumes.Case`
    stores it) of the mask, in 26-connected components that hold one of the kept voxels. ``flair_z``
    is 0 outside the brain, so nothing leaves it for positive levels. Returns a new bool array."""
    m = np.asarray(mask, bool)
    z = np.asarray(flair_z)
    if m.shape != z.shape:
        raise ValueError(f"mask {m.shape} and flair_z {z.shape} differ")
    if reach_mm < 0 or not np.isfinite(reach_mm):
        raise ValueError(f"reach_mm must be finite and >= 0, got {reach_mm}")
    out = np.zeros_like(m)
    if not m.any():
        return out
    sampling = (float(spacing[2]), float(spacing[1]), float(spacing[0]))  # array order z, y, x
    # work in the mask's bounding box grown by the reach: the rest cannot change
    pad = [int(np.ceil(reach_mm / s)) + 1 for s in sampling]
    nz = np.nonzero(m)
    box = tuple(
        slice(max(0, int(ix.min()) - p), min(n, int(ix.max()) + p + 1))
        for ix, p, n in zip(nz, pad, m.shape, strict=True)
    )
    mb = m[box]
    zb = z[box]
    near = ndimage.distance_transform_edt(~mb, sampling=sampling) <= reach_mm
    core = mb & (zb > (level if keep_level is None else keep_level))
    region = ((zb > level) & near) | core
    lab, n = ndimage.label(region, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return out
    touched = np.zeros(n + 1, bool)
    touched[np.unique(lab[core])] = True
    touched[0] = False
    out[box] = touched[lab]
    return out
