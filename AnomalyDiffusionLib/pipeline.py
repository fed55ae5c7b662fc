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
from . import methods as registry
from .bias import LEVELS as BIAS_LEVELS
from .bias import correct as correct_bias
from .bundle import Bundle, open_bundle
from .devices import resolve_device
from .errors import InputError
from .flair_reference import flair_zscore
from .intensity import IntensityReference, landmarks
from .method import MethodResult, SliceInputs
from .options import DetectOptions  # the options schema; re-exported here
from .progress import CancelToken, ProgressCallback, report
from .refine import refine_to_flair
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
    #: the case as the models saw it: ``case`` with the bias field divided out (``--bias-correction
    #: n4``); None when nothing was corrected (then the models saw ``case``)
    source: Case | None = None

    def refinement_flair_z(self) -> np.ndarray:
        """The robust FLAIR z-score [z, y, x] (canonical) that the refinement thresholds: of the FLAIR
        the models saw, on the case's brain mask."""
        return _refinement_flair_z(self.source or self.case, self.case)


def _refinement_flair_z(source: Case, case: Case) -> np.ndarray:
    """The refinement's FLAIR z-score: of ``source``'s FLAIR (what the models saw) on ``case``'s brain."""
    return flair_zscore(source.arrays["flair"], case.mask)


def _brain_slices(case: Case, start: int | None, stop: int | None) -> np.ndarray:
    area = case.mask.reshape(case.shape[0], -1).sum(1)
    if area.max() == 0:
        raise InputError("no brain found in the FLAIR volume (it looks empty or constant)")
    k = slice_indices(case.shape[0], start, stop)  # validates the range
    k = k[area[k] >= MIN_BRAIN_FRACTION * area.max()]
    if not len(k):
        raise InputError("no brain slices in the requested slice range")
    return k


def intensity_mode(b: Bundle, opt: DetectOptions) -> str:
    """The intensity scaling this run uses: ``--faithful`` → the papers' ``percentile``; else the
    user's ``--intensity``, else the bundle's ``pipeline.intensity`` (``percentile`` when it has none).
    ``landmarks`` needs the bundle's ``intensity_reference``."""
    if opt.faithful:
        return "percentile"
    mode = opt.intensity or b.manifest.get("pipeline", {}).get("intensity", "percentile")
    if mode not in ("percentile", "landmarks"):
        raise InputError(f"intensity must be 'percentile' or 'landmarks', not {mode!r}")
    if mode == "landmarks" and "intensity_reference" not in b.manifest:
        raise InputError(
            f"bundle '{b.name}' has no intensity reference (training-data landmarks); use --intensity percentile"
        )
    return mode


def refine_settings(b: Bundle, opt: DetectOptions) -> tuple[float, float, float | None] | None:
    """The native-resolution refinement this run uses (:mod:`~AnomalyDiffusionLib.refine`): (FLAIR z
    level, reach in mm, FLAIR z down to which the model's own voxels are kept or None), or None when
    off. ``--faithful`` → off; else the user's ``--refine``, else the bundle's ``pipeline.refine``
    (``none`` when it has none). ``flair`` needs the bundle's ``pipeline.refine_flair_z`` and
    ``refine_reach_mm``."""
    if opt.faithful:
        return None
    pipe = b.manifest.get("pipeline", {})
    mode = opt.refine or pipe.get("refine", "none")
    if mode == "none":
        return None
    if mode != "flair":
        raise InputError(f"refine must be 'none' or 'flair', not {mode!r}")
    if "refine_flair_z" not in pipe or "refine_reach_mm" not in pipe:
        raise InputError(f"bundle '{b.name}' has no refinement settings (pipeline.refine_flair_z); use --refine none")
    keep = pipe.get("refine_keep_flair_z")
    return float(pipe["refine_flair_z"]), float(pipe["refine_reach_mm"]), None if keep is None else float(keep)


def intensity_summary(case: Case, modalities: list[str], mode: str, reference: IntensityReference | None) -> dict:
    """``summary["intensity"]``: the scaling used and, with landmarks, the case's landmarks beside the
    reference's (both as fractions of the brain's 99th percentile)."""
    out: dict = {"mode": mode}
    if reference is not None:
        out["percentiles"] = list(reference.percentiles)
        out["case"] = {
            m: [round(float(v), 4) for v in landmarks(case.arrays[m], case.mask, reference.percentiles)]
            for m in modalities
        }
        out["reference"] = {m: [round(float(v), 4) for v in reference.values[m]] for m in modalities}
    return out


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
    run = registry.run_order(methods)  # refuses a name this library does not know
    unknown = [m for m in methods if m not in b.methods]
    if unknown:
        raise InputError(f"bundle '{b.name}' has no {', '.join(unknown)} model (it has {', '.join(b.methods)})")
    requested, methods = methods, run  # as the user listed them (summary.json); the registry's order
    registry.validate_bundle(b, methods)
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
    intensity = intensity_mode(b, opt)
    reference = None
    if intensity == "landmarks":
        reference = IntensityReference.from_manifest(b.manifest["intensity_reference"])
    bias_mode = (
        "none"
        if opt.faithful
        else (opt.bias_correction or b.manifest.get("pipeline", {}).get("bias_correction", "none"))
    )
    bias_info: dict = {"method": bias_mode}
    source = case  # what the models see; the outputs stay on the case as read
    if bias_mode == "n4":
        report(progress, "reading", 0.5, "bias-field correction (N4)")
        levels = opt.bias_levels or int(b.manifest.get("pipeline", {}).get("bias_levels", BIAS_LEVELS))
        bias_info["levels"] = levels
        corrected = {}
        for m in b.modalities:
            corrected[m], bias_info[m] = correct_bias(case.arrays[m], case.mask, case.spacing, levels)
            if cancel is not None:
                cancel.check()
        source = replace(case, arrays={**case.arrays, **corrected})
    vol = source.normalised(b.modalities, reference=reference)  # [C, z, y, x]
    fit = PlaneFit.for_case(case, b.slice_size, b.slice_fov_mm)
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
    inputs_k = SliceInputs(
        bundle=b,
        case=case,
        volume=vol,
        indices=idx,
        images=images,
        fit=fit,
        brain_area_mm2=brain_area,
        superior_mm=pos[:, 2],
        options=opt,
        device=device,
        progress=progress,
        cancel=cancel,
    )

    # ---- each method on the case's slices, in the registry's order
    results: dict[str, MethodResult] = {}
    for name in methods:
        t = time.perf_counter()
        res = registry.get(name).run(inputs_k, results)
        results[name] = res
        for r, cols in zip(rows, res.columns, strict=True):
            r.update(cols)
        shortcuts += res.shortcuts
        for msg in res.warnings:
            warnings.append(msg)
            log.warning("%s", msg, extra={SUMMARY_WARNING: True})
        extras.update(res.extras)
        timings[name] = time.perf_counter() - t

    # ---- the segmentation and heatmap: the last segmenting method's; else a method's localisation
    seg_result = next((r for r in reversed(results.values()) if r.masks is not None), None)
    masks_model = None if seg_result is None else seg_result.masks
    heat_model = None if seg_result is None else seg_result.maps
    if heat_model is None:
        for name, res in results.items():
            t = time.perf_counter()
            heat_model = registry.get(name).localise(inputs_k, res)
            if heat_model is not None:
                timings[f"{name}_localisation"] = time.perf_counter() - t
                break

    # ---- volumes on the input grid
    t = time.perf_counter()
    report(progress, "writing", 0.0, "reassembling volumes")
    heatmap = reassemble(case, heat_model, idx, fit, kind="image", fill=0.0) if heat_model is not None else None
    labelmap = None
    lesion_ml = None
    refine_info: dict = {"method": "none"}
    if masks_model is not None:
        labelmap, lab = labelmap_from_model(case, masks_model, idx, fit)
        voxel_ml = float(np.prod(case.spacing)) / 1000.0
        refinement = refine_settings(b, opt)
        if refinement is not None:
            level, reach, keep = refinement
            report(progress, "writing", 0.3, "refining the segmentation to the FLAIR")
            model_ml = float(lab.sum()) * voxel_ml
            flair_z = _refinement_flair_z(source, case)
            lab = refine_to_flair(lab > 0, flair_z, case.spacing, level, reach, keep).astype(np.uint8)
            labelmap = case.to_original(lab, sitk.sitkUInt8)
            refine_info = {
                "method": "flair",
                "flair_z": level,
                "reach_mm": reach,
                "keep_flair_z": level if keep is None else keep,
                "model_ml": round(model_ml, 3),
                "refined_ml": round(float(lab.sum()) * voxel_ml, 3),
            }
        per_slice = lab.reshape(lab.shape[0], -1).sum(1)
        for r in rows:
            r["lesion_area_mm2"] = round(float(per_slice[r["slice"]]) * voxel_mm2, 1)
        lesion_ml = float(lab.sum()) * voxel_ml
    timings["outputs"] = time.perf_counter() - t
    reliability = _reliability(results)
    if reliability["messages"]:
        msg = "results may be unreliable: " + "; ".join(reliability["messages"])
        warnings.append(msg)
        log.warning("%s", msg, extra={SUMMARY_WARNING: True})
    timings["total"] = time.perf_counter() - t_all
    summary = _summary(b, case, rows, pos, requested, results, shortcuts, warnings, lesion_ml, timings, device, opt)
    summary["reliability"] = reliability
    summary["intensity"] = intensity_summary(source, list(b.modalities), intensity, reference)
    summary["bias_correction"] = bias_info
    summary["refinement"] = refine_info
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
        source=None if source is case else source,
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


def _reliability(results: Mapping[str, MethodResult]) -> dict:
    """summary.json's ``reliability`` block: per method figures (None for a method that did not run
    or had nothing to measure) and one list of messages."""
    out: dict = {name: None for name in registry.REGISTRY}
    out.update({name: r.reliability for name, r in results.items()})
    out["messages"] = [m for r in results.values() if r.reliability for m in r.reliability["messages"]]
    return out


def _summary(
    b: Bundle,
    case: Case,
    rows: list[dict],
    positions: np.ndarray,
    requested: tuple[str, ...],
    results: Mapping[str, MethodResult],
    shortcuts: list[str],
    warnings: list[str],
    lesion_ml: float | None,
    timings: dict[str, float],
    device: torch.device,
    opt: DetectOptions,
) -> dict:
    area = np.array([r.get("lesion_area_mm2", 0.0) for r in rows])
    scored = next((r for r in results.values() if r.scores is not None), None)
    if area.any():
        best = int(np.argmax(area))
        why = "largest segmented area"
    elif scored is not None:
        best = int(np.nanargmax(np.asarray(scored.scores)))
        why = f"highest {registry.get(scored.name).title} score"
    else:
        best, why = None, "nothing segmented"
    lesion_pos = [r["slice"] for r in rows if r.get("lesion_area_mm2", 0) > 0]
    dode = results.get("dode")
    dode_pos = (
        [] if dode is None or dode.flags is None else [r["slice"] for r, f in zip(rows, dode.flags, strict=True) if f]
    )
    if any(r.masks is not None for r in results.values()):
        anomalous = bool(lesion_pos)
    else:
        anomalous = any(bool(np.any(r.flags)) for r in results.values() if r.flags is not None)
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
    return {
        "verdict": "anomalous" if anomalous else "no anomaly found",
        "most_anomalous_slice": most,
        "lesion_slices": [min(lesion_pos), max(lesion_pos)] if lesion_pos else None,
        "dode_flagged_slices": [min(dode_pos), max(dode_pos)] if dode_pos else None,
        "lesion_volume_ml": None if lesion_ml is None else round(lesion_ml, 3),
        "slices_analysed": len(rows),
        "methods": list(requested),
        "method_details": {name: r.summary for name, r in results.items()},
        "shortcuts": shortcuts,
        "warnings": warnings,
        "faithful": bool(opt.faithful),
        "pretrained_encoder": None if dode is None else bool(dode.summary["encoder_pretrained"]),
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
