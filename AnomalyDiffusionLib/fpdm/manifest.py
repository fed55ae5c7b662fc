"""The ``fpdm`` section of a bundle manifest: its schema (checked when a bundle is opened for this
method), and the section written from a trained model, its settings and calibration."""

from __future__ import annotations

from ..bundle import BundleError, FieldSpec, need_file, require_fields

NAME = "fpdm"
_SECTION: FieldSpec = {
    "weights": str,
    "network": dict,
    "schedule": dict,
    "settings": dict,
    "calibration": dict,
}
_CALIBRATION: FieldSpec = {
    "w": (int, float),
    "cos_threshold": (int, float),
    "m_max": list,
    "a": (int, float),
    "b": (int, float),
    "median_size": int,
    "min_component": int,
}


def validate(m: dict) -> None:
    """Check the ``fpdm`` section of a manifest whose container is already valid; raises
    :class:`~AnomalyDiffusionLib.bundle.BundleError` naming the first problem."""
    mods = m["modalities"]
    f = require_fields(m.get("fpdm"), _SECTION, "fpdm")
    require_fields(f["calibration"], _CALIBRATION, "fpdm.calibration")
    need_file(m, f["weights"], "fpdm.weights")
    mc = f["settings"].get("map_channels")
    n_map = len(mods) if mc is None else len(mc)
    if len(f["calibration"]["m_max"]) != n_map:
        raise BundleError(
            f"manifest: fpdm.calibration.m_max has {len(f['calibration']['m_max'])} value(s) for {n_map} map channel(s)"
        )
    if f["network"].get("in_channels") != len(mods) or f["network"].get("image_size") != m["slice_size"]:
        raise BundleError("manifest: fpdm.network does not match the bundle's modalities/slice_size")


def section(model, schedule, settings, calibration, weights: str = "fpdm.safetensors", **extra) -> tuple[dict, dict]:
    """Manifest section and weight files for an AnoFPDM model: ``({"fpdm": ...}, {file: state})``."""
    sec = {
        "weights": weights,
        "network": model.config.as_dict(),
        "schedule": schedule.as_dict(),
        "settings": settings.as_dict(),
        "calibration": calibration.as_dict(),
        **extra,
    }
    return sec, {weights: model.state_dict()}
