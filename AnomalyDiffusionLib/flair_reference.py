"""The FLAIR-threshold reference every segmentation figure is reported beside.

Lesions are FLAIR-bright, so thresholding a brain-masked FLAIR z-score is the simplest competitor
(Meissen et al., "Challenging current semi-supervised anomaly segmentation methods for brain MRI",
2021). A method that does not beat it has learnt nothing the intensity did not already say.

The z-score is robust (median and 1.4826 × MAD over the brain) after a 3 × 3 × 3 median filter, so a
lesion cannot inflate its own reference. :data:`FIXED_Z` is the rule fixed in advance (two robust
standard deviations); benchmarks also report the threshold tuned on their own cases as an optimistic
bound.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FIXED_Z = 2.0  #: the fixed rule: a voxel is anomalous when its robust FLAIR z-score exceeds 2


def flair_zscore(flair: np.ndarray, brain: np.ndarray, median_size: int = 3) -> np.ndarray:
    """Robust z-score of a FLAIR volume [z, y, x] inside ``brain`` (bool, same shape): median filter,
    then (x − median) / (1.4826 · MAD) over the brain voxels. 0 outside the brain."""
    x = np.asarray(flair, np.float32)
    b = np.asarray(brain, bool)
    if median_size > 1:
        x = ndimage.median_filter(x, size=median_size)
    v = x[b]
    if v.size == 0:
        return np.zeros_like(x)
    med = float(np.median(v))
    mad = 1.4826 * float(np.median(np.abs(v - med)))
    z = (x - med) / max(mad, 1e-6)
    return np.where(b, z, 0.0).astype(np.float32)


def threshold_mask(z: np.ndarray, brain: np.ndarray, threshold: float = FIXED_Z) -> np.ndarray:
    """Voxels of ``brain`` whose z-score exceeds ``threshold`` (bool, same shape)."""
    return (np.asarray(z) > threshold) & np.asarray(brain, bool)


def tuned_slice_threshold(
    flair: np.ndarray, brain: np.ndarray, truth: np.ndarray, taus: np.ndarray | None = None
) -> tuple[float, np.ndarray, np.ndarray]:
    """The optimistic bound on model slices: FLAIR ≥ τ inside the brain, with τ picked on these very
    slices for the best DICE against ``truth`` (pixel labels: an upper bound, not a method).

    ``flair`` [N, S, S] in [-1, 1], ``brain`` and ``truth`` bool of the same shape; ``taus``: the
    candidate levels on the [0, 1] intensity scale (default 35 from 0.30 to 0.98). Returns
    (τ, the intensity maps in [0, 1] inside the brain, the masks). ``training/evaluate_fpdm.py``
    reports it beside AnoFPDM."""
    from .metrics import pixel_level

    maps = np.where(brain, (np.asarray(flair) + 1) / 2, 0.0)
    best = (-1.0, 0.5)
    for tau in np.linspace(0.3, 0.98, 35) if taus is None else taus:
        d = pixel_level(maps >= tau, truth).dice
        best = max(best, (d, float(tau)))
    return best[1], maps, maps >= best[1]
