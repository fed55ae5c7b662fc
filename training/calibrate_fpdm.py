#!/usr/bin/env python
"""Calibrate AnoFPDM on validation slices with image-level labels only (AnoFPDM section 4.2).

For every candidate guidance strength w: run the forward process, compute each slice's cosine
similarity of the guided and unguided MSE sequences (eq. 18), and choose the threshold that best
separates healthy from unhealthy slices. w* = the largest w whose accuracy stays within 99 % of the
best. M_max = the largest M_{t_e} (per channel) over the validation slices labelled unhealthy. No
pixel labels are read. All candidate w share one forward pass.

When the best accuracy sits at the largest candidate (rising or level there), the grid extends
itself (fpdm.extend_guidance_grid: 1.5× the last candidate, two per round, up to --w-cap) with one
more forward pass per round, until the accuracy falls below the best at the top or the cap is
reached; the report's "grid_extension" says which candidates each round added and why. M_t grows as (1 + w)²
(eq. 13), so M_max is taken from the run at the chosen w*, and inference must use that w (detect
warns otherwise). The calibration records the settings it was made with ("calibration"."settings").
The logic is the library's (AnomalyDiffusionLib.fpdm.calibrate.calibrate_fpdm); this script reads the
model and the validation slices and writes the report.

Writes calibration_fpdm_<mode>.json (settings for inference, the calibration, the table per w) and
calibration_fpdm_<mode>.png (accuracy vs w, as in Fig. 5a) into --out (default: the model's folder),
and the trained, calibrated model as an AnoFPDM-only bundle in OUT/bundle_fpdm_<mode> (--bundle
elsewhere, --no-bundle to skip): the form detect, the evaluators and make_bundle.py --from read.
The cosine threshold depends on the encoding, so each mode (ddim, ddpm) is calibrated separately.

Examples:
  python training/calibrate_fpdm.py --model runs/fpdm/fpdm.safetensors --data data/brats128 --max-slices 1000
  python training/calibrate_fpdm.py --model runs/fpdm_small --phantom 6 --w 0,1,2,3,5 --stride 10
  python training/calibrate_fpdm.py --model runs/fpdm --data data/brats128 --bundle bundles/brats-fpdm
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from AnomalyDiffusionLib.cli_support import TqdmProgress
from AnomalyDiffusionLib.datasets import load_or_make
from AnomalyDiffusionLib.devices import for_inference, resolve_device, tune_cpu_allocator
from AnomalyDiffusionLib.errors import AnomalyDiffusionError
from AnomalyDiffusionLib.fpdm import FPDMSettings, channel_indices
from AnomalyDiffusionLib.fpdm.calibrate import calibrate_fpdm
from AnomalyDiffusionLib.fpdm.model import load_unet_any


def add_forward_args(p: argparse.ArgumentParser) -> None:
    """Flags shared with evaluate_fpdm.py: how the forward process runs."""
    p.add_argument("--mode", choices=("ddim", "ddpm"), default="ddim", help="encoding (default ddim)")
    p.add_argument(
        "--unguided",
        choices=("null", "healthy"),
        default="null",
        help="unguided prediction: null label (paper eq. 10, default) or healthy label with w=0 (reference code)",
    )
    p.add_argument(
        "--steps", type=int, default=600, help="forward steps of T=1000 (default 600, as the reference code)"
    )
    p.add_argument("--stride", type=int, default=1, help="visit every N-th step (default 1; CPU runs use 10-20)")
    p.add_argument(
        "--gap",
        choices=("jump", "extrapolate"),
        default="jump",
        help="DDIM with a stride: one eq. 4 step per gap (default) or the stride-1 unit steps with ε extrapolated",
    )
    p.add_argument("--cosine-steps", type=int, default=None, help="horizon of the cosine sequences (default: --steps)")
    p.add_argument(
        "--clip-denoised",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clamp the guided/unguided predictions to [-1, 1] (reference code, default); --no-clip-denoised "
        "follows the paper's eqs. 7 and 10",
    )
    p.add_argument(
        "--cosine-weighting",
        choices=("spacing", "uniform"),
        default="spacing",
        help="eq. 18 terms weighted by the steps each visited step stands for (default) or all alike",
    )
    p.add_argument("--map-modalities", default="flair,t2", help="channels used for M_t and maps (default flair,t2)")
    p.add_argument("--batch-size", type=int, default=32, help="slices per network batch (default 32)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(
        description=doc[0], epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, type=Path, help="fpdm.safetensors, or a training run folder")
    p.add_argument("--data", type=Path, help="prepared slice dataset (its val/ split is used)")
    p.add_argument("--phantom", type=int, metavar="N", help="use N synthetic validation subjects instead")
    p.add_argument("--phantom-seed", type=int, default=5000, help="seed of the first phantom subject (default 5000)")
    p.add_argument(
        "--phantom-randomise",
        action="store_true",
        help="domain-randomised validation phantoms (PhantomOptions.randomise), for a model trained with "
        "train_fpdm.py --phantom-randomise",
    )
    p.add_argument("--max-slices", type=int, default=1000, help="random subset size (default 1000, as the paper)")
    p.add_argument("--w", default="0,0.5,1,2,3,5", help="candidate guidance strengths (default 0,0.5,1,2,3,5)")
    p.add_argument("--tolerance", type=float, default=0.99, help="w* keeps this fraction of the best accuracy")
    p.add_argument(
        "--w-cap",
        type=float,
        default=40.0,
        help="largest w the grid may extend to while accuracy still rises at its top (default 40; 0: no extension)",
    )
    p.add_argument("--a", type=float, default=0.90, help="lowest quantile of Algorithm 1 (default 0.90)")
    p.add_argument("--b", type=float, default=0.98, help="highest quantile of Algorithm 1 (default 0.98)")
    p.add_argument("--median-size", type=int, default=5, help="median filter size before thresholding (default 5)")
    p.add_argument("--min-component", type=int, default=40, help="remove components ≤ this at 128² (default 40)")
    add_forward_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the model's folder)")
    p.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="where the AnoFPDM-only model bundle (the trained and calibrated model, loadable like any "
        "bundle) is written (default OUT/bundle_fpdm_<mode>; make_bundle.py combines AnoFPDM and AnoDODE)",
    )
    p.add_argument("--no-bundle", action="store_true", help="write only the calibration report")
    return p


def calibrate(args) -> dict:
    """The calibration report: :func:`~AnomalyDiffusionLib.fpdm.calibrate.calibrate_fpdm` on the model and
    validation slices the command line names, with their provenance."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    model, meta = load_unet_any(args.model, device=device)
    for_inference(model, device)
    mods = list(meta["modalities"])
    chans = channel_indices(mods, args.map_modalities)
    with TqdmProgress() as progress:
        x, ds = load_or_make(
            args.data,
            "val",
            args.phantom,
            mods,
            model.config.image_size,
            args.phantom_seed,
            max_slices=args.max_slices,
            seed=args.seed,
            progress=progress,
            fov_mm=meta.get("fov_mm"),  # the framing the model was trained with
            randomise=args.phantom_randomise,
        )
        ws = [float(w) for w in args.w.split(",")]
        st = FPDMSettings(
            w=min(ws),
            steps=args.steps,
            stride=args.stride,
            gap=args.gap,
            mode=args.mode,
            unguided=args.unguided,
            map_channels=chans,
            cosine_steps=args.cosine_steps,
            cosine_weighting=args.cosine_weighting,
            clip_denoised=args.clip_denoised,
            batch_size=args.batch_size,
        )
        res = calibrate_fpdm(
            model,
            x,
            np.asarray(ds.labels),
            st,
            ws,
            tolerance=args.tolerance,
            w_cap=args.w_cap,
            a=args.a,
            b=args.b,
            median_size=args.median_size,
            min_component=args.min_component,
            seed=args.seed,
            device=device,
            progress=progress,
        )
    source = (
        str(args.data)
        if args.data
        else f"{'domain-randomised ' if args.phantom_randomise else ''}phantom x{args.phantom} seed {args.phantom_seed}"
    )
    return {
        "method": "fpdm",
        "model": str(args.model),
        "model_iterations": meta.get("iterations"),
        **res,
        "validation": {**res["validation"], "source": source},
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [float(w) for w in report["table"]]
    acc = [v["accuracy"] for v in report["table"].values()]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.plot(ws, acc, "o-")
    ax.axvline(report["calibration"]["w"], color="k", ls="--", lw=1, label=f"w* = {report['calibration']['w']:g}")
    ax.axhline(max(acc) * 0.99, color="grey", lw=0.8, ls=":", label="99 % of best")
    ax.set_xlabel("guidance strength w")
    ax.set_ylabel("validation accuracy (cosine)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_cpu_allocator()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("AnomalyDiffusionLib.fpdm.calibrate").setLevel(logging.INFO)  # grid extension rounds
    try:
        report = calibrate(args)
    except (AnomalyDiffusionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = args.out or (args.model if args.model.is_dir() else args.model.parent)
    out.mkdir(parents=True, exist_ok=True)
    name = f"calibration_fpdm_{args.mode}"
    tmp = out / f".{name}.json.partial"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out / f"{name}.json")
    plot(report, out / f"{name}.png")
    for w, v in report["table"].items():
        added = f" (grid extension round {v['round']})" if v["round"] else ""
        print(f"w = {float(w):5.2f}: accuracy {v['accuracy']:.3f} at cosine threshold {v['threshold']:.5f}{added}")
    c = report["calibration"]
    print(
        f"w* = {c['w']:g}, cosine threshold {c['cos_threshold']:.5f}, M_max {[f'{m:.3g}' for m in c['m_max']]}; "
        f"{report['validation']['slices']} slices in {report['seconds']} s -> {out / (name + '.json')}"
    )
    if args.no_bundle:
        return 0
    import make_bundle  # beside this script

    # the end product of AnoFPDM training: one format that every loader reads (fpdm.model.fpdm_from_bundle)
    bundle = args.bundle or out / f"bundle_fpdm_{args.mode}"
    return make_bundle.main(
        ["--fpdm", str(args.model), "--fpdm-calibration", str(out / f"{name}.json"), "--out", str(bundle)]
    )


if __name__ == "__main__":
    sys.exit(main())
