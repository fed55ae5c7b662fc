"""The ``fpdm`` section of a bundle manifest: its schema (checked when a bundle is opened for this
method), and the section written from a trained model, its settings and calibration."""

from __future__ import annotations

from ..bundle import BundleError, check_schema, load_schema, need_file

NAME = "fpdm"
#: JSON Schema (draft 2020-12) of the section: types, required keys and ranges
SCHEMA = (__package__, "manifest.schema.json")


def validate(m: dict) -> None:
    """Check the ``fpdm`` section of a manifest whose container is already valid: its JSON Schema
    (``fpdm/manifest.schema.json``), then what a schema cannot say (sizes that must agree with the
    container, weights listed under files). Raises :class:`~AnomalyDiffusionLib.bundle.BundleError`
    naming the first problem."""
    mods = m["modalities"]
    f = check_schema(m.get("fpdm"), load_schema(*SCHEMA), "fpdm")
    need_file(m, f["weights"], "fpdm.weights")
    mc = f["settings"].get("map_channels")
    n_map = len(mods) if mc is None else len(mc)
    if mc is not None and max(mc) >= len(mods):
        raise BundleError(f"manifest: fpdm.settings.map_channels {mc} name channels beyond the modalities {mods}")
    if len(f["calibration"]["m_max"]) != n_map:
        raise BundleError(
            f"manifest: fpdm.calibration.m_max has {len(f['calibration']['m_max'])} value(s) for {n_map} map channel(s)"
        )
    if f["network"]["in_channels"] != len(mods) or f["network"]["image_size"] != m["slice_size"]:
        raise BundleError("manifest: fpdm.network does not match the bundle's modalities/slice_size")


def section(
    model, schedule, settings, calibration, weights: str = "models/fpdm.safetensors", **extra
) -> tuple[dict, dict]:
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
