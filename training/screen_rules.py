"""Screen a bundle's best development rules against the hard robustness tests, before shipping one.

``choose_volume_z.py`` ranks the volume rules by their development score; the rule a bundle ships is
the best-ranked one that also passes ``Testing/test_robustness.py``. Running that test once per rule
(with each candidate installed) costs about 5 minutes a rule, so this script runs the test's inputs
once — the robustness phantom (seed 71, 2 mm) as is, under a smooth ±20 % bias field and under a gamma
of 0.8 and 1.25, its healthy twin, and the twin with the lesion's 5 widest slices put back — and
decides every ranked rule from those forward passes (about 7 ``detect`` calls, 4-6 minutes on 2 cores).

A rule passes when (the test's assertions): the original mask is a finding of the lesion (more than
half of it lesion, more than 2 mL; up to bundle 3.6 the guard was DICE to truth > 0.5, see the test's
comment); DICE to the original mask is >= 0.9 under both bias fields (+20 % and -20 %; bundles up to 3.6
passed only the +20 % one, and the -20 % test was an expected failure) and both gammas; the healthy twin
gets <= 2 mL; and the volume decision flags exactly the 5 inserted slices. Install the chosen bundle and
run ``Testing/test_robustness.py`` itself afterwards: this is a screen, not the test.

Example (the 3.6 procedure; training/README.md#the-embedded-default-bundle)::

    python training/choose_volume_z.py --bundle runs/cand37 --out runs/dev37 --threads 2
    python training/screen_rules.py --bundle runs/cand37 --choice runs/dev37/choice.json --top 40 \
        --out runs/dev37/screen.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from AnomalyDiffusionLib.bundle import open_bundle
from AnomalyDiffusionLib.metrics import dice
from AnomalyDiffusionLib.options import DetectOptions
from AnomalyDiffusionLib.phantom import PhantomOptions, make_subject, smooth_noise
from AnomalyDiffusionLib.pipeline import detect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from choose_volume_z import rule_key, rule_masks  # a sibling script, not a package

#: the robustness phantom of Testing/test_robustness.py
PHANTOM = {"seed": 71, "spacing": 2.0, "lesion_radius_mm": (20.0, 26.0)}
#: the test's bias-field draw (rng seed, correlation length in mm) and amplitude
FIELD_SEED, FIELD_MM, FIELD_AMPLITUDE = 5, 20.0, 0.2
HEALTHY_ML = 2.0
K_SLICES = 5


def table_rule(row: dict) -> tuple:
    """A row of ``choice.json``'s table as a rule tuple of ``choose_volume_z.RULES``."""
    seed = None if row["seed_map_z"] is None else (row["seed_map_z"], row["seed_flair_z"])
    refine = (
        None
        if row["refine_flair_z"] is None
        else (row["refine_flair_z"], row["refine_reach_mm"], row["refine_keep_flair_z"])
    )
    return (row["z"], row["flair_hyper_z"], row["grow_z"], seed, row["flair_bias_px"], refine, row["components"])


def _transformed(images: dict, fn: Callable[[np.ndarray], np.ndarray]) -> dict:
    out = {}
    for name in ("flair", "t2"):
        arr = fn(sitk.GetArrayFromImage(images[name]).astype(np.float32))
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.CopyInformation(images[name])
        out[name] = img
    return out


def _gamma(gamma: float) -> Callable[[np.ndarray], np.ndarray]:
    def fn(a: np.ndarray) -> np.ndarray:
        top = float(a.max())
        return top * (np.clip(a, 0, None) / top) ** gamma

    return fn


def _decide(images: dict, bundle, rules: list[tuple]) -> tuple[dict, dict, object]:
    """One forward process of ``images``; per rule key its canonical mask and flagged slice indices."""
    res = detect(images, bundle, DetectOptions(methods=("fpdm",), calibration="volume", gate="none"))
    fwd, cal = res.extras["fpdm_forward"], res.extras["fpdm_calibration"]
    flair = res.model_images[:, bundle.modalities.index("flair")]
    masks, flagged = {}, {}
    for rule, mask, _, slices in rule_masks(
        fwd, cal, flair, res.case, res.indices, res.fit, res.refinement_flair_z(), rules
    ):
        masks[rule_key(*rule)] = mask
        flagged[rule_key(*rule)] = slices
    return masks, flagged, res


def screen(bundle, rules: list[tuple], log: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """The hard tests' figures for every rule (keyed by ``rule_key``), with ``passes``."""
    opts = PhantomOptions(spacing=PHANTOM["spacing"], n_lesions=1, lesion_radius_mm=PHANTOM["lesion_radius_mm"])
    lesion = make_subject(PHANTOM["seed"], opts)
    healthy = make_subject(
        PHANTOM["seed"],
        PhantomOptions(spacing=PHANTOM["spacing"], n_lesions=0, lesion_radius_mm=PHANTOM["lesion_radius_mm"]),
    )
    field = smooth_noise(np.random.default_rng(FIELD_SEED), lesion.mask.shape, FIELD_MM)
    field = FIELD_AMPLITUDE * field / np.abs(field).max()
    variants = {
        "orig": lambda a: a,
        "bias+20%": lambda a: a * (1 + field),
        "bias-20%": lambda a: a * (1 - field),
        "gamma0.8": _gamma(0.8),
        "gamma1.25": _gamma(1.25),
    }
    masks = {}
    for name, fn in variants.items():
        masks[name], _, res = _decide(_transformed(lesion.images, fn), bundle, rules)
        if name == "orig":
            truth = res.case.reorientation.to_canonical(sitk.GetArrayFromImage(lesion.labels)) > 0
            voxel_ml = float(np.prod(res.case.spacing)) / 1000.0
        log(f"{name}: decided")
    healthy_masks, _, _ = _decide(healthy.images, bundle, rules)
    log("healthy twin: decided")
    area = lesion.mask.reshape(len(lesion.mask), -1).sum(1)
    k_slices = np.sort(np.argsort(area)[-K_SLICES:])  # the lesion's widest slices
    spliced = {}
    for name in ("flair", "t2"):
        arr = sitk.GetArrayFromImage(healthy.images[name])
        arr[k_slices] = sitk.GetArrayFromImage(lesion.images[name])[k_slices]
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(healthy.images[name])
        spliced[name] = img
    _, flagged, kres = _decide(spliced, bundle, rules)
    marker = np.zeros(lesion.mask.shape, np.uint8)
    marker[k_slices] = 1
    inserted = np.flatnonzero(kres.case.reorientation.to_canonical(marker).reshape(len(marker), -1).any(1)).tolist()
    log("K-slice volume: decided")
    rows = {}
    for rule in rules:
        key = rule_key(*rule)
        orig = masks["orig"][key]
        row = {
            "truth_dice": round(dice(orig, truth), 4),
            "precision": round(float((orig & truth).sum()) / max(int(orig.sum()), 1), 4),
            "volume_ml": round(float(orig.sum()) * voxel_ml, 3),
            **{v: round(dice(masks[v][key], orig), 4) for v in variants if v != "orig"},
            "healthy_ml": round(float(healthy_masks[key].sum()) * voxel_ml, 3),
            "k_slices_exact": flagged[key] == inserted,
        }
        row["passes"] = bool(
            row["precision"] > 0.5
            and row["volume_ml"] > HEALTHY_ML
            and min(row["bias+20%"], row["bias-20%"], row["gamma0.8"], row["gamma1.25"]) >= 0.9
            and row["healthy_ml"] <= HEALTHY_ML
            and row["k_slices_exact"]
        )
        rows[key] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle folder or zip whose AnoFPDM weights are screened")
    p.add_argument("--choice", type=Path, required=True, help="choose_volume_z.py's choice.json for that bundle")
    p.add_argument("--top", type=int, default=40, help="screen the best N rules by development score (default 40)")
    p.add_argument("--out", type=Path, required=True, help="JSON with every screened rule and the first passing one")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    bundle = open_bundle(args.bundle)
    choice = json.loads(args.choice.read_text())
    if choice.get("bundle_sha256") not in (None, bundle.sha256):
        print(f"warning: {args.choice} was made with another bundle's weights", file=sys.stderr)
    ranked = sorted(choice["table"], key=lambda t: -round(t["score"], 6))[: args.top]
    rules = [table_rule(t) for t in ranked]
    figures = screen(bundle, rules, log=lambda s: print(s, flush=True))
    rows = [{"key": t["key"], "dev_score": round(t["score"], 4), **figures[t["key"]]} for t in ranked]
    for row in rows:
        print(row, flush=True)
    first = next((r for r in rows if r["passes"]), None)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bundle_sha256": bundle.sha256, "rows": rows, "first_passing": first}, indent=1))
    print(f"first passing rule: {first['key'] if first else 'none'} -> {args.out}")
    return 0 if first else 1


if __name__ == "__main__":
    raise SystemExit(main())
