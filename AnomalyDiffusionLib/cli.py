"""``anomaly-diffusion``: the headless command line.

Subcommands:

* ``detect``  score and segment one case (FLAIR + T2) with a model bundle
* ``batch``   ``detect`` on many cases (BraTS folder or CSV), resumable, sharded (:mod:`.batch`)
* ``demo``    make a phantom case with a lesion and run ``detect`` on it (see :func:`run_demo`)
* ``bundle``  ``info`` / ``verify`` a model bundle
* ``phantom`` write synthetic subjects as BraTS-style folders
* ``info``    versions, device, and whether the anatomy templates are available

Errors print one line (``error: ...``) and exit with status 2; outputs are written to a hidden
temporary folder first and moved into place only when complete. The detect options (``detect`` and
``batch``) come from the one schema in :mod:`.options`; ``--progress`` and ``-v`` may also follow the
command name.
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

    options = DetectOptions(device=device)
    result = detect(
        {"flair": paths["flair"], "t2": paths["t2"]},
        bundle=bundle,
        options=options,
        progress=progress,
        cancel=cancel,
    )
    truth = read_labelmap_like(paths["seg"], result.case, "lesion mask") > 0
    if result.labelmap is None:
        raise InputError("the demo needs AnoFPDM's segmentation, and the bundle has no AnoFPDM model")
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
    write_result(result, out, options=options)
    return result.summary


# --------------------------------------------------------------------------------- commands
def add_options(parser: argparse.ArgumentParser) -> None:
    """The detect options of :mod:`.options` on ``parser``."""
    from .options import add_arguments

    add_arguments(parser)


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
    """The :class:`~AnomalyDiffusionLib.options.DetectOptions` of ``detect`` / ``batch`` arguments."""
    from .options import from_namespace

    return from_namespace(args)


def _cmd_detect(args: argparse.Namespace, progress) -> int:
    from .methods import open_checked as open_bundle
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
        write_result(result, tmp, fmt=args.format, overview=not args.no_overview, options=options)
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


def _cmd_batch(args: argparse.Namespace, progress) -> int:
    """``batch``: every case of a folder or CSV through ``detect`` (see :mod:`.batch`). Exit status:
    the number of failed cases (at most 100); a batch that cannot start exits 2 like ``detect``."""
    from dataclasses import replace

    from .batch import distributed_env, find_cases, fingerprint, merge, parse_shard, run_cases, select_shard
    from .methods import open_checked as open_bundle
    from .outputs import check_format

    options = _detect_options(args)
    if args.format:
        check_format(args.format)
    cases = find_cases(args.input)
    shard = parse_shard(args.shard) if args.shard else None
    dist = distributed_env()
    if dist is not None and shard is not None:
        raise InputError("--shard and torchrun both split the cases; use one of them")
    bundle = open_bundle(args.bundle)  # read and verified once for every case
    overview = not args.no_overview
    fp = fingerprint(bundle, options, args.format, overview)
    out = Path(args.out)

    def aggregate() -> int:
        agg = merge(cases, out, bundle, options, fp, args.input)
        print(
            f"{agg['cases']} cases: {agg['ok']} ok, {agg['failed']} failed, {agg['skipped']} not run; "
            f"table {out / 'cases.csv'}, aggregate {out / 'summary.json'}"
        )
        for case_id, error in agg["failed_cases"].items():
            print(f"failed: {case_id}: {error}", file=sys.stderr)
        return min(agg["failed"], 100)

    if args.merge_only:
        if not out.is_dir():
            raise InputError(f"--merge-only: no batch folder '{out}'")
        return aggregate() if dist is None or dist[0] == 0 else 0  # under torchrun rank 0 only

    index, count, run_options = 0, 1, options
    if shard is not None:
        index, count = shard
    if dist is not None:
        import datetime

        import torch
        import torch.distributed as torch_dist

        index, count, local = dist
        if options.device in ("auto", "cuda") and torch.cuda.is_available():
            run_options = replace(options, device=f"cuda:{local}")
        # only a barrier crosses processes (gloo on CPU and GPU alike); ranks may finish hours apart
        torch_dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    mine = select_shard(cases, index, count)
    label = f"shard {index}/{count}: " if count > 1 else ""
    warned: set[str] = set()

    def line(i: int, total: int, rec: dict, skipped: bool) -> None:
        for msg in rec.get("warnings", []):  # e.g. settings unlike the bundle's calibration: once, not per case
            if msg not in warned:
                warned.add(msg)
                print(f"warning: {msg}", file=sys.stderr)
        if skipped:
            what = "up to date (same bundle and settings), not run again"
        elif rec["status"] == "ok":
            vol = rec.get("lesion_volume_ml")
            what = f"ok, {rec['verdict']}" + (f", {vol} mL" if vol is not None else "") + f", {rec['time_s']} s"
        else:
            what = f"failed: {rec['error']}"
        print(f"{label}[{i + 1}/{total}] {rec.get('id')}: {what}", flush=True)

    records = run_cases(
        mine,
        out,
        bundle,
        run_options,
        fp,
        fmt=args.format,
        overview=overview,
        force=args.force,
        progress=progress,
        on_case=line,
    )
    failed_here = sum(r.get("status") == "failed" for r in records)
    if dist is not None:
        torch_dist.barrier()
        try:
            if index == 0:
                return aggregate()
        finally:
            torch_dist.destroy_process_group()
        return min(failed_here, 100)
    if count > 1:
        print(f"{label}{len(mine)} cases, {failed_here} failed; after the last shard, rerun with --merge-only")
        return min(failed_here, 100)
    return aggregate()


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
    from .methods import open_checked as open_bundle

    b = open_bundle(args.path)
    if args.action == "verify":
        print(f"OK: bundle '{b.name}' ({len(b.manifest['files'])} files, sha256 {b.sha256}) at {b.source}")
        return 0
    if args.json:
        print(json.dumps(b.info(), indent=1))
        return 0
    from . import card

    meta = b.document(card.METADATA)
    if meta is None:  # bundles written before the card existed: the manifest's own statements
        version = f" {b.manifest['version']}" if b.manifest.get("version") else ""
        print(f"bundle '{b.name}'{version} has no card ({card.METADATA}); manifest summary:")
        print(json.dumps(b.info(), indent=1))
    else:
        print(card.render(json.loads(meta)))
        print(f"sha256 {b.sha256}  source {b.source}  (technical details: bundle info --json)")
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


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (``error: ...``, status 2), as every other failure of the CLI."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def _global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """``--progress`` and ``-v``: on the main parser with their defaults, and on every command with
    no default (so that ``detect --progress none`` works and an absent one keeps the main value)."""
    parser.add_argument(
        "--progress",
        choices=("bar", "jsonl", "none"),
        default=argparse.SUPPRESS if suppress else "bar",
        help="progress display: bar (terminal), jsonl (one JSON line per step on stdout), none",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="log details to stderr",
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="anomaly-diffusion", description="Diffusion-model anomaly detection for brain MRI.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _global_options(p, suppress=False)
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    d = command("demo", help="make a phantom case with a lesion and run detect on it (embedded bundle)")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--seed", type=int, default=DEMO_SEED, help=f"phantom seed (default {DEMO_SEED})")
    d.add_argument("--bundle", help="model bundle folder or zip (default: the embedded phantom-small bundle)")
    d.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default auto: GPU if present")
    d.set_defaults(func=_cmd_demo)

    det = command(
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
    det.add_argument("--format", help="output volume format: nii.gz, nii, nrrd, mha (default: FLAIR's)")
    det.add_argument("--no-overview", action="store_true", help="skip overview.png")
    add_options(det)
    det.set_defaults(func=_cmd_detect)

    ba = command(
        "batch",
        help="detect on many cases (BraTS folder or CSV), resumable, sharded",
        description="Run detect on every case of a BraTS-layout folder (2021 <id>_flair/_t2/_t1/_t1ce/_seg or "
        "2023 <id>-t2f/-t2w/-t1n/-t1c/-seg names, one sub-folder per case) or of a CSV with columns "
        "id,flair,t2[,t1,t1ce,truth]. The bundle is loaded once.",
        epilog="Outputs: OUT/<id>/ with exactly what detect writes, OUT/cases.csv (one row per case: status, error, "
        "verdict, lesion volume and slices, most anomalous slice, time, and DICE / lesion-slice sensitivity / "
        "false-positive volume against a truth mask), OUT/summary.json (counts, mean/sd/median, settings, bundle), "
        "OUT/_batch/<id>.json (per-case records). Rerunning skips cases already done with the same bundle and "
        "settings. Exit status: the number of failed cases (at most 100); 2 if the batch cannot start. Under "
        "torchrun each rank takes its share of the cases (and GPU LOCAL_RANK); rank 0 writes the table.",
    )
    ba.add_argument("--input", required=True, help="BraTS-layout folder or cases CSV")
    ba.add_argument("--out", required=True, help="batch output folder (one sub-folder per case)")
    ba.add_argument("--bundle", help="model bundle folder or zip (default: the embedded phantom-small bundle)")
    ba.add_argument("--format", help="output volume format: nii.gz, nii, nrrd, mha (default: each FLAIR's)")
    ba.add_argument("--no-overview", action="store_true", help="skip overview.png")
    ba.add_argument("--force", action="store_true", help="redo cases that are already done")
    ba.add_argument("--shard", metavar="I/N", help="run every N-th case starting at I (0-based), e.g. a Slurm array")
    ba.add_argument(
        "--merge-only", action="store_true", help="run nothing; rebuild cases.csv and summary.json from OUT"
    )
    add_options(ba)
    ba.set_defaults(func=_cmd_batch)

    bu = command("bundle", help="inspect or verify a model bundle")
    bu.add_argument(
        "action",
        choices=("info", "verify"),
        help="info: print the bundle's card (what it is for, its data, inputs/outputs, measured figures); "
        "verify: check schema, version and every file's sha256",
    )
    bu.add_argument("--json", action="store_true", help="info: the manifest summary as JSON instead of the card")
    bu.add_argument("path", nargs="?", default=None, help="bundle folder or zip (default: the embedded bundle)")
    bu.set_defaults(func=_cmd_bundle)

    ph = command("phantom", help="write synthetic subjects as BraTS-style folders")
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

    i = command("info", help="print versions, device and data availability")
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
