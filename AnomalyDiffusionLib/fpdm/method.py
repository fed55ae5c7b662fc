"""AnoFPDM as the pipeline runs it: the forward process of every analysed slice (or of the slices
AnoDODE flags, with ``gate="dode"``), then both decisions: the papers' (``bundle``: the calibrated
cosine threshold of eq. 18 and Algorithm 1's level from M_max) and the per-volume one (``volume``:
:func:`~AnomalyDiffusionLib.fpdm.volume.volume_segmentation` with the bundle's rule). The one
selected by ``--calibration`` (default: the bundle's ``pipeline.calibration``) gives the masks;
both are recorded."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import ClassVar

import numpy as np

from ..devices import for_inference
from ..errors import InputError
from ..method import UNINFORMATIVE_FRACTION, MethodResult, SliceInputs
from ..options import DetectOptions
from ..progress import report
from ..selfcal import DEFAULT_Z
from . import manifest
from .decision import Calibration, Segmentation, calibration_mismatches, segment
from .forward import ForwardResult, FPDMSettings, forward_process
from .model import fpdm_from_bundle
from .volume import volume_segmentation

log = logging.getLogger(__name__)


def run_settings(settings: FPDMSettings, opt: DetectOptions) -> FPDMSettings:
    """The bundle's settings with the user's overrides (``--faithful``: every step, no early stop)."""
    over = {}
    for name in ("w", "steps", "stride", "gap", "mode", "early_stop", "batch_size"):
        v = getattr(opt, name)
        if v is not None:
            over[name] = v
    if opt.faithful:
        over.update(stride=1, early_stop=False)
    try:
        return replace(settings, **over)
    except ValueError as exc:
        raise InputError(f"invalid AnoFPDM option: {exc}") from None


def reliability(res: ForwardResult, cal: Calibration, segs: Mapping[str, Segmentation]) -> dict:
    """How far the case lies from the bundle's calibration: the share of slices the bundle's cosine
    threshold calls unhealthy, the case's median cosine and M_{t_e} against the threshold and M_max,
    and whether the volume decision flags too many slices to mean anything."""
    n = len(res.cosine)
    med_m = np.median(res.m_te, 0)
    out: dict = {
        "median_cosine": round(float(np.median(res.cosine)), 5),
        "bundle_cos_threshold": round(float(cal.cos_threshold), 5),
        "median_m_te": [round(float(v), 5) for v in med_m],
        "bundle_m_max": [round(float(v), 5) for v in cal.m_max],
        "bundle_fraction_unhealthy": round(float(segs["bundle"].unhealthy.mean()), 3) if n else 0.0,
        "volume_fraction_unhealthy": round(float(segs["volume"].unhealthy.mean()), 3) if "volume" in segs else None,
    }
    messages = []
    if n and np.median(res.cosine) <= cal.cos_threshold:
        messages.append(
            f"AnoFPDM: the bundle's cosine threshold ({cal.cos_threshold:.3f}) calls most slices of this case "
            f"unhealthy (median cosine {np.median(res.cosine):.3f}): the case is unlike the bundle's calibration data"
        )
    elif n and np.any(med_m > np.asarray(cal.m_max)):
        messages.append(
            "AnoFPDM: the typical slice of this case has a larger M_t_e than any calibration slice "
            f"({', '.join(f'{v:.3f}' for v in med_m)} vs M_max {', '.join(f'{v:.3f}' for v in cal.m_max)})"
        )
    vol = out["volume_fraction_unhealthy"]
    if vol is not None and vol > UNINFORMATIVE_FRACTION:
        messages.append(
            f"AnoFPDM: the volume calibration finds anomalies on {vol:.0%} of the brain slices, which says little "
            "about where a lesion is (a diffuse change, or a case unlike the bundle's training data)"
        )
    out["messages"] = messages
    return out


class AnoFPDM:
    """Che et al.'s AnoFPDM: masks from the forward process of a classifier-free-guided DDPM."""

    name: ClassVar[str] = "fpdm"
    title: ClassVar[str] = "AnoFPDM"

    def validate(self, m: dict) -> None:
        manifest.validate(m)

    def run(self, inp: SliceInputs, earlier: Mapping[str, MethodResult]) -> MethodResult:
        b, opt = inp.bundle, inp.options
        pipe = b.manifest.get("pipeline", {})
        unet, schedule, settings, cal = fpdm_from_bundle(b, inp.device)
        for_inference(unet, inp.device)
        st = run_settings(settings, opt)
        # the cosine threshold and M_max hold for the settings they were calibrated with only
        warnings = calibration_mismatches(st, cal, b.manifest["fpdm"].get("calibrated_stride"))
        mode = opt.calibration or pipe.get("calibration", "bundle")
        if mode not in ("bundle", "volume"):
            raise InputError(f"calibration must be 'bundle' or 'volume', not {mode!r}")
        if opt.cos_threshold is not None:
            if mode == "volume":
                raise InputError(
                    "--cos-threshold sets the bundle calibration's slice threshold; "
                    "use it with --calibration bundle (volume calibration decides from the case's own slices)"
                )
            cal = replace(cal, cos_threshold=float(opt.cos_threshold))
        gate = "none" if opt.faithful else (opt.gate or pipe.get("gate", "none"))
        if gate not in ("none", "dode"):
            raise InputError(f"gate must be 'none' or 'dode', not {gate!r}")
        if gate == "dode" and mode == "volume":
            raise InputError(
                "volume calibration needs the forward process of every brain slice; use --gate none "
                "or --calibration bundle"
            )
        k = len(inp.indices)
        shortcuts = []
        run = np.ones(k, bool)
        if gate == "dode":
            dode = earlier.get("dode")
            if dode is None or dode.flags is None:
                raise InputError("gate 'dode' needs the AnoDODE method (use --methods fpdm,dode or --gate none)")
            flag = dode.flags
            run = flag | np.roll(flag, 1) | np.roll(flag, -1)  # flagged slices ± 1
            run[0] |= flag[0]
            shortcuts.append("AnoFPDM only on slices flagged by AnoDODE (± 1 neighbour)")
        if st.stride > 1:
            shortcuts.append(f"AnoFPDM step stride {st.stride} ({len(st.visited)} of {st.steps} steps)")
        if st.early_stop:
            shortcuts.append("AnoFPDM early stop after the M_t peak")
        size = b.slice_size
        maps = np.zeros((k, size, size), np.float32)
        masks = np.zeros_like(maps, dtype=bool)
        sel = np.flatnonzero(run)
        map_mods = [b.modalities[c] for c in (st.map_channels or range(len(b.modalities)))]
        columns: list[dict] = [{"fpdm_ran": False} for _ in range(k)]
        extras: dict = {}
        vol_info = None
        rel = None
        calls = 0
        if len(sel):
            report(inp.progress, "fpdm", 0.0, f"forward process on {len(sel)} slices")
            res = forward_process(
                unet,
                inp.images[sel],
                st,
                schedule,
                seed=opt.seed,
                device=inp.device,
                cos_threshold=cal.cos_threshold,
                progress=inp.progress,
                cancel=inp.cancel,
            )
            segs = {"bundle": segment(res, cal)}
            if gate == "none":  # the volume level needs every brain slice's forward process

                def opt_float(key: str) -> float | None:  # the rule's optional parts
                    return None if pipe.get(key) is None else float(pipe[key])

                segs["volume"], vol_info = volume_segmentation(
                    res,
                    cal,
                    float(pipe.get("volume_z", DEFAULT_Z)),
                    flair=inp.images[sel][:, b.modalities.index("flair")],
                    hyper_z=opt_float("volume_flair_z"),
                    grow_z=opt_float("volume_grow_z"),
                    seed_map_z=opt_float("volume_seed_map_z"),
                    seed_flair_z=opt_float("volume_seed_flair_z"),
                    flair_bias_px=opt_float("volume_flair_bias_px"),
                    components=str(pipe.get("volume_components", "slice")),
                )
            seg = segs[mode]
            extras["fpdm_forward"] = res  # for evaluation scripts that re-decide without re-running
            extras["fpdm_calibration"] = cal
            maps[sel] = seg.maps
            masks[sel] = seg.masks
            for name, sg in segs.items():
                full = np.zeros_like(masks)
                full[sel] = sg.masks
                extras.setdefault("fpdm_model_masks", {})[name] = full
            for j, i in enumerate(sel):
                row = columns[i]
                row["fpdm_ran"] = True
                row["fpdm_cosine"] = round(float(res.cosine[j]), 7)
                row["fpdm_unhealthy"] = bool(seg.unhealthy[j])
                for name, sg in segs.items():
                    row[f"fpdm_unhealthy_{name}"] = bool(sg.unhealthy[j])
                for c, m in enumerate(map_mods):
                    row[f"fpdm_t_e_{m}"] = int(res.t_e[j, c]) + 1  # paper steps are 1-based
                    row[f"fpdm_m_te_{m}"] = float(f"{res.m_te[j, c]:.6g}")
                row["fpdm_q_star"] = float(f"{seg.thresholds[j]:.6g}")
            calls = res.network_calls
            rel = reliability(res, cal, segs)
        flags = np.array([bool(c.get("fpdm_unhealthy", False)) for c in columns])
        return MethodResult(
            name=self.name,
            columns=columns,
            flags=flags,
            maps=maps,
            masks=masks,
            summary={
                "settings": st.as_dict(),
                "calibration_mode": mode,
                "calibration": cal.as_dict(),
                "volume_calibration": None
                if vol_info is None
                else {key: v for key, v in vol_info.items() if key not in ("z_cosine", "z_m")},
                "gate": gate,
                "slices_run": len(sel),
                "network_calls": int(calls),
            },
            reliability=rel,
            shortcuts=shortcuts,
            warnings=warnings,
            extras=extras,
        )

    def localise(self, inp: SliceInputs, result: MethodResult) -> np.ndarray | None:
        return result.maps
