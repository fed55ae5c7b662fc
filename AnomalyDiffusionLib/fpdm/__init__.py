"""AnoFPDM (Che et al.): anomaly segmentation from the forward process of a classifier-free-guided DDPM.

Modules, in data-flow order:

* ``forward``: the forward process (settings, eqs. 2/4 encoding, M_t eq. 12, maps eqs. 19-21, the
  MSE sequences and their cosine eq. 18); per-slice statistics only.
* ``decision``: what is decided from them: slice classes, Algorithm 1's level, masks, and the
  choices a calibration makes (cosine threshold, w*, M_max), bound to the settings they hold for.
* ``volume``: the per-volume decision (the case's own pixel population sets the level).
* ``calibrate``: the dataset-level calibration from image-level labels (section 4.2).
* ``manifest`` / ``model``: the method's bundle section and its model loaders (bundles, run folders).
* ``method``: the method as the pipeline runs it (:class:`~AnomalyDiffusionLib.fpdm.method.AnoFPDM`).

The maths of ``forward``, ``decision`` and ``volume`` is re-exported here.
"""

from .decision import (
    Calibration,
    Segmentation,
    best_cosine_threshold,
    calibration_mismatches,
    classify_slices,
    extend_guidance_grid,
    m_max_from,
    quantile_level,
    remove_small_components,
    segment,
    select_guidance,
)
from .forward import (
    CALIBRATION_FIELDS,
    STORED_DEFAULTS,
    ForwardResult,
    FPDMSettings,
    _cosine,
    channel_indices,
    check_input,
    cosine_weights,
    forward_process,
    forward_process_multi,
    sequence_cosine,
)
from .volume import volume_segmentation

__all__ = [
    "CALIBRATION_FIELDS",
    "STORED_DEFAULTS",
    "Calibration",
    "FPDMSettings",
    "ForwardResult",
    "Segmentation",
    "_cosine",
    "best_cosine_threshold",
    "calibration_mismatches",
    "channel_indices",
    "check_input",
    "classify_slices",
    "cosine_weights",
    "extend_guidance_grid",
    "forward_process",
    "forward_process_multi",
    "m_max_from",
    "quantile_level",
    "remove_small_components",
    "segment",
    "select_guidance",
    "sequence_cosine",
    "volume_segmentation",
]
