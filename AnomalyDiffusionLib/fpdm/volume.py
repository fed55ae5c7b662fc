"""AnoFPDM's per-volume decision (beyond the paper, which decides per slice with dataset-level
thresholds): the case's own pixel population sets the level (:mod:`~AnomalyDiffusionLib.selfcal`).
The rule's parameters are chosen on development phantoms by ``training/choose_volume_z.py`` and
stored in a bundle's ``pipeline`` block (``volume_z``, ``volume_flair_z``, ``volume_grow_z``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..selfcal import pixel_level, robust_standardise
from .decision import Calibration, Segmentation, remove_small_components, segment
from .forward import ForwardResult


def volume_segmentation(
    res: ForwardResult,
    cal: Calibration,
    z: float,
    flair: np.ndarray | None = None,
    hyper_z: float | None = None,
    grow_z: float | None = None,
) -> tuple[Segmentation, dict]:
    """AnoFPDM masks with the per-volume calibration (:mod:`~AnomalyDiffusionLib.selfcal`): the filtered
    map thresholded at the case's own robust level (median + z · 1.4826 · MAD over all its brain
    pixels); a slice is unhealthy when a component survives.

    ``grow_z`` (< ``z``) makes it a hysteresis threshold in 3D over the stack of analysed slices: a
    region above the lower level ``grow_z`` is kept whole when it holds a pixel above ``z``. The high
    level keeps a healthy case nearly empty, the low one gives a found lesion its extent.

    With ``hyper_z`` and the model-space FLAIR slices ``flair`` [N, S, S], a mask pixel must also be
    FLAIR-hyperintense: its FLAIR at least ``hyper_z`` robust SDs above the case's brain median
    (:func:`~AnomalyDiffusionLib.selfcal.robust_standardise`). The lesions this targets are bright on
    FLAIR, while much of the map's tail on a healthy case lies on dark CSF and tissue edges.
    Components smaller than the small-component size are dropped per slice at the end. Returns
    (Segmentation, info)."""
    if grow_z is not None and grow_z > z:
        raise ValueError(f"grow_z ({grow_z}) must not exceed z ({z})")
    seg = segment(res, cal, classify=False, level=np.inf)  # the filtered maps; masks follow below
    maps = seg.maps
    fg = res.foreground if res.foreground is not None else np.ones(maps.shape, bool)
    level = pixel_level(maps, fg, z)
    low = level if grow_z is None else pixel_level(maps, fg, grow_z)
    min_px = round(cal.min_component * (maps.shape[-1] / 128.0) ** 2)
    # what segment(level=low) gives, without filtering the maps a second time
    raw = np.asarray(maps >= low, bool)
    if cal.foreground_only and res.foreground is not None:
        raw &= res.foreground
    masks: np.ndarray = np.stack([remove_small_components(m, min_px) for m in raw]) if len(raw) else raw
    seg.thresholds[:] = low
    if hyper_z is not None and flair is not None:
        masks = masks & (robust_standardise(flair, fg) >= hyper_z)
    if grow_z is not None:
        lab, n = ndimage.label(masks, structure=np.ones((3, 3, 3), bool))
        seeded = np.zeros(n + 1, bool)
        seeded[np.unique(lab[masks & (maps >= level)])] = True
        seeded[0] = False
        masks = np.asarray(seeded[lab], bool)
    seg.masks = np.stack([remove_small_components(m, min_px) for m in masks]) if len(masks) else masks
    seg.unhealthy = np.asarray(seg.masks.reshape(len(seg.masks), -1).any(1), bool)
    info = {"z": float(z), "pixel_level": level, "slices_unhealthy": int(seg.unhealthy.sum())}
    if grow_z is not None:
        info.update(grow_z=float(grow_z), grow_level=low)
    if hyper_z is not None:
        info["flair_hyper_z"] = float(hyper_z)
    return seg, info
