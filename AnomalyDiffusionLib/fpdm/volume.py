"""AnoFPDM's per-volume decision (beyond the paper, which decides per slice with dataset-level
thresholds): the case's own pixel population sets the level (:mod:`~AnomalyDiffusionLib.selfcal`).
The rule's parameters are chosen on development phantoms by ``training/choose_volume_z.py`` and
stored in a bundle's ``pipeline`` block (``volume_z``, ``volume_flair_z``, ``volume_grow_z``,
``volume_seed_map_z``, ``volume_seed_flair_z``, ``volume_flair_bias_px``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..selfcal import local_standardise, pixel_level, robust_standardise
from .decision import Calibration, Segmentation, remove_small_components, segment
from .forward import ForwardResult


def volume_segmentation(
    res: ForwardResult,
    cal: Calibration,
    z: float,
    flair: np.ndarray | None = None,
    hyper_z: float | None = None,
    grow_z: float | None = None,
    seed_map_z: float | None = None,
    seed_flair_z: float | None = None,
    flair_bias_px: float | None = None,
    components: str = "slice",
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

    ``seed_map_z`` and ``seed_flair_z`` (with ``grow_z`` ≤ ``seed_map_z`` ≤ ``z``) add a second kind
    of seed: a pixel whose map passes the lower level ``seed_map_z`` while its FLAIR is at least
    ``seed_flair_z`` robust SDs above the brain median, or with ``flair_bias_px`` above its own
    surroundings (:func:`~AnomalyDiffusionLib.selfcal.local_standardise`, the FLAIR freed of its smooth
    background, a Gaussian of that many model pixels, so a bias field does not seed a whole bright
    lobe). Small lesions raise the map less than large ones (the 64² map and its median filter spread
    them), so the model's evidence alone misses them; required together, two independent weak signals
    find them without seeding a healthy case's bright spots. The gate stays relative to the whole
    brain: relative to its surroundings, a large, mildly bright lesion raises its own background and
    loses its centre.
    Components no larger than the small-component size (``cal.min_component`` at 128², scaled to the
    model's slice size) are dropped: with ``components="slice"`` (the papers' appendix F) per slice,
    8-connected, before and after the hysteresis; with ``"volume"`` once at the end, as 3D
    26-connected components over the stack (sizes summed over slices). A small lesion cut by the
    64² grid into a few pixels per slice survives the 3D filter (3.8 mL: about 10 pixels on each of
    two slices), while the per-slice filter drops every one of its slices; the 3D hysteresis already
    keeps only regions with a seed, so noise specks have nothing to hang on. ``"seeded"`` is the 3D
    filter and, per slice, drops the small components that hold no seed pixel (map above ``z``, or
    a FLAIR-assisted seed) of their own: a small lesion's slices carry its seeds, while a speck grown
    onto a healthy neighbour slice of a large lesion does not (the per-slice filter dropped it; the 3D
    filter alone keeps it, as connected to the lesion). Returns (Segmentation, info)."""
    if components not in ("slice", "volume", "seeded"):
        raise ValueError(f"components must be 'slice', 'volume' or 'seeded', not {components!r}")
    if grow_z is not None and grow_z > z:
        raise ValueError(f"grow_z ({grow_z}) must not exceed z ({z})")
    if (seed_map_z is None) != (seed_flair_z is None):
        raise ValueError("seed_map_z and seed_flair_z go together")
    if seed_map_z is not None and (grow_z is None or not grow_z <= seed_map_z <= z):
        raise ValueError(f"seed_map_z ({seed_map_z}) needs grow_z <= seed_map_z <= z (grow_z {grow_z}, z {z})")
    if flair_bias_px is not None and seed_map_z is None:
        raise ValueError("flair_bias_px applies to the FLAIR-assisted seeds only: give seed_map_z and seed_flair_z")
    if seed_map_z is not None and flair is None:
        raise ValueError("FLAIR-assisted seeds (seed_map_z, seed_flair_z) need the FLAIR slices")
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
    per_slice = components == "slice"
    masks: np.ndarray = np.stack([remove_small_components(m, min_px) for m in raw]) if len(raw) and per_slice else raw
    seg.thresholds[:] = low
    # the case's FLAIR in robust SDs of its brain: computed once for the gate and the seeds that use it
    flair_z = None if flair is None or (hyper_z is None and seed_map_z is None) else robust_standardise(flair, fg)
    if hyper_z is not None and flair_z is not None:
        masks = masks & (flair_z >= hyper_z)
    # where a region may start: the map above z, or (FLAIR-assisted) above a lower z where FLAIR is bright
    seeds = maps >= level
    if seed_map_z is not None and seed_flair_z is not None and flair is not None and flair_z is not None:
        seed_flair = flair_z if flair_bias_px is None else local_standardise(flair, fg, flair_bias_px)
        seeds = seeds | ((maps >= pixel_level(maps, fg, seed_map_z)) & (seed_flair >= seed_flair_z))
    if grow_z is not None:
        lab, n = ndimage.label(masks, structure=np.ones((3, 3, 3), bool))
        seeded = np.zeros(n + 1, bool)
        seeded[np.unique(lab[masks & seeds])] = True
        seeded[0] = False
        masks = np.asarray(seeded[lab], bool)
    if not len(masks):
        seg.masks = masks
    elif per_slice:
        seg.masks = np.stack([remove_small_components(m, min_px) for m in masks])
    else:
        seg.masks = np.asarray(remove_small_components(masks, min_px), bool)  # 3D components
        if components == "seeded":  # and per slice, no small component without a seed of its own
            seg.masks = np.stack([remove_small_components(m, min_px, s) for m, s in zip(seg.masks, seeds, strict=True)])
    seg.unhealthy = np.asarray(seg.masks.reshape(len(seg.masks), -1).any(1), bool)
    info = {
        "z": float(z),
        "pixel_level": level,
        "slices_unhealthy": int(seg.unhealthy.sum()),
        "components": components,
    }
    if grow_z is not None:
        info.update(grow_z=float(grow_z), grow_level=low)
    if hyper_z is not None:
        info["flair_hyper_z"] = float(hyper_z)
    if seed_map_z is not None and seed_flair_z is not None:
        info.update(seed_map_z=float(seed_map_z), seed_flair_z=float(seed_flair_z))
    if flair_bias_px is not None:
        info["flair_bias_px"] = float(flair_bias_px)
    return seg, info
