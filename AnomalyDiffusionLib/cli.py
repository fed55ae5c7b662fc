"""``anomaly-diffusion``: the headless command line.

Subcommands:

* ``detect``  score and segment one case (FLAIR + T2) with a model bundle
* ``demo``    make a phantom case with a lesion and run ``detect`` on it (see :func:`run_demo`)
* ``bundle``  ``info`` / ``verify`` a model bundle
* ``phantom`` write synthetic subjects as BraTS-style folders
* ``info``    versions, device, and whether the anatomy templates are available

Errors print one line (``error: ...``) and exit with status 2; outputs are written to a hidden
temporary folder first and moved into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .cli_support import JsonlProgress, TqdmProgress
from .devices import tune_cpu_allocator
from .errors import AnomalyDiffusionError, InputError

log = logging.getLogger("AnomalyDiffusionLib")

#: phantom seed of ``demo``: a subject with one large glioma-like lesion (~97 mL, a typical BraTS
#: whole-tumour volume); see the issue notes for DICE on other seeds
DEMO_SEED = 11


# --------------------------------------------------------------------------------------- demo
def run_demo(
    out: Path,
    seed: int = DEMO_SEED,
    bundle: str | None = None,
    device: str = "auto",
    progress=None,
    cancel=None,
) -> dict:
    """``detect`` on a synthetic case with the embedded bundle, scored against the case's truth.

    1. Draw a phantom subject with one lesion and store FLAIR, T2 and the lesion labelmap on an
       anisotropic (1.2 × 1.2 × 2.5 mm), oblique, axis-flipped grid, as a scanner might (``inputs/``).
    2. Run :func:`~AnomalyDiffusionLib.pipeline.detect` on the FLAIR and T2 files, exactly as
       ``anomaly-diffusion detect`` would, and write its outputs.
    3. Add a ``demo`` block to ``summary.json``: the true lesion slice range, DICE of the
       segmentation against the phantom's mask, the true lesion volume, and whether every output's
       geometry equals the input's.
    """
    import SimpleITK as sitk

    from .metrics import dice
    from .outputs import write_result
    from .phantom import PhantomOptions, make_grid, make_subject, oblique_direction, resample_case, write_case
    from .pipeline import DetectOptions, detect
    from .progress import report
    from .volumes import read_labelmap_like

    t0 = time.perf_counter()
    report(progress, "phantom", 0.0, "synthesising a subject")
    ph = make_subject(seed, PhantomOptions(spacing=1.5, n_lesions=1, modalities=("flair", "t2")))
    direction = oblique_direction((10.0, -6.0, 15.0), flip=(0, 2))
    # the field of view of the anatomy template (a scanner's FOV is set to the head, not to the
    # bounding box of a rotated volume)
    spacing = (1.2, 1.2, 2.5)
    extent = np.array(ph.labels.GetSize()) * np.array(ph.labels.GetSpacing())
    size = [int(np.ceil(e / s)) for e, s in zip(extent, spacing, strict=True)]
    ph = resample_case(ph, make_grid(ph.labels, spacing, direction, size=size))
    paths = write_case(ph, out, "inputs")
    report(progress, "phantom", 1.0, "inputs written")

    result = detect(
        {"flair": paths["flair"], "t2": paths["t2"]},
        bundle=bundle,
        options=DetectOptions(device=device),
        progress=progress,
        cancel=cancel,
    )
    truth = read_labelmap_like(paths["seg"], result.case, "lesion mask") > 0
    pred = result.case.reorientation.to_canonical(sitk.GetArrayFromImage(result.labelmap)) > 0
    lesion = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(1))
    ref = result.case.reference
    geometry_equal = all(
        getattr(img, f)() == getattr(ref, f)()
        for img in (result.labelmap, result.heatmap)
        if img is not None
        for f in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection")
    )
    found = result.summary["lesion_slices"]
    true_range = [int(lesion.min()), int(lesion.max())] if len(lesion) else None
    result.summary["demo"] = {
        "what": "synthetic phantom case (not a patient); truth = the phantom's lesion mask",
        "phantom_seed": seed,
        "lesion_slices_truth": true_range,
        "lesion_slices_found": found,
        "lesion_range_overlaps_truth": bool(
            found and true_range and found[0] <= true_range[1] and found[1] >= true_range[0]
        ),
        "dice_vs_truth": round(dice(pred, truth), 4),
        "lesion_volume_ml_truth": round(float(truth.sum()) * float(np.prod(result.case.spacing)) / 1000.0, 3),
        "output_geometry_equals_input": geometry_equal,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_result(result, out)
    return result.summary


# --------------------------------------------------------------------------------- commands
def _cmd_demo(args: argparse.Namespace, progress) -> int:
    out = Path(args.out)
    summary = _atomic_folder(
        out, lambda tmp: run_demo(tmp, seed=args.seed, bundle=args.bundle, device=args.device, progress=progress)
    )
    _print_warnings(summary)
    d = summary["demo"]
    print(
        json.dumps(
            {
                k: d[k]
                for k in (
                    "lesion_slices_truth",
                    "lesion_slices_found",
                    "dice_vs_truth",
                    "output_geometry_equals_input",
                    "seconds",
                )
            }
        )
    )
    print(
        f"verdict: {summary['verdict']}; most anomalous slice: {(summary['most_anomalous_slice'] or {}).get('slice')}"
    )
    print(
        f"look at {out / 'overview.png'} (picture), {out / 'summary.json'}, {out / 'slices.csv'}, "
        f"and the volumes {', '.join(v for k, v in summary['outputs'].items() if k in ('segmentation', 'heatmap'))} "
        f"over {out / 'inputs'}/flair"
    )
    return 0


def _detect_options(args: argparse.Namespace):
    from .cli_support import parse_slice_range
    from .pipeline import DetectOptions

    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    if methods and any(m not in ("fpdm", "dode") for m in methods):
        raise InputError(f"--methods takes fpdm, dode or fpdm,dode; got '{args.methods}'")
    scales = tuple(int(s) for s in args.dode_scales.split(",")) if args.dode_scales else None
    return DetectOptions(
        methods=methods,
        device=args.device,
        w=args.w,
        steps=args.steps,
        stride=args.stride,
        gap=args.gap,
        mode=args.mode,
        early_stop=args.early_stop,
        gate=args.gate,
        cos_threshold=args.cos_threshold,
        dode_threshold=args.dode_threshold,
        dode_scales=scales,
        dode_rtol=args.dode_tol,
        dode_probes=args.dode_probes,
        faithful=args.faithful,
        slice_range=parse_slice_range(args.slices),
        seed=args.seed,
    )


def _cmd_detect(args: argparse.Namespace, progress) -> int:
    from .bundle import open_bundle
    from .outputs import check_format, write_result
    from .pipeline import detect

    options = _detect_options(args)
    if args.format:
        check_format(args.format)  # before the long run, not after it
    inputs = {"flair": args.flair, "t2": args.t2}
    inputs.update({k: v for k, v in (("t1", args.t1), ("t1ce", args.t1ce)) if v})
    bundle = open_bundle(args.bundle)
    out = Path(args.out)

    def work(tmp: Path) -> dict:
        result = detect(inputs, bundle=bundle, options=options, progress=progress)
        write_result(result, tmp, fmt=args.format, overview=not args.no_overview)
        return result.summary

    summary = _atomic_folder(out, work)
    _print_warnings(summary)
    most = summary["most_anomalous_slice"] or {}
    print(
        f"{summary['verdict']}; lesion volume {summary['lesion_volume_ml']} mL; most anomalous slice "
        f"{most.get('slice')} ({most.get('why')}); {summary['timings_s']['total']:.1f} s on {summary['device']}"
    )
    print(f"outputs in {out}: {', '.join(summary['outputs'].values())}")
    return 0


def _print_warnings(summary: dict) -> None:
    """``summary["warnings"]`` (e.g. settings that differ from the bundle's calibration), one
    ``warning: ...`` line each on stderr."""
    for msg in summary.get("warnings", []):
        print(f"warning: {msg}", file=sys.stderr)


class _NotInSummary(logging.Filter):
    """Drops log records the pipeline also puts in ``summary["warnings"]``: the CLI prints those as
    ``warning: ...`` lines itself, once."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .pipeline import SUMMARY_WARNING

        return not getattr(record, SUMMARY_WARNING, False)


def _cmd_bundle(args: argparse.Namespace, progress) -> int:
    from .bundle import open_bundle

    b = open_bundle(args.path)
    if args.action == "verify":
        print(f"OK: bundle '{b.name}' ({len(b.manifest['files'])} files, sha256 {b.sha256}) at {b.source}")
        return 0
    print(json.dumps(b.info(), indent=1))
    return 0


def _cmd_phantom(args: argparse.Namespace, progress) -> int:
    from .phantom import PhantomOptions, write_brats_folder

    opt = PhantomOptions(
        spacing=args.spacing,
        brats_grid=args.brats_grid,
        clinical_grid=args.clinical_grid,
        n_lesions=args.lesions,
    )
    paths = _atomic_folder(
        Path(args.out),
        lambda tmp: write_brats_folder(
            tmp,
            args.cases,
            seed=args.seed,
            options=opt,
            prefix=args.prefix,
            healthy_fraction=args.healthy_fraction,
            progress=progress,
        ),
    )
    print(f"wrote {len(paths)} subject(s) to {args.out}")
    return 0


def _cmd_info(args: argparse.Namespace, progress) -> int:
    import SimpleITK as sitk
    import timm
    import torch

    from .phantom import template_dir

    try:
        templates = str(template_dir())
    except AnomalyDiffusionError as exc:
        templates = f"missing ({exc})"
    info = {
        "AnomalyDiffusionLib": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "SimpleITK": sitk.Version_VersionString(),
        "cuda_available": torch.cuda.is_available(),
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "phantom_templates": templates,
    }
    print(json.dumps(info) if args.json else json.dumps(info, indent=1))
    return 0


def _atomic_folder(out: Path, work):
    """Run ``work(tmp_folder)``; on success move its files into ``out`` (created if needed), on
    failure remove them, so that ``out`` never holds a half-finished result."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".partial-{int(time.time() * 1000)}"
    tmp.mkdir()
    ok = False
    try:
        result = work(tmp)
        for item in tmp.iterdir():
            dest = out / item.name
            if dest.is_dir():
                shutil.rmtree(dest)
            elif dest.exists():
                dest.unlink()
            item.rename(dest)
        ok = True
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok and created:
            shutil.rmtree(out, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anomaly-diffusion", description="Diffusion-model anomaly detection for brain MRI."
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "--progress",
        choices=("bar", "jsonl", "none"),
        default="bar",
        help="progress display: bar (terminal), jsonl (one JSON line per step on stdout), none",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="make a phantom case with a lesion and run detect on it (embedded bundle)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--seed", type=int, default=DEMO_SEED, help=f"phantom seed (default {DEMO_SEED})")
    d.add_argument("--bundle", help="model bundle folder or zip (default: the embedded phantom-small bundle)")
    d.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto: GPU if present")
    d.set_defaults(func=_cmd_demo)

    det = sub.add_parser(
        "detect",
        help="score slices and segment anomalies in one case",
        description="Score every brain slice (AnoDODE) and segment anomalies (AnoFPDM) in a FLAIR + T2 case; "
        "outputs go on the FLAIR grid.",
        epilog="Outputs in --out: segmentation.<fmt> (uint8 labelmap, 1 = anomaly), heatmap.<fmt> (float32 "
        "anomaly map), slices.csv (per-slice scores), summary.json (verdict, most anomalous slice, lesion volume, "
        "timings, device, bundle), overview.png. Shortcuts the bundle enables for CPU budgets (step stride, "
        "gating) are listed in summary.json; --faithful runs the papers' settings.",
    )
    det.add_argument("--flair", required=True, help="FLAIR volume (NIfTI, NRRD, MHA); its grid is the output grid")
    det.add_argument("--t2", required=True, help="T2 volume (resampled onto the FLAIR grid if it differs)")
    det.add_argument("--t1", help="T1 volume (only for bundles trained with it)")
    det.add_argument("--t1ce", help="contrast-enhanced T1 volume (only for bundles trained with it)")
    det.add_argument("--bundle", help="model bundle folder or zip (default: the embedded phantom-small bundle)")
    det.add_argument("--out", required=True, help="output folder (created; files are replaced only on success)")
    det.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda or cuda:N")
    det.add_argument("--methods", help="fpdm, dode or fpdm,dode (default: all in the bundle)")
    det.add_argument("--format", help="output volume format: nii.gz, nii, nrrd, mha (default: FLAIR's)")
    det.add_argument("--faithful", action="store_true", help="paper settings: every step, no early stop, no gating")
    det.add_argument(
        "--gate",
        choices=("none", "dode"),
        help="run AnoFPDM on all brain slices or only on those AnoDODE flags (± 1 neighbour); default: the bundle's",
    )
    det.add_argument("--w", type=float, help="AnoFPDM guidance strength (default: calibrated w*)")
    det.add_argument("--steps", type=int, help="AnoFPDM forward steps of T = 1000 (default: the bundle's)")
    det.add_argument("--stride", type=int, help="visit every N-th forward step (default: the bundle's)")
    det.add_argument(
        "--gap",
        choices=("jump", "extrapolate"),
        help="DDIM with a stride: one eq. 4 step across each gap (jump), or the stride-1 unit steps with ε "
        "extrapolated from the last two visited steps (extrapolate; no extra network calls); default: the bundle's",
    )
    det.add_argument("--mode", choices=("ddim", "ddpm"), help="forward encoding (default: the bundle's)")
    det.add_argument(
        "--early-stop",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stop a slice's forward process after its M_t peak (default: the bundle's)",
    )
    det.add_argument("--cos-threshold", type=float, help="AnoFPDM slice classifier threshold (default: calibrated)")
    det.add_argument("--dode-threshold", type=float, help="AnoDODE decision threshold in bpd (default: calibrated)")
    det.add_argument("--dode-scales", help="subset of the bundle's AnoDODE input scales, e.g. 128,192")
    det.add_argument("--dode-tol", type=float, help="AnoDODE ODE rtol = atol (default: the bundle's)")
    det.add_argument(
        "--dode-probes",
        type=int,
        help="Hutchinson probes averaged per slice for the AnoDODE bpd (default: the bundle's; more = less noise)",
    )
    det.add_argument("--slices", metavar="START:STOP", help="canonical axial slice range (inferior = 0)")
    det.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    det.add_argument("--no-overview", action="store_true", help="skip overview.png")
    det.set_defaults(func=_cmd_detect)

    bu = sub.add_parser("bundle", help="inspect or verify a model bundle")
    bu.add_argument(
        "action",
        choices=("info", "verify"),
        help="info: print the manifest summary; verify: check schema, version and every file's sha256",
    )
    bu.add_argument("path", nargs="?", default=None, help="bundle folder or zip (default: the embedded bundle)")
    bu.set_defaults(func=_cmd_bundle)

    ph = sub.add_parser("phantom", help="write synthetic subjects as BraTS-style folders")
    ph.add_argument("--out", required=True, help="output folder (one sub-folder per subject)")
    ph.add_argument("--cases", type=int, default=1, help="number of subjects (default 1)")
    ph.add_argument("--seed", type=int, default=0, help="seed of the first subject (default 0)")
    ph.add_argument("--spacing", type=float, default=1.0, help="isotropic voxel size in mm (default 1)")
    ph.add_argument("--brats-grid", action="store_true", help="resample onto a 240×240×155, 1 mm BraTS-like grid")
    ph.add_argument(
        "--clinical-grid",
        action="store_true",
        help="resample onto an oblique, axis-flipped 0.9×0.9×3 mm grid (geometry stress test)",
    )
    ph.add_argument("--lesions", type=int, default=None, help="lesions per subject (default: random 1-3)")
    ph.add_argument("--healthy-fraction", type=float, default=0.0, help="fraction of subjects without lesion")
    ph.add_argument("--prefix", default="Case", help="subject name prefix (default Case → Case_0, Case_1, ...)")
    ph.set_defaults(func=_cmd_phantom)

    i = sub.add_parser("info", help="print versions, device and data availability")
    i.add_argument("--json", action="store_true", help="one line of JSON (for programs, e.g. the Slicer module)")
    i.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_cpu_allocator()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NotInSummary())
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        handlers=[handler],
    )
    sink = {"bar": TqdmProgress, "jsonl": JsonlProgress}.get(args.progress)
    _cancel_on_sigterm()
    try:
        if sink is None:
            return args.func(args, None)
        with sink() as progress:
            return args.func(args, progress)
    except AnomalyDiffusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _cancel_on_sigterm() -> None:
    """Turn SIGTERM (the Slicer module's Cancel) into :class:`Cancelled`, so that ``finally`` blocks
    remove partial outputs before the process ends."""
    import signal
    import threading

    from .errors import Cancelled

    def handler(signum, frame):
        raise Cancelled("cancelled")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
