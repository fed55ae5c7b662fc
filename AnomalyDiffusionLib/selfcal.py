"""Per-volume self-calibration: decisions from a case's own slice population (beyond both papers).

Both papers decide per slice against thresholds fixed on a validation set: AnoFPDM's cosine threshold
(eq. 18) and M_max of Algorithm 1, AnoDODE's bpd threshold. Those numbers hold for data like the
validation set and fail under a shift of contrast, bias or resolution, which moves every slice of a
case together. A volume gives more to work with: most of its slices are healthy, so the case itself
says what "normal" looks like on this scanner.

- :func:`robust_z`: robust z-scores of a per-slice statistic after a robust (Huber) regression on
  the slice's brain area and axial position, which explain most of its healthy variation (small
  slices near the vertex or skull base look different from mid-brain slices). Scale = 1.4826 × MAD
  of the residuals, so a healthy population is N(0, 1) whatever the scanner.
- :func:`volume_decision`: AnoFPDM slice calls as outliers of the case's own cosine (low) and
  M_{t_e} (high) populations, at a z fixed in advance (:data:`Z_SLICE`, the Iglewicz–Hoaglin
  modified-z cut of 3.5), not tuned on any evaluation data.
- :func:`volume_levels`: Algorithm 1's pixel level from the case: the pixel threshold is at least a
  high quantile of the maps over the brain of the slices called healthy (the case's null
  distribution), so a case whose maps are globally higher needs more evidence per pixel.

Everything here is a pure function of per-slice arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: robust z above which a slice is an outlier of its case (Iglewicz & Hoaglin's modified-z cut)
Z_SLICE = 3.5
#: the case's healthy-slice map quantile a pixel must reach to be segmented (volume mode)
NULL_QUANTILE = 0.995
#: fewer analysed slices than this and the population is too small to trust: fall back to the bundle
MIN_SLICES = 12
MAD_SCALE = 1.4826  # MAD of N(0, 1) is 1 / 1.4826


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


@dataclass
class VolumeDecision:
    """Per-slice volume-mode calls and the evidence behind them (all [K])."""

    unhealthy: np.ndarray  #: bool
    z_cosine: np.ndarray  #: robust z of the cosine's shortfall (large: guided and unguided diverge)
    z_m: np.ndarray  #: robust z of log mean M_{t_e} (large: a large difference at t_e)
    fallback: bool = False  #: too few slices: the bundle's decision was used instead


def volume_decision(
    cosine: np.ndarray,
    m_te: np.ndarray,
    brain_area: np.ndarray,
    position: np.ndarray,
    bundle_unhealthy: np.ndarray,
    z_threshold: float = Z_SLICE,
) -> VolumeDecision:
    """AnoFPDM slice calls from the case's own population.

    ``cosine`` [K] (eq. 18), ``m_te`` [K, C] (M_{t_e} per map channel), ``brain_area`` [K] (mm²),
    ``position`` [K] (mm, superior), ``bundle_unhealthy`` [K] (the papers' call, used when the case has
    fewer than :data:`MIN_SLICES` slices). A slice is unhealthy when the larger of its two robust z
    (cosine shortfall, log M_{t_e}) reaches ``z_threshold``.
    """
    k = len(cosine)
    if k < MIN_SLICES:
        zero = np.zeros(k)
        return VolumeDecision(np.asarray(bundle_unhealthy, bool), zero, zero, fallback=True)
    x = slice_covariates(brain_area, position)
    z_cos = robust_z(-np.asarray(cosine, float), x)
    m = np.log(np.maximum(np.asarray(m_te, float).reshape(k, -1).mean(1), 1e-12))
    z_m = robust_z(m, x)
    unhealthy = np.maximum(z_cos, z_m) >= z_threshold
    return VolumeDecision(unhealthy, z_cos, z_m)


def volume_m_max(m_te: np.ndarray, unhealthy: np.ndarray, bundle_m_max: list[float]) -> list[float]:
    """Algorithm 1's M_max for this case: the largest M_{t_e} per channel over the case's unhealthy
    slices (the paper takes it over the validation set's), never below the bundle's. [C]"""
    m = np.asarray(m_te, float).reshape(len(m_te), -1)
    if not np.any(unhealthy):
        return [float(v) for v in bundle_m_max]
    own = m[np.asarray(unhealthy, bool)].max(0)
    return [float(max(a, b)) for a, b in zip(own, bundle_m_max, strict=True)]


def null_threshold(
    maps: np.ndarray, foreground: np.ndarray, healthy: np.ndarray, quantile: float = NULL_QUANTILE
) -> float | None:
    """The case's null level: the ``quantile`` of the (filtered, channel-mean) maps [K, S, S] over
    the brain pixels ([K, S, S] bool) of the slices called healthy ([K] bool). None when there are
    no healthy brain pixels."""
    sel = np.asarray(healthy, bool)
    if not sel.any():
        return None
    values = maps[sel][foreground[sel]]
    if values.size == 0:
        return None
    return float(np.quantile(values, quantile))
