"""The one entry point from volumes to results: CLI ``detect``, the Slicer module and evaluation call
:func:`detect`.

Data flow: volumes (FLAIR first: its grid is the output grid) → canonical LPS case, T2 (and T1/T1ce)
resampled onto FLAIR → brain slices, normalised and fitted to the bundle's slice size →
per-slice AnoDODE scores (bpd per scale and their mean, eq. 13 of the AnoDODE paper) and AnoFPDM
forward process (cosine classification eq. 18, t_e eq. 21, M_{t_e}, Q* from Algorithm 1, mask) →
heatmap and labelmap volumes on the input grid, a per-slice table and a case summary.

Shortcuts (for CPU budgets) are explicit and reported in ``summary["shortcuts"]``: a step stride,
early stop after the M_t peak, and ``gate="dode"`` (run AnoFPDM only on slices whose AnoDODE score is
at or above the bundle's decision threshold, plus their axial neighbours). ``faithful=True`` undoes
all of them (every step, no early stop, no gate).

``summary["warnings"]`` (always present, empty when all is well) lists, one sentence each, the
AnoFPDM settings of this run that differ from those the bundle's cosine threshold and M_max were
calibrated with (:func:`~AnomalyDiffusionLib.fpdm.calibration_mismatches`), e.g. ``--faithful`` or
``--stride`` on a bundle calibrated at a stride; each is also logged as a warning.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .bundle import Bundle, open_bundle
from .devices import for_inference, resolve_device
from .errors import InputError
from .options import DetectOptions  # the options schema; re-exported here
from .progress import CancelToken, ProgressCallback, report
from .selfcal import DEFAULT_Z, robust_z, slice_covariates
from .volumes import Case, PlaneFit, case_from_images, load_case, reassemble, slice_indices

log = logging.getLogger(__name__)

#: a slice is analysed when its brain area is at least this fraction of the largest slice's
MIN_BRAIN_FRACTION = 0.05
#: log records carrying this attribute are also in ``summary["warnings"]`` (the CLI prints those itself)
SUMMARY_WARNING = "summary_warning"


@dataclass
class DetectResult:
    """Everything :func:`detect` produced. Volumes share the reference (FLAIR) grid exactly."""

    case: Case
    rows: list[dict]  #: one dict per analysed slice (see :func:`detect`)
    heatmap: sitk.Image | None  #: float32 anomaly map on the input grid (None if no method makes one)
    labelmap: sitk.Image | None  #: uint8, 1 = anomaly (None without AnoFPDM)
    summary: dict
    indices: np.ndarray  #: canonical axial indices of the analysed slices
    model_images: np.ndarray  #: [K, C, S, S] the slices the models saw
    model_maps: np.ndarray | None = None  #: [K, S, S] heatmap in model space
    model_masks: np.ndarray | None = None  #: [K, S, S] masks in model space
    fit: PlaneFit | None = None
    extras: dict = field(default_factory=dict)


def _brain_slices(case: Case, start: int | None, stop: int | None) -> np.ndarray:
    area = case.mask.reshape(case.shape[0], -1).sum(1)
    if area.max() == 0:
        raise InputError("no brain found in the FLAIR volume (it looks empty or constant)")
    k = slice_indices(case.shape[0], start, stop)  # validates the range
    k = k[area[k] >= MIN_BRAIN_FRACTION * area.max()]
    if not len(k):
        raise InputError("no brain slices in the requested slice range")
    return k


def slice_positions(case: Case, indices: np.ndarray) -> np.ndarray:
    """Physical LPS centre (mm) of each canonical axial slice ``indices`` → [K, 3]. The third
    coordinate is the superior position, identical in LPS and RAS."""
    ref = case.reference
    size = ref.GetSize()
    reo = case.reorientation
    out = np.zeros((len(indices), 3))
    for n, k in enumerate(indices):
        canon = [(case.shape[2] - 1) / 2.0, (case.shape[1] - 1) / 2.0, float(k)]  # ITK order x, y, z
        orig = [0.0, 0.0, 0.0]
        for j in range(3):  # canonical ITK axis j comes from original ITK axis i
            i = 2 - reo.axes[2 - j]
            orig[i] = size[i] - 1 - canon[j] if (2 - j) in reo.flips else canon[j]
        out[n] = ref.TransformContinuousIndexToPhysicalPoint(orig)
    return out


def _fpdm_settings(settings, opt: DetectOptions):
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


def detect(
    inputs: Mapping[str, str | Path | sitk.Image],
    bundle: Bundle | str | Path | None = None,
    options: DetectOptions | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> DetectResult:
    """Run the bundle's methods on one case.

    ``inputs``: ``{"flair": path or image, "t2": ..., ["t1": ..., "t1ce": ...]}``; FLAIR is the
    reference grid. Returns per-slice rows with: ``slice`` (canonical axial index, inferior → superior),
    ``superior_mm``, ``brain_area_mm2``; AnoDODE ``dode_bpd_<scale>``, ``dode_score`` (mean bpd),
    ``dode_anomalous``; AnoFPDM ``fpdm_ran``, ``fpdm_cosine``, ``fpdm_unhealthy``, ``fpdm_t_e_<mod>``,
    ``fpdm_m_te_<mod>``, ``fpdm_q_star``, ``lesion_area_mm2``.
    """
    opt = options or DetectOptions()
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    b = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    # the user's choice, else the bundle's default methods (a bundle may ship a method it leaves off,
    # with the reason in its manifest), else all it has
    default_methods = b.manifest.get("pipeline", {}).get("default_methods") or b.methods
    methods = tuple(opt.methods) if opt.methods else tuple(default_methods)
    unknown = [m for m in methods if m not in b.methods]
    if unknown:
        raise InputError(f"bundle '{b.name}' has no {', '.join(unknown)} model (it has {', '.join(b.methods)})")
    needed = b.modalities
    missing = [m for m in needed if m not in inputs]
    if missing:
        raise InputError(
            f"bundle '{b.name}' needs {', '.join(x.upper() for x in needed)}; "
            f"missing {', '.join(x.upper() for x in missing)}"
        )
    if "flair" not in needed:
        raise InputError("bundles without FLAIR are not supported by the volume pipeline")
    device = resolve_device(opt.device)

    # ---- volumes → case
    t = time.perf_counter()
    report(progress, "reading", 0.0, "reading volumes")
    ordered = {m: inputs[m] for m in ["flair", *[x for x in needed if x != "flair"]]}
    if all(isinstance(v, sitk.Image) for v in ordered.values()):
        case = case_from_images(ordered)  # type: ignore[arg-type]
    else:
        case = load_case(ordered)  # type: ignore[arg-type]
    if cancel is not None:
        cancel.check()
    idx = _brain_slices(case, *opt.slice_range)
    vol = case.normalised(b.modalities)  # [C, z, y, x]
    fit = PlaneFit.for_case(case, b.slice_size)
    images = fit.to_model(np.moveaxis(vol[:, idx], 1, 0), "image", fill=-1.0)  # [K, C, S, S]
    voxel_mm2 = case.spacing[0] * case.spacing[1]
    brain_area = case.mask[idx].reshape(len(idx), -1).sum(1) * voxel_mm2
    pos = slice_positions(case, idx)
    rows = [
        {"slice": int(k), "superior_mm": round(float(p[2]), 2), "brain_area_mm2": round(float(a), 1)}
        for k, p, a in zip(idx, pos, brain_area, strict=True)
    ]
    timings["reading"] = time.perf_counter() - t
    report(progress, "reading", 1.0, f"{len(idx)} brain slices")
    shortcuts: list[str] = []
    warnings: list[str] = []
    extras: dict = {}
    fpdm_reliability = None
    dode_reliability = None
    summary_methods: dict = {}
    heat_model = None
    masks_model = None

    # ---- AnoDODE: slice scores
    dode_flag = None
    dode_model = None
    if "dode" in methods:
        t = time.perf_counter()
        from .dode.model import dode_from_bundle, score_slices

        d = b.manifest["dode"]
        report(progress, "dode", 0.0, "loading AnoDODE")
        model = dode_from_bundle(b, device)
        if opt.dode_scales:
            bad = [s for s in opt.dode_scales if s not in model.scales]
            if bad:
                raise InputError(f"AnoDODE scales {bad} are not in bundle '{b.name}' (it has {model.scales})")
            keep = [model.scales.index(s) for s in opt.dode_scales]
            model.scales = [model.scales[i] for i in keep]
            model.nets = [model.nets[i] for i in keep]
            model.standardisers = [model.standardisers[i] for i in keep]
        size = int(d.get("slice_size", b.slice_size))
        grey = PlaneFit.for_case(case, size).to_model(vol[b.modalities.index(d["modality"])][idx], "image", -1.0)
        lk = d["likelihood"]
        rtol = float(opt.dode_rtol or lk.get("rtol", 1e-5))
        atol = float(opt.dode_rtol or lk.get("atol", 1e-5))
        n_probes = int(opt.dode_probes or lk.get("probes", 1))
        if n_probes < 1:
            raise InputError(f"AnoDODE needs at least one Hutchinson probe per slice, not {n_probes}")
        per_scale = np.zeros((len(idx), len(model.scales)))
        step = 64  # one ODE solve per 64 slices (the batched solver's cost hardly grows with the batch)
        for i in range(0, len(idx), step):
            if cancel is not None:
                cancel.check()
            per_scale[i : i + step], _ = score_slices(
                model,
                grey[i : i + step, None],
                probe=lk.get("probe", "rademacher"),
                seed=opt.seed + i,
                rtol=rtol,
                atol=atol,
                method=lk.get("method", "dopri5"),
                steps=lk.get("steps"),
                eps=float(lk.get("eps", 1e-5)),
                n_probes=n_probes,
            )
            report(progress, "dode", min(1.0, (i + step) / len(idx)), "slice likelihoods")
        score = per_scale.mean(1)
        thr = opt.dode_threshold if opt.dode_threshold is not None else d.get("decision_threshold")
        dode_flag = score >= thr if thr is not None else np.zeros(len(idx), bool)
        # the case's own population: bpd relative to its slices of like area and position
        dode_z = robust_z(score, slice_covariates(brain_area, pos[:, 2]))
        dode_reliability = _dode_reliability(dode_flag, dode_z)
        for r, ps, s, f in zip(rows, per_scale, score, dode_flag, strict=True):
            for sc, v in zip(model.scales, ps, strict=True):
                r[f"dode_bpd_{sc}"] = round(float(v), 5)
            r["dode_score"] = round(float(s), 5)
            r["dode_anomalous"] = bool(f)
        for r, z in zip(rows, dode_z, strict=True):
            r["dode_z"] = round(float(z), 3)
        summary_methods["dode"] = {
            "encoder": d["encoder"]["timm_name"],
            "encoder_pretrained": bool(d["encoder"]["pretrained"]),
            "scales": model.scales,
            "decision_threshold_bpd": thr,
            "rtol": rtol,
            "atol": atol,
            "solver": lk.get("method", "dopri5"),
            "probes": n_probes,
            "slices_flagged": int(dode_flag.sum()),
        }
        method = lk.get("method", "dopri5")
        if method != "dopri5":
            shortcuts.append(f"AnoDODE fixed-grid ODE solver {method} with {lk.get('steps')} steps")
        elif rtol > 1e-5 or atol > 1e-5:
            shortcuts.append(f"AnoDODE ODE tolerance {rtol:g} (paper/score_sde default 1e-5)")
        timings["dode"] = time.perf_counter() - t
        dode_model = model

    # ---- AnoFPDM: forward process, classification, masks
    if "fpdm" in methods:
        t = time.perf_counter()
        from .fpdm import calibration_mismatches, forward_process, segment
        from .modelio import fpdm_from_bundle

        unet, schedule, settings, cal = fpdm_from_bundle(b, device)
        for_inference(unet, device)
        st = _fpdm_settings(settings, opt)
        # the cosine threshold and M_max hold for the settings they were calibrated with only
        for msg in calibration_mismatches(st, cal, b.manifest["fpdm"].get("calibrated_stride")):
            warnings.append(msg)
            log.warning("%s", msg, extra={SUMMARY_WARNING: True})
        mode = opt.calibration or b.manifest.get("pipeline", {}).get("calibration", "bundle")
        if mode not in ("bundle", "volume"):
            raise InputError(f"calibration must be 'bundle' or 'volume', not {mode!r}")
        if opt.cos_threshold is not None:
            if mode == "volume":
                raise InputError(
                    "--cos-threshold sets the bundle calibration's slice threshold; "
                    "use it with --calibration bundle (volume calibration decides from the case's own slices)"
                )
            cal = replace(cal, cos_threshold=float(opt.cos_threshold))
        gate = "none" if opt.faithful else (opt.gate or b.manifest.get("pipeline", {}).get("gate", "none"))
        if gate not in ("none", "dode"):
            raise InputError(f"gate must be 'none' or 'dode', not {gate!r}")
        if gate == "dode" and mode == "volume":
            raise InputError(
                "volume calibration needs the forward process of every brain slice; use --gate none "
                "or --calibration bundle"
            )
        run = np.ones(len(idx), bool)
        if gate == "dode":
            if dode_flag is None:
                raise InputError("gate 'dode' needs the AnoDODE method (use --methods fpdm,dode or --gate none)")
            run = dode_flag | np.roll(dode_flag, 1) | np.roll(dode_flag, -1)  # flagged slices ± 1
            run[0] |= dode_flag[0]
            shortcuts.append("AnoFPDM only on slices flagged by AnoDODE (± 1 neighbour)")
        if st.stride > 1:
            shortcuts.append(f"AnoFPDM step stride {st.stride} ({len(st.visited)} of {st.steps} steps)")
        if st.early_stop:
            shortcuts.append("AnoFPDM early stop after the M_t peak")
        maps = np.zeros((len(idx), b.slice_size, b.slice_size), np.float32)
        masks = np.zeros_like(maps, dtype=bool)
        sel = np.flatnonzero(run)
        map_mods = [b.modalities[c] for c in (st.map_channels or range(len(b.modalities)))]
        for r in rows:
            r["fpdm_ran"] = False
        if len(sel):
            report(progress, "fpdm", 0.0, f"forward process on {len(sel)} slices")
            res = forward_process(
                unet,
                images[sel],
                st,
                schedule,
                seed=opt.seed,
                device=device,
                cos_threshold=cal.cos_threshold,
                progress=progress,
                cancel=cancel,
            )
            segs = {"bundle": segment(res, cal)}
            vol_info = None
            if gate == "none":  # the volume level needs every brain slice's forward process
                pipe = b.manifest.get("pipeline", {})
                z = float(pipe.get("volume_z", DEFAULT_Z))
                hyper, grow = pipe.get("volume_flair_z"), pipe.get("volume_grow_z")  # optional
                flair = images[sel][:, b.modalities.index("flair")]
                segs["volume"], vol_info = volume_segmentation(
                    res,
                    cal,
                    z,
                    flair=flair,
                    hyper_z=None if hyper is None else float(hyper),
                    grow_z=None if grow is None else float(grow),
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
                r = rows[i]
                r["fpdm_ran"] = True
                r["fpdm_cosine"] = round(float(res.cosine[j]), 7)
                r["fpdm_unhealthy"] = bool(seg.unhealthy[j])
                for name, sg in segs.items():
                    r[f"fpdm_unhealthy_{name}"] = bool(sg.unhealthy[j])
                for c, m in enumerate(map_mods):
                    r[f"fpdm_t_e_{m}"] = int(res.t_e[j, c]) + 1  # paper steps are 1-based
                    r[f"fpdm_m_te_{m}"] = float(f"{res.m_te[j, c]:.6g}")
                r["fpdm_q_star"] = float(f"{seg.thresholds[j]:.6g}")
            calls = res.network_calls
            fpdm_reliability = _fpdm_reliability(res, cal, segs, vol_info)
        else:
            calls = 0
            vol_info = None
            fpdm_reliability = None
        heat_model, masks_model = maps, masks
        summary_methods["fpdm"] = {
            "settings": st.as_dict(),
            "calibration_mode": mode,
            "calibration": cal.as_dict(),
            "volume_calibration": None
            if vol_info is None
            else {k: v for k, v in vol_info.items() if k not in ("z_cosine", "z_m")},
            "gate": gate,
            "slices_run": len(sel),
            "network_calls": int(calls),
        }
        timings["fpdm"] = time.perf_counter() - t
        del unet

    # ---- AnoDODE localisation (only when it is the heatmap's source)
    if heat_model is None and "dode" in methods and (b.manifest.get("dode") or {}).get("decoder"):
        t = time.perf_counter()
        heat_model = _dode_heatmaps(b, dode_model, vol, idx, fit, device, opt.seed, progress, cancel)
        timings["dode_localisation"] = time.perf_counter() - t

    # ---- volumes on the input grid
    t = time.perf_counter()
    report(progress, "writing", 0.0, "reassembling volumes")
    heatmap = reassemble(case, heat_model, idx, fit, kind="image", fill=0.0) if heat_model is not None else None
    labelmap = None
    lesion_ml = None
    if masks_model is not None:
        labelmap, lab = labelmap_from_model(case, masks_model, idx, fit)
        per_slice = lab.reshape(lab.shape[0], -1).sum(1)
        for r in rows:
            r["lesion_area_mm2"] = round(float(per_slice[r["slice"]]) * voxel_mm2, 1)
        voxel_ml = float(np.prod(case.spacing)) / 1000.0
        lesion_ml = float(lab.sum()) * voxel_ml
    timings["outputs"] = time.perf_counter() - t
    reliability = _reliability(fpdm_reliability, dode_reliability)
    if reliability["messages"]:
        msg = "results may be unreliable: " + "; ".join(reliability["messages"])
        warnings.append(msg)
        log.warning("%s", msg, extra={SUMMARY_WARNING: True})
    timings["total"] = time.perf_counter() - t_all
    summary = _summary(
        b, case, rows, pos, methods, summary_methods, shortcuts, warnings, lesion_ml, timings, device, opt
    )
    summary["reliability"] = reliability
    report(progress, "writing", 1.0, "done")
    return DetectResult(
        case=case,
        rows=rows,
        heatmap=heatmap,
        labelmap=labelmap,
        summary=summary,
        indices=idx,
        model_images=images,
        model_maps=heat_model,
        model_masks=masks_model,
        fit=fit,
        extras=extras,
    )


def labelmap_from_model(
    case: Case, masks_model: np.ndarray, idx: np.ndarray, fit: PlaneFit
) -> tuple[sitk.Image, np.ndarray]:
    """Model-space masks [K, S, S] of the slices ``idx`` → (uint8 labelmap on the input grid, its
    canonical array [z, y, x]); never outside the brain."""
    labelmap = reassemble(case, masks_model.astype(np.uint8), idx, fit, kind="label")
    lab = case.reorientation.to_canonical(sitk.GetArrayFromImage(labelmap))
    lab &= case.mask.astype(lab.dtype)  # never outside the brain
    return case.to_original(lab, sitk.sitkUInt8), lab


def volume_segmentation(
    res,
    cal,
    z: float,
    flair: np.ndarray | None = None,
    hyper_z: float | None = None,
    grow_z: float | None = None,
) -> tuple:
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
    from scipy import ndimage

    from .fpdm import remove_small_components, segment
    from .selfcal import pixel_level, robust_standardise

    if grow_z is not None and grow_z > z:
        raise ValueError(f"grow_z ({grow_z}) must not exceed z ({z})")
    seg = segment(res, cal, classify=False, level=np.inf)  # the filtered maps; masks follow below
    maps = seg.maps
    fg = res.foreground if res.foreground is not None else np.ones(maps.shape, bool)
    level = pixel_level(maps, fg, z)
    low = level if grow_z is None else pixel_level(maps, fg, grow_z)
    min_px = round(cal.min_component * (maps.shape[-1] / 128.0) ** 2)
    # what segment(level=low) gives, without filtering the maps a second time
    raw = maps >= low
    if cal.foreground_only and res.foreground is not None:
        raw &= res.foreground
    masks = np.stack([remove_small_components(m, min_px) for m in raw]) if len(raw) else raw
    seg.thresholds[:] = low
    if hyper_z is not None and flair is not None:
        masks = masks & (robust_standardise(flair, fg) >= hyper_z)
    if grow_z is not None:
        lab, n = ndimage.label(masks, structure=np.ones((3, 3, 3), bool))
        seeded = np.zeros(n + 1, bool)
        seeded[np.unique(lab[masks & (maps >= level)])] = True
        seeded[0] = False
        masks = seeded[lab]
    seg.masks = np.stack([remove_small_components(m, min_px) for m in masks]) if len(masks) else masks
    seg.unhealthy = seg.masks.reshape(len(seg.masks), -1).any(1)
    info = {"z": float(z), "pixel_level": level, "slices_unhealthy": int(seg.unhealthy.sum())}
    if grow_z is not None:
        info.update(grow_z=float(grow_z), grow_level=low)
    if hyper_z is not None:
        info["flair_hyper_z"] = float(hyper_z)
    return seg, info


#: a method flagging more than this share of a case's brain slices says nothing about where the lesion is
UNINFORMATIVE_FRACTION = 0.6


def _fpdm_reliability(res, cal, segs: dict, vol_info: dict | None) -> dict:
    """How far the case lies from the bundle's calibration: the share of slices the bundle's cosine
    threshold calls unhealthy, the case's median cosine and M_{t_e} against the threshold and M_max."""
    n = len(res.cosine)
    med_m = np.median(res.m_te, 0)
    out = {
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


def _dode_reliability(flags: np.ndarray, z: np.ndarray) -> dict:
    """AnoDODE on this case: the share of slices above the bundle's bpd threshold, and whether that is
    too many to mean anything (:data:`UNINFORMATIVE_FRACTION`)."""
    frac = float(np.mean(flags)) if len(flags) else 0.0
    out = {"fraction_flagged": round(frac, 3), "informative": bool(frac <= UNINFORMATIVE_FRACTION)}
    out["messages"] = (
        []
        if out["informative"]
        else [
            f"AnoDODE flags {frac:.0%} of the brain slices at the bundle's threshold, which says nothing about "
            "where an anomaly is; its per-slice scores are relative at best (see dode_z in slices.csv)"
        ]
    )
    return out


def _reliability(fpdm: dict | None, dode: dict | None) -> dict:
    """summary.json's ``reliability`` block: per method figures and one list of messages."""
    messages = [m for part in (fpdm, dode) if part for m in part["messages"]]
    return {"fpdm": fpdm, "dode": dode, "messages": messages}


def _dode_heatmaps(b: Bundle, model, vol, idx, fit, device, seed, progress, cancel) -> np.ndarray:
    """AnoDODE localisation (section 4.3): perturb features to t0, PC-denoise, decode, (x − x')².
    ``model`` is the AnoDODE model already loaded for scoring (reloaded whole if a scale subset left
    out the decoder's scale)."""
    from .dode.decoder import localise
    from .dode.model import decoder_from_bundle, dode_from_bundle
    from .dode.sde import VPSDE

    decoder, scale, dset = decoder_from_bundle(b, device)
    if scale not in model.scales:
        model = dode_from_bundle(b, device)
    if scale not in model.scales:
        raise InputError(f"the bundle's decoder works at scale {scale}, which has no score network")
    k = model.scales.index(scale)
    net = model.nets[k]
    net.sde = VPSDE(net.sde.beta_min, net.sde.beta_max, N=int(dset.get("steps", 500)))
    d = b.manifest["dode"]
    grey = fit.to_model(vol[b.modalities.index(d["modality"])][idx], "image", -1.0)
    out = np.zeros((len(idx), b.slice_size, b.slice_size), np.float32)
    g = torch.Generator().manual_seed(seed)
    for i in range(0, len(idx), 16):
        if cancel is not None:
            cancel.check()
        heat, _ = localise(
            model.encoder,
            scale,
            net,
            model.standardisers[k],
            decoder,
            grey[i : i + 16, None],
            t0=float(dset.get("t0", 0.5)),
            generator=g,
        )
        out[i : i + 16] = heat
        report(progress, "dode localisation", min(1.0, (i + 16) / len(idx)), "")
    return out


def _summary(
    b, case, rows, positions, methods, summary_methods, shortcuts, warnings, lesion_ml, timings, device, opt
) -> dict:
    area = np.array([r.get("lesion_area_mm2", 0.0) for r in rows])
    score = np.array([r.get("dode_score", np.nan) for r in rows], float)
    if area.any():
        best = int(np.argmax(area))
        why = "largest segmented area"
    elif "dode" in methods:
        best = int(np.nanargmax(score))
        why = "highest AnoDODE score"
    else:
        best, why = None, "nothing segmented"
    fpdm_pos = [r["slice"] for r in rows if r.get("lesion_area_mm2", 0) > 0]
    dode_pos = [r["slice"] for r in rows if r.get("dode_anomalous")]
    if "fpdm" in methods:
        anomalous = bool(fpdm_pos)
    else:
        anomalous = bool(dode_pos)
    most = None
    if best is not None:
        r = rows[best]
        pos = positions[best]
        most = {
            "slice": r["slice"],
            "superior_mm": r["superior_mm"],
            "center_lps_mm": [round(float(v), 2) for v in pos],
            "center_ras_mm": [round(float(-pos[0]), 2), round(float(-pos[1]), 2), round(float(pos[2]), 2)],
            "why": why,
            "lesion_area_mm2": r.get("lesion_area_mm2"),
            "dode_score": r.get("dode_score"),
        }
    ref = case.reference
    d = b.manifest.get("dode", {}) or {}
    return {
        "verdict": "anomalous" if anomalous else "no anomaly found",
        "most_anomalous_slice": most,
        "lesion_slices": [min(fpdm_pos), max(fpdm_pos)] if fpdm_pos else None,
        "dode_flagged_slices": [min(dode_pos), max(dode_pos)] if dode_pos else None,
        "lesion_volume_ml": None if lesion_ml is None else round(lesion_ml, 3),
        "slices_analysed": len(rows),
        "methods": list(methods),
        "method_details": summary_methods,
        "shortcuts": shortcuts,
        "warnings": warnings,
        "faithful": bool(opt.faithful),
        "pretrained_encoder": bool(d.get("encoder", {}).get("pretrained")) if "dode" in methods else None,
        "bundle": {
            "name": b.name,
            "sha256": b.sha256,
            "source": str(b.source),
            "training_data": b.manifest["training_data"],
            "intended_use": b.manifest["intended_use"],
        },
        "input": {
            "files": dict(case.sources),
            "size": list(ref.GetSize()),
            "spacing_mm": [round(v, 6) for v in ref.GetSpacing()],
            "canonical_axial_slices": case.shape[0],
        },
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "version": __version__,
    }
