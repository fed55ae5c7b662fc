"""AnoFPDM's decision: slice classification by the cosine of eq. 18, Algorithm 1's per-slice level
from M_{t_e} (eq. 21) and M_max, masks, and the choices a calibration makes (threshold, w*).

Equation numbers refer to Che et al., "AnoFPDM" (``../shared/papers/003_*.txt``). The forward process
that produces the per-slice statistics is :mod:`~AnomalyDiffusionLib.fpdm.forward`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from .forward import CALIBRATION_FIELDS, ForwardResult, FPDMSettings


@dataclass
class Calibration:
    """Values chosen on a validation set with image-level labels only (section 4.2, Algorithm 1)."""

    w: float
    cos_threshold: float  #: slice is unhealthy when cos(MSEʰ, MSE^∅) ≤ this
    m_max: list[float]  #: largest M_{t_e} per map channel on validation
    a: float = 0.90
    b: float = 0.98
    median_size: int = 5  #: median filter on the map before thresholding (appendix F); 0/1 = off
    min_component: int = 40  #: components of ≤ this many pixels at 128² are removed (appendix F)
    #: zero the maps outside the brain (x_0 > −0.95 in any map channel, the reference code's
    #: foreground) before the quantile. The reference takes the quantile over all pixels and relies
    #: on a trained model predicting the flat background exactly (H ≈ 0 there); this makes that
    #: explicit, so under-trained or off-domain models do not threshold background noise.
    foreground_only: bool = True
    #: mean brain fraction of the validation slices (image-level labels only). When set together with
    #: ``foreground_only``, Algorithm 1's level q (a share of the whole image) is applied to the brain
    #: pixels instead: level = 1 − (1 − q)/brain_fraction. At the calibration field of view this selects
    #: the same number of pixels as the paper; on a scan with a wider field of view (a smaller brain in
    #: the slice) it still selects the same share of brain rather than background zeros.
    brain_fraction: float | None = None
    extra: dict = field(default_factory=dict)
    #: the forward-process settings the threshold and M_max were calibrated with
    #: (:meth:`FPDMSettings.calibration_dict`); None for calibrations stored before this field existed
    settings: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def quantile_level(m_te: float, m_max: float, a: float = 0.90, b: float = 0.98) -> float:
    """Algorithm 1: quantile for one input. Larger M_{t_e} (a larger anomaly) → lower quantile.

    ``range = reverse(linspace(a, b, 101)); index = round(clamp(M_te / M_max, 0, 1), 2) · 100``.
    """
    levels = np.linspace(a, b, 101)[::-1]
    ms = float(np.clip(m_te / m_max, 0.0, 1.0)) if m_max > 0 else 1.0
    return float(levels[int(np.round(np.round(ms, 2) * 100))])


def remove_small_components(mask: np.ndarray, max_size: int, seeds: np.ndarray | None = None) -> np.ndarray:
    """Drop components with ≤ ``max_size`` pixels (appendix F): 8-connected in a 2D mask, 26-connected
    in a 3D stack [N, S, S]. A component holding a pixel of ``seeds`` (bool, same shape) is kept
    whatever its size."""
    if max_size <= 0 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    index = np.arange(1, n + 1)
    big = ndimage.sum_labels(mask, labels, index=index) > max_size
    if seeds is not None:
        big |= ndimage.maximum(np.asarray(seeds, bool), labels, index=index) > 0
    keep = np.concatenate([[False], big])
    return keep[labels]


@dataclass
class Segmentation:
    """Per-slice decisions: ``unhealthy`` [N] bool, ``maps`` [N, S, S] (channel mean, median
    filtered), ``masks`` [N, S, S] bool, ``thresholds`` [N] (Q*), ``quantiles`` [N, C']."""

    unhealthy: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    thresholds: np.ndarray
    quantiles: np.ndarray


def classify_slices(result: ForwardResult, cal: Calibration) -> np.ndarray:
    """Eq. 18: a slice is called unhealthy when the cosine of its two MSE sequences is ≤ the
    calibrated threshold. Returns [N] bool."""
    return np.asarray(result.cosine) <= cal.cos_threshold


def segment(
    result: ForwardResult,
    cal: Calibration,
    use: str = "h",
    classify: bool = True,
    unhealthy: np.ndarray | None = None,
    level: float | None = None,
) -> Segmentation:
    """Threshold maps into masks, as in the reference code.

    With ``cal.foreground_only`` the maps are first zeroed outside the brain (and masks kept inside
    it). Per channel c: quantile q_c by Algorithm 1 from M_{t_e,c} and M_max,c; Q_c = quantile(H_c, q_c)
    over all pixels (with ``cal.brain_fraction``: over the brain pixels, at the level that selects the
    same share of the image at the calibration field of view). Q* = mean_c Q_c. The channel-mean map
    is median filtered (``median_size``,
    reflect) and thresholded at Q*; components ≤ ``min_component`` pixels (scaled from 128² to the
    slice size) are removed. ``use="s_te"`` segments S_{t_e} instead of H. With ``classify``, slices
    whose cosine is above the calibrated threshold are called healthy and get an empty mask.
    ``unhealthy`` [N] bool replaces that call; ``level`` replaces Algorithm 1: every slice is
    thresholded at this value of the filtered map (the volume calibration of
    :mod:`~AnomalyDiffusionLib.selfcal`; ``quantiles`` are then NaN).
    """
    maps_c = result.h if use == "h" else result.s_te
    if cal.foreground_only and result.foreground is not None:
        maps_c = maps_c * result.foreground[:, None]
    n, c, s, _ = maps_c.shape
    if len(cal.m_max) != c:
        raise ValueError(f"calibration has M_max for {len(cal.m_max)} channel(s), maps have {c}")
    if unhealthy is not None:
        unhealthy = np.asarray(unhealthy, bool)
    else:
        unhealthy = classify_slices(result, cal) if classify else np.ones(n, bool)
    min_px = round(cal.min_component * (s / 128.0) ** 2)
    q = np.zeros((n, c), np.float32)
    thr = np.zeros(n, np.float32)
    maps = maps_c.mean(1)
    masks = np.zeros((n, s, s), bool)
    for i in range(n):
        if level is not None:  # one level for the whole case instead of Algorithm 1's quantiles
            q[i] = np.nan
            thr[i] = level
        else:
            for j in range(c):
                q[i, j] = quantile_level(float(result.m_te[i, j]), float(cal.m_max[j]), cal.a, cal.b)
        if level is not None:
            pass
        elif cal.foreground_only and cal.brain_fraction and result.foreground is not None:
            fg = result.foreground[i]
            if not fg.any():
                continue  # no brain in this slice: empty mask
            lv = np.clip(1.0 - (1.0 - q[i]) / cal.brain_fraction, 0.0, 1.0)
            thr[i] = np.mean([np.quantile(maps_c[i, j][fg], lv[j]) for j in range(c)])
        else:
            thr[i] = np.mean([np.quantile(maps_c[i, j], q[i, j]) for j in range(c)])
        if cal.median_size > 1:
            maps[i] = ndimage.median_filter(maps[i], size=cal.median_size, mode="reflect")
        if unhealthy[i]:
            raw = maps[i] >= thr[i]
            if cal.foreground_only and result.foreground is not None:
                raw &= result.foreground[i]  # outside the brain is never anomalous
            masks[i] = remove_small_components(raw, min_px)
    return Segmentation(unhealthy=unhealthy, maps=maps, masks=masks, thresholds=thr, quantiles=q)


# ----------------------------------------------------------------------------------- calibration
def best_cosine_threshold(cosine: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Threshold on the cosine (unhealthy if ≤) maximising accuracy; returns (threshold, accuracy).

    Candidates are midpoints between consecutive sorted values (plus both ends), so the threshold
    generalises rather than sitting on a validation sample.
    """
    c = np.asarray(cosine, float)
    y = np.asarray(labels).astype(bool)
    v = np.unique(c)
    cands = np.concatenate([[v[0] - 1e-6], (v[:-1] + v[1:]) / 2, [v[-1] + 1e-6]])
    acc = np.array([np.mean((c <= th) == y) for th in cands])
    k = int(np.argmax(acc))
    return float(cands[k]), float(acc[k])


def select_guidance(
    cosines: dict[float, np.ndarray], labels: np.ndarray, tolerance: float = 0.99
) -> tuple[float, dict[float, dict[str, float]]]:
    """Section 4.2: per candidate w the accuracy-maximising cosine threshold; w* = the largest w whose
    accuracy is within ``tolerance`` (99 %) of the best. Returns (w*, table per w)."""
    table = {}
    for w in sorted(cosines):
        th, acc = best_cosine_threshold(cosines[w], labels)
        table[w] = {"threshold": th, "accuracy": acc}
    best = max(v["accuracy"] for v in table.values())
    w_star = max(w for w, v in table.items() if v["accuracy"] >= tolerance * best)
    return w_star, table


def extend_guidance_grid(
    table: dict[float, dict[str, float]], factor: float = 1.5, cap: float = 40.0, per_round: int = 2
) -> list[float] | None:
    """Next guidance candidates when the grid search of :func:`select_guidance` ran off its top end.

    ``table``: w → {"accuracy": ...} (as :func:`select_guidance` returns). While the largest candidate
    holds the best accuracy (still rising, or level with the best: the accuracy has not fallen yet, so a
    larger w may do as well or better), returns up to ``per_round`` new candidates, each ``factor`` ×
    the last (1 after w = 0), capped at ``cap``; otherwise (the accuracy fell below the best at the top,
    or the cap is reached) None. The paper chose w = 2 for BraTS but w = 30 for ATLAS, hence a
    cap above 30. M_t grows as (1 + w)² (eq. 13), so M_max is taken at the w finally chosen.
    """
    ws = sorted(float(w) for w in table)
    acc = [float(table[w]["accuracy"]) for w in ws]
    top = ws[-1]
    if top >= cap or acc[-1] < max(acc):
        return None
    out: list[float] = []
    w = top
    for _ in range(per_round):
        w = min(w * factor if w > 0 else 1.0, cap)
        out.append(w)
        if w >= cap:
            break
    return out


def calibration_mismatches(settings: FPDMSettings, cal: Calibration, calibrated_stride: int | None = None) -> list[str]:
    """One sentence per forward-process setting in ``settings`` that differs from the one ``cal`` was
    calibrated with (:data:`CALIBRATION_FIELDS`); an empty list when all agree.

    Calibrations stored before :attr:`Calibration.settings` existed know only their w and, where a
    bundle recorded it, ``calibrated_stride``; only these are compared then.
    """
    known = dict(cal.settings) if cal.settings is not None else {}
    known.setdefault("w", cal.w)
    if cal.settings is None and calibrated_stride is not None:
        known["stride"] = int(calibrated_stride)
    now = settings.calibration_dict()

    def norm(name: str, d: dict):
        v = d.get(name)
        if name == "cosine_steps":  # None = every step: compare the horizon itself
            steps = d.get("steps", settings.steps)
            return steps if v is None else min(int(v), int(steps))
        if name == "map_channels":
            return None if v is None else [int(c) for c in v]
        if name == "w":
            return None if v is None else float(v)
        return v

    labels = {
        "w": "guidance w",
        "steps": "forward steps",
        "stride": "stride",
        "mode": "mode",
        "unguided": "unguided prediction",
        "map_channels": "map channels",
        "clip_x0": "clip_x0 (x̃_0 clamp in the DDIM inversion)",
        "clip_denoised": "clip_denoised (clamp of the predictions)",
        "gap": "gap",
        "cosine_steps": "cosine horizon",
        "cosine_weighting": "cosine weighting",
    }
    out = []
    for name in CALIBRATION_FIELDS:
        if name not in known:
            continue
        a, b = norm(name, now), norm(name, {**known, "steps": known.get("steps", settings.steps)})
        if a != b:
            what = "cosine threshold" if name in ("cosine_steps", "cosine_weighting") else "cosine threshold and M_max"
            fmt = (lambda v: f"{v:g}") if name == "w" else str
            out.append(
                f"AnoFPDM {labels[name]} {fmt(a)} differs from the {labels[name]} {fmt(b)} the bundle was "
                f"calibrated with; its {what} may not hold"
            )
    return out


def m_max_from(result: ForwardResult, labels: np.ndarray | None = None) -> list[float]:
    """M_max per channel: the largest M_{t_e} over the (image-level) unhealthy validation slices
    (all slices when no label says unhealthy)."""
    sel = np.asarray(labels).astype(bool) if labels is not None and np.any(labels) else np.ones(len(result.m_te), bool)
    return [float(v) for v in result.m_te[sel].max(0)]
