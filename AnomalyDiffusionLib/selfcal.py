"""Per-volume self-calibration: decisions from a case's own population (beyond both papers).

Both papers decide per slice against numbers fixed on a validation set: AnoFPDM's cosine threshold
(eq. 18), and Algorithm 1's quantile levels set from M_{t_e}/M_max, which always select between 2 %
and 10 % of the image (before the brain-fraction correction) of every slice called unhealthy. Those
numbers hold for data like the validation set. Under a shift of contrast, bias or resolution every
slice of a case moves together: the cosine threshold then calls all slices healthy (or all
unhealthy), and a small lesion in a slice called unhealthy is drowned by the fixed share of pixels.

A volume gives more to work with: most of its brain voxels are healthy, so the case itself says
what its anomaly map looks like where nothing is wrong. The volume calibration thresholds the
anomaly map (AnoFPDM's aggregated H, eq. 20, channel mean, median filtered, as in
:func:`~AnomalyDiffusionLib.fpdm.segment`) at a robust z-score over **all brain pixels of the case**:
``median + z × 1.4826 × MAD``. A lesion of up to a few tens of percent of the brain hardly moves the
median and MAD, so the level tracks the case's own noise floor whatever the scanner; a slice is
called anomalous when it keeps a mask component after the small-component filter. ``z`` is
calibrated per bundle on development phantoms (``pipeline.volume_z`` in the manifest;
:data:`DEFAULT_Z` for bundles without it; ``training/choose_volume_z.py``), never on evaluation
cases. A bundle may add a FLAIR-hyperintensity gate (``pipeline.volume_flair_z``): a mask pixel must
also be that many robust SDs above the case's brain median on FLAIR
(:func:`robust_standardise`). The anomaly map's tail on a healthy case lies mostly on dark CSF and
tissue edges, the lesions the product targets are bright on FLAIR, and the gate is as
scanner-independent as the level itself. A bundle may also let a pixel whose map passes only a
lower level seed a region when its FLAIR is far above its surroundings
(``pipeline.volume_seed_map_z`` / ``volume_seed_flair_z``, the FLAIR freed of its smooth background
by :func:`local_standardise` with ``pipeline.volume_flair_bias_px``, so a bias field does not seed a
whole bright lobe; see :func:`~AnomalyDiffusionLib.fpdm.volume_segmentation`).

:func:`robust_z` gives the same kind of case-relative score per slice (after a robust regression on
brain area and position) and turns AnoDODE's bpd into ``dode_z``.

Everything here is a pure function of arrays.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MAD_SCALE = 1.4826  # MAD of N(0, 1) is 1 / 1.4826
#: robust z of the case's anomaly map above which a pixel is anomalous, for bundles that store none
DEFAULT_Z = 8.0


def pixel_level(maps: np.ndarray, foreground: np.ndarray, z: float = DEFAULT_Z) -> float:
    """The volume calibration's pixel threshold: median + ``z`` · 1.4826 · MAD of ``maps`` [K, S, S]
    over the brain pixels ``foreground`` [K, S, S] (bool) of every slice of the case. +inf when the
    case has no brain pixel."""
    values = np.asarray(maps, np.float64)[np.asarray(foreground, bool)]
    if values.size == 0:
        return float("inf")
    med = float(np.median(values))
    mad = MAD_SCALE * float(np.median(np.abs(values - med)))
    return med + float(z) * mad


def robust_standardise(values: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """``(values − median) / (1.4826 · MAD)`` with median and MAD over the ``foreground`` pixels
    (any shape, same as ``values``): a case's intensities in units of its own brain's spread, so a
    level means the same under any scanner gain or offset. Zeros when the foreground is empty or
    constant."""
    v = np.asarray(values, np.float64)
    inside = v[np.asarray(foreground, bool)]
    if inside.size == 0:
        return np.zeros_like(v)
    med = float(np.median(inside))
    mad = MAD_SCALE * float(np.median(np.abs(inside - med)))
    return (v - med) / mad if mad > 0 else np.zeros_like(v)


def local_standardise(values: np.ndarray, foreground: np.ndarray, sigma_px: float) -> np.ndarray:
    """:func:`robust_standardise` of ``values`` [K, S, S] after removing each slice's smooth
    background: the brain's own intensity averaged in-plane with a Gaussian of ``sigma_px`` pixels
    (a normalised convolution over the ``foreground`` [K, S, S] only, so the dark outside does not
    pull the rim down). A bias field that varies over a scale well above ``sigma_px`` moves the
    background with the tissue and drops out, while a lesion much smaller than it stands out; a
    global robust z would instead call a whole bright-biased lobe hyperintense. A lesion as large as
    the kernel raises its own background, so this suits small, sharp outliers, not a lesion's extent."""
    v = np.asarray(values, np.float64)
    fg = np.asarray(foreground, bool)
    sig = (0.0, float(sigma_px), float(sigma_px))
    weight = ndimage.gaussian_filter(fg.astype(np.float64), sig, mode="constant")
    total = ndimage.gaussian_filter(np.where(fg, v, 0.0), sig, mode="constant")
    return robust_standardise(v - total / np.maximum(weight, 1e-6), fg)


def slice_covariates(brain_area: np.ndarray, position: np.ndarray) -> np.ndarray:
    """Design matrix [K, 3] for :func:`robust_z`: relative brain area, and the slice position
    rescaled to [-1, 1] with its square (vertex and skull-base slices differ from mid-brain ones)."""
    a = np.asarray(brain_area, float)
    p = np.asarray(position, float)
    a = a / max(float(a.max()), 1e-9)
    span = float(p.max() - p.min())
    u = (p - p.min()) / span * 2.0 - 1.0 if span > 0 else np.zeros_like(p)
    return np.stack([a, u, u * u], 1)


def robust_z(values: np.ndarray, covariates: np.ndarray | None = None, iterations: int = 20) -> np.ndarray:
    """Robust z-score of each value against the population, after a Huber regression on
    ``covariates`` [K, P] (with intercept). Returns [K]; 0 for a constant population.

    Huber's weights (c = 1.345) by iteratively reweighted least squares; the residual scale is
    1.4826 × MAD, so healthy slices give z ~ N(0, 1) and a minority of anomalous ones cannot pull the
    fit or the scale towards themselves.
    """
    y = np.asarray(values, float)
    k = len(y)
    x = np.ones((k, 1)) if covariates is None else np.column_stack([np.ones(k), np.asarray(covariates, float)])
    if k <= x.shape[1] + 2:
        x = np.ones((k, 1))
    w = np.ones(k)
    beta = np.zeros(x.shape[1])
    for _ in range(iterations):
        sw = np.sqrt(w)
        beta, *_ = np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)
        r = y - x @ beta
        s = MAD_SCALE * float(np.median(np.abs(r - np.median(r))))
        if s <= 0:
            break
        u = np.abs(r) / (1.345 * s)
        w_new = np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-12))
        if np.allclose(w_new, w, atol=1e-6):
            break
        w = w_new
    r = y - x @ beta
    s = MAD_SCALE * float(np.median(np.abs(r - np.median(r))))
    if s <= 0:
        return np.zeros(k)
    return (r - np.median(r)) / s
