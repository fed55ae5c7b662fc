"""Measure a bundle's intensity reference: the training data's brain-intensity landmarks.

The landmark standardisation (:mod:`AnomalyDiffusionLib.intensity`, ``detect --intensity landmarks``)
maps each case's brain percentiles (10th, 25th, 50th, 75th, as fractions of its 99th) onto the
training data's. This script measures them: per subject on its brain mask, then the median over
subjects, per modality. Measure it on the subjects the models were trained on (or a sample of them),
never on evaluation cases.

    # bundle 3.3's reference: the subjects AnoFPDM 2.x / 3.0 was trained on (2 mm phantoms)
    python training/intensity_reference.py --phantom 24 --phantom-seed 1000 \
        --phantom 36 --phantom-seed 3000 --phantom-randomise --out runs/intensity_reference.json
    # a BraTS2021-layout training folder (subjects listed in prepare_brats.py's split.json: train)
    python training/intensity_reference.py --data /data/BraTS2021 --split data/brats128/split.json \
        --modalities flair,t2 --out runs/intensity_reference.json

Writes the manifest block (``make_bundle.py --intensity-reference FILE``) with the per-subject
spread beside it, about 5 s per 2 mm phantom subject.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from AnomalyDiffusionLib.datasets import find_brats_cases
from AnomalyDiffusionLib.errors import AnomalyDiffusionError
from AnomalyDiffusionLib.intensity import LANDMARK_PERCENTILES, IntensityReference, landmarks
from AnomalyDiffusionLib.phantom import PhantomOptions, make_subject
from AnomalyDiffusionLib.volumes import case_from_images, load_case

log = logging.getLogger("intensity_reference")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--phantom",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="N phantom subjects (as train_fpdm.py --phantom); repeat with its own --phantom-seed and "
        "--phantom-randomise for each training set",
    )
    p.add_argument("--phantom-seed", type=int, action="append", default=[], help="first seed of each --phantom set")
    p.add_argument(
        "--phantom-randomise",
        action="append_const",
        const=True,
        dest="randomise_marks",
        help="the preceding --phantom set is domain-randomised (give it after that set's --phantom-seed)",
    )
    p.add_argument("--phantom-healthy-fraction", type=float, default=0.25, help="as train_fpdm.py (default 0.25)")
    p.add_argument("--phantom-spacing", type=float, default=2.0, help="as train_fpdm.py (default 2)")
    p.add_argument("--data", type=Path, default=None, help="a BraTS2021-layout folder of training subjects")
    p.add_argument("--split", type=Path, default=None, help="prepare_brats.py's split.json: use its train subjects")
    p.add_argument("--modalities", default="flair,t2", help="comma-separated modalities (default flair,t2)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    return p


def _phantom_sets(p: argparse.ArgumentParser, argv: list[str]) -> list[tuple[int, int, bool]]:
    """(N, first seed, randomised) per --phantom set, read in command-line order."""
    sets: list[list] = []
    it = iter(argv)
    for tok in it:
        if tok == "--phantom":
            sets.append([int(next(it)), 1000, False])
        elif tok == "--phantom-seed":
            if not sets:
                p.error("--phantom-seed goes after its --phantom N")
            sets[-1][1] = int(next(it))
        elif tok == "--phantom-randomise":
            if not sets:
                p.error("--phantom-randomise goes after its --phantom N")
            sets[-1][2] = True
    return [(n, s, r) for n, s, r in sets]


def subject_landmarks(args: argparse.Namespace, argv: list[str], p: argparse.ArgumentParser):
    """Yield (name, {modality: landmarks [P]}) per training subject."""
    mods = [m.strip() for m in args.modalities.split(",") if m.strip()]
    for n, seed, randomise in _phantom_sets(p, argv):
        healthy = round(args.phantom_healthy_fraction * n)
        for i in range(n):
            # the same subjects train_fpdm.py --phantom draws (datasets.phantom_dataset)
            opt = PhantomOptions(spacing=args.phantom_spacing, modalities=tuple(mods), randomise=randomise)
            if i >= n - healthy:
                opt = PhantomOptions(
                    spacing=args.phantom_spacing, modalities=tuple(mods), randomise=randomise, n_lesions=0
                )
            ph = make_subject(seed + i, opt)
            case = case_from_images({m: ph.images[m] for m in mods})
            yield f"phantom {seed + i}", {m: landmarks(case.arrays[m], case.mask) for m in mods}
    if args.data is not None:
        cases = find_brats_cases(args.data, mods)
        if args.split is not None:
            train = set(json.loads(args.split.read_text())["splits"]["train"]["subjects"])
            cases = [c for c in cases if c.subject in train]
        for c in cases:
            case = load_case({m: c.images[m] for m in mods})
            yield c.subject, {m: landmarks(case.arrays[m], case.mask) for m in mods}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    args = p.parse_args(argv)
    if not args.phantom and args.data is None:
        p.error("give --phantom N (with its --phantom-seed) or --data FOLDER")
    per: dict[str, list[np.ndarray]] = {}
    names = []
    try:
        for name, marks in subject_landmarks(args, argv, p):
            names.append(name)
            for m, v in marks.items():
                per.setdefault(m, []).append(v)
            log.info("%s: %s", name, {m: np.round(v, 3).tolist() for m, v in marks.items()})
    except AnomalyDiffusionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not names:
        print("error: no training subjects found", file=sys.stderr)
        return 2
    ref = IntensityReference(
        percentiles=LANDMARK_PERCENTILES,
        values={m: tuple(float(x) for x in np.median(np.stack(v), 0)) for m, v in per.items()},
    )
    phantom_sets = _phantom_sets(p, argv)
    parts = [f"{n} {'domain-randomised ' if r else ''}phantoms (seed {s})" for n, s, r in phantom_sets]
    if args.data is not None:
        parts.append(f"{len(names) - sum(n for n, _, _ in phantom_sets)} subjects of {args.data}")
    data = ", ".join(parts)
    block = ref.as_manifest(f"median over the training subjects: {data}")
    block["spread"] = {m: [round(float(x), 4) for x in np.std(np.stack(v), 0)] for m, v in per.items()}
    block["subjects"] = len(names)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(block, indent=1))
    log.info("wrote %s: %s", args.out, block["modalities"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
