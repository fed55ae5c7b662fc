"""Networks from stored weights: single safetensors files (never pickle), run folders and bundles.

The file's header metadata holds ``{"kind": ..., "config": {...}, ...}`` as JSON, so a weights file
is self-describing: :func:`load_unet` rebuilds the architecture from it and loads strictly
(:func:`load_weights`), with a message naming the mismatch when weights and configuration disagree.
:func:`fpdm_from_bundle` builds the AnoFPDM network, schedule, settings and calibration from a
verified bundle (:mod:`~AnomalyDiffusionLib.bundle` only reads and checks bytes and schema);
:func:`load_unet_any` takes a weights file, a run folder or a bundle. The AnoDODE counterparts are
in :mod:`~AnomalyDiffusionLib.dode.model`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .bundle import Bundle, BundleError, is_bundle, open_bundle
from .diffusion import Schedule, UNet, UNetConfig
from .errors import AnomalyDiffusionError
from .fpdm import Calibration, FPDMSettings


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str = "weights") -> None:
    """Strict load with a message that says which tensors do not fit (another config, another model)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} tensor(s) of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
            )
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise AnomalyDiffusionError(f"{what} do not fit this model configuration: {'; '.join(parts)}")
    model.load_state_dict(state, strict=True)


def save_weights(model: nn.Module, path: str | os.PathLike, meta: dict) -> Path:
    """Write ``model``'s state dict and ``meta`` (JSON-serialisable) to ``path`` atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"anomaly_diffusion": json.dumps(meta)})
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata stored in a weights file."""
    p = Path(path)
    if not p.is_file():
        raise AnomalyDiffusionError(f"weights file not found: '{p}'")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise AnomalyDiffusionError(f"'{p}' is not a readable safetensors file ({exc})") from None
    if "anomaly_diffusion" not in meta:
        raise AnomalyDiffusionError(f"'{p}' has no AnomalyDiffusion metadata (not written by this library)")
    return json.loads(meta["anomaly_diffusion"])


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def save_unet(model: UNet, path: str | os.PathLike, **meta) -> Path:
    return save_weights(model, path, {"kind": "unet", "config": model.config.as_dict(), **meta})


def load_unet(
    path: str | os.PathLike, expect: UNetConfig | None = None, device: str | torch.device = "cpu"
) -> tuple[UNet, dict]:
    """Rebuild a UNet from a weights file; with ``expect``, refuse a file trained with another config."""
    meta = read_meta(path)
    if meta.get("kind") != "unet":
        raise AnomalyDiffusionError(f"'{path}' holds a {meta.get('kind')!r} network, not a diffusion UNet")
    cfg = UNetConfig.from_dict(meta["config"])
    if expect is not None and cfg != expect:
        diff = {k: (v, getattr(expect, k)) for k, v in cfg.__dict__.items() if getattr(expect, k) != v}
        raise AnomalyDiffusionError(f"'{path}' was trained with another UNet configuration: {diff} (file, expected)")
    model = UNet(cfg)
    load_weights(model, load_state(path), what=f"weights in '{path}'")
    return model.to(device).eval(), meta


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
