"""AnoFPDM models from what training and packaging produce: a bundle (folder or zip), a run folder
(its final weights, or the EMA weights of its latest checkpoint) or a single weights file.

:func:`fpdm_from_bundle` builds the network, schedule, settings and calibration from a verified
bundle (:mod:`~AnomalyDiffusionLib.bundle` only reads and checks bytes and schema; this module reads
the ``fpdm`` section, :mod:`~AnomalyDiffusionLib.fpdm.manifest` checks it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..bundle import Bundle, BundleError, is_bundle, open_bundle
from ..diffusion import Schedule
from ..errors import AnomalyDiffusionError
from ..modelio import load_state, load_unet, load_weights
from ..nets import UNet, UNetConfig
from .decision import Calibration
from .forward import FPDMSettings


def load_unet_any(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """Load a UNet from a weights file, a model bundle (folder with ``manifest.json``, or its zip: the
    bundle's AnoFPDM network, so a shipped bundle can be re-calibrated, evaluated and benchmarked), or a
    training run folder: its final ``*.safetensors`` weights if present, else the EMA weights of its
    latest ``checkpoint/`` (to inspect a run that is still training)."""
    p = Path(path)
    if is_bundle(p):
        return _load_bundle_unet(p, device)
    if p.is_file():
        return load_unet(p, device=device)
    if not p.is_dir():
        raise AnomalyDiffusionError(f"model not found: '{p}'")
    finals = sorted(p.glob("fpdm.safetensors"))
    if finals:
        return load_unet(finals[0], device=device)
    ck = p / "checkpoint"
    if not (ck / "state.json").is_file():
        raise AnomalyDiffusionError(f"'{p}' holds neither fpdm.safetensors nor a checkpoint/")
    meta = json.loads((ck / "state.json").read_text())
    cfg = UNetConfig.from_dict(meta["run"]["model"])
    tensors = load_state(ck / "state.safetensors")
    prefix = "ema." if any(k.startswith("ema.") for k in tensors) else "model."
    model = UNet(cfg)
    load_weights(
        model, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, f"checkpoint in '{p}'"
    )
    args = meta["run"].get("args", {})
    mods = [m.strip() for m in str(args.get("modalities", "flair,t2")).split(",")]
    info = {
        "kind": "unet",
        "config": cfg.as_dict(),
        "modalities": mods,
        "iterations": meta["iteration"],
        "method": "fpdm",
        "from_checkpoint": True,
        "fov_mm": args.get("fov_mm"),
    }
    return model.to(device).eval(), info


def _load_bundle_unet(path: Path, device: str | torch.device) -> tuple[UNet, dict]:
    b = open_bundle(path)
    model, _, settings, cal = fpdm_from_bundle(b, device)
    f = b.manifest["fpdm"]
    info = {
        "kind": "unet",
        "config": model.config.as_dict(),
        "modalities": b.modalities,
        "iterations": f.get("trained_iterations"),
        "method": "fpdm",
        "fov_mm": b.slice_fov_mm,
        "bundle": {"name": b.name, "sha256": b.sha256, "settings": settings.as_dict(), "calibration": cal.as_dict()},
    }
    return model, info


def fpdm_from_bundle(b: Bundle, device: str | torch.device = "cpu") -> tuple[UNet, Schedule, FPDMSettings, Calibration]:
    """``(unet, schedule, settings, calibration)`` for AnoFPDM from a verified bundle.

    Settings the bundle predates take the behaviour it was calibrated with
    (:data:`~AnomalyDiffusionLib.fpdm.STORED_DEFAULTS`: no clamp of the predictions, uniform cosine
    weights), not today's defaults."""
    if "fpdm" not in b.methods:
        raise BundleError(f"bundle '{b.name}' holds no AnoFPDM model (methods: {b.methods})")
    f = b.manifest["fpdm"]
    try:
        cfg = UNetConfig.from_dict(f["network"])
        sch = f["schedule"]
        schedule = Schedule(
            steps=int(sch["steps"]), beta_start=float(sch["beta_start"]), beta_end=float(sch["beta_end"])
        )
        # settings stored before clip_denoised / cosine_weighting existed were calibrated without
        # the clamp and with uniform weights: from_dict reads their absence as exactly that
        settings = FPDMSettings.from_dict(f["settings"])
        cal_d = dict(f["calibration"])
        cal = Calibration(**{k: cal_d[k] for k in Calibration.__dataclass_fields__ if k in cal_d})
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"bundle '{b.name}': invalid fpdm section ({exc})") from None
    if sch.get("kind", "linear") != "linear":
        raise BundleError(f"bundle '{b.name}': unsupported diffusion schedule {sch.get('kind')!r}")
    model = UNet(cfg)
    load_weights(model, b.tensors(f["weights"]), what=f"'{f['weights']}' in bundle '{b.name}'")
    return model.to(device).eval(), schedule, settings, cal
