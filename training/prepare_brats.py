#!/usr/bin/env python
"""Turn a BraTS2021- or ATLAS v2.0-layout folder into the slice datasets used for training.

Writes OUT/{train,val,test}/ (images.npy, masks.npy, labels.npy, index.csv, meta.json) and
OUT/split.json (the patient-level split). Preprocessing follows AnoFPDM appendix B: per-subject
division by the 99th percentile of brain voxels, scaling to [-1, 1], axial slices resized to 128×128;
a slice's label is 1 when it holds any lesion voxel.

Examples:
  python training/prepare_brats.py --data /data/BraTS2021 --out data/brats128
  python training/prepare_brats.py --data /data/ATLAS_2 --layout atlas --out data/atlas128
  python training/prepare_brats.py --data /data/BraTS2021 --out data/bmad --modalities flair --slices 60:100
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from AnomalyDiffusionLib.cli_support import TqdmProgress, parse_slice_range
from AnomalyDiffusionLib.datasets import BRATS_MODALITIES, find_atlas_cases, find_brats_cases, prepare_dataset
from AnomalyDiffusionLib.errors import AnomalyDiffusionError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[6:]),
    )
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="dataset root (BraTS: one folder per subject; ATLAS: BIDS tree)",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder for train/, val/, test/ and split.json")
    p.add_argument("--layout", choices=("brats", "atlas"), default="brats", help="folder layout (default: brats)")
    p.add_argument(
        "--modalities",
        default=None,
        help=f"comma-separated channels in order (default brats: {','.join(BRATS_MODALITIES)}; atlas: t1)",
    )
    p.add_argument("--size", type=int, default=128, help="square slice size in pixels (default 128)")
    p.add_argument(
        "--fov-mm",
        type=float,
        default=None,
        help="frame each subject's brain in a square of this side in mm (as a bundle with slice_fov_mm does "
        "at inference; default: the scanner's whole field of view, as the papers)",
    )
    p.add_argument(
        "--slices",
        default=None,
        metavar="START:STOP",
        help="axial slice range [START, STOP) counted from inferior (default: every slice with brain)",
    )
    p.add_argument(
        "--split", default="0.75,0.05,0.20", help="train,val,test patient fractions (default 0.75,0.05,0.20)"
    )
    p.add_argument(
        "--seed", type=int, default=10, help="seed of the patient shuffle (default 10, as the reference code)"
    )
    p.add_argument(
        "--min-brain-fraction",
        type=float,
        default=0.01,
        help="drop slices whose brain covers less than this fraction of the slice (default 0.01)",
    )
    p.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default="float16",
        help="image storage type (default float16)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every resampling decision")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.layout == "brats":
            mods = tuple(args.modalities.split(",")) if args.modalities else BRATS_MODALITIES
            cases = find_brats_cases(args.data, mods)
        else:
            mods = tuple(args.modalities.split(",")) if args.modalities else ("t1",)
            if mods != ("t1",):
                raise AnomalyDiffusionError("ATLAS v2.0 has T1 only; use --modalities t1")
            cases = find_atlas_cases(args.data)
        start, stop = parse_slice_range(args.slices)
        fractions = tuple(float(x) for x in args.split.split(","))
        with TqdmProgress() as progress:
            summary = prepare_dataset(
                cases,
                args.out,
                mods,
                size=args.size,
                start=start,
                stop=stop,
                fractions=fractions,
                seed=args.seed,
                min_brain_fraction=args.min_brain_fraction,
                dtype=args.dtype,
                source=str(args.data),
                progress=progress,
                fov_mm=args.fov_mm,
            )
    except (AnomalyDiffusionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, s in summary["splits"].items():
        n_sub, n_sl, n_bad = len(s["subjects"]), s["slices"], s["unhealthy"]
        print(f"{name:5s}: {n_sub:4d} subjects, {n_sl:6d} slices ({n_bad} unhealthy)")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
