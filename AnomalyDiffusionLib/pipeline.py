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
    methods = tuple(opt.methods) if opt.methods else tuple(b.methods)
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
        for r, ps, s, f in zip(rows, per_scale, score, dode_flag, strict=True):
            for sc, v in zip(model.scales, ps, strict=True):
                r[f"dode_bpd_{sc}"] = round(float(v), 5)
            r["dode_score"] = round(float(s), 5)
            r["dode_anomalous"] = bool(f)
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
        if opt.cos_threshold is not None:
            cal = replace(cal, cos_threshold=float(opt.cos_threshold))
        gate = "none" if opt.faithful else (opt.gate or b.manifest.get("pipeline", {}).get("gate", "none"))
        if gate not in ("none", "dode"):
            raise InputError(f"gate must be 'none' or 'dode', not {gate!r}")
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
            seg = segment(res, cal)
            maps[sel] = seg.maps
            masks[sel] = seg.masks
            for j, i in enumerate(sel):
                r = rows[i]
                r["fpdm_ran"] = True
                r["fpdm_cosine"] = round(float(res.cosine[j]), 7)
                r["fpdm_unhealthy"] = bool(seg.unhealthy[j])
                for c, m in enumerate(map_mods):
                    r[f"fpdm_t_e_{m}"] = int(res.t_e[j, c]) + 1  # paper steps are 1-based
                    r[f"fpdm_m_te_{m}"] = float(f"{res.m_te[j, c]:.6g}")
                r["fpdm_q_star"] = float(f"{seg.thresholds[j]:.6g}")
            calls = res.network_calls
        else:
            calls = 0
        heat_model, masks_model = maps, masks
        summary_methods["fpdm"] = {
            "settings": st.as_dict(),
            "calibration": cal.as_dict(),
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
        labelmap = reassemble(case, masks_model.astype(np.uint8), idx, fit, kind="label")
        lab = case.reorientation.to_canonical(sitk.GetArrayFromImage(labelmap))
        lab &= case.mask.astype(lab.dtype)  # never outside the brain
        labelmap = case.to_original(lab, sitk.sitkUInt8)
        per_slice = lab.reshape(lab.shape[0], -1).sum(1)
        for r in rows:
            r["lesion_area_mm2"] = round(float(per_slice[r["slice"]]) * voxel_mm2, 1)
        voxel_ml = float(np.prod(case.spacing)) / 1000.0
        lesion_ml = float(lab.sum()) * voxel_ml
    timings["outputs"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    summary = _summary(
        b, case, rows, pos, methods, summary_methods, shortcuts, warnings, lesion_ml, timings, device, opt
    )
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
    )


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
