#!/usr/bin/env python
"""Per-case time and peak memory of ``detect`` with a bundle (default: the embedded one) on a
BraTS-sized phantom (240 × 240 × 155, 1 mm), the size of a typical preprocessed clinical case.

Each case runs in a fresh subprocess so that its peak resident memory (``ru_maxrss``) is its own.
Prints, per case: wall time, CPU time (user + system), peak RSS, per-stage timings, slices analysed,
and the DICE of the segmentation against the phantom's mask. Aim (issue #5): < 60 s and < 4 GB on
two CPU cores with the default bundle.

  python benchmarks/volume_speed.py                       # default bundle, one case, CPU
  python benchmarks/volume_speed.py --cases 3 --faithful  # the papers' settings (much slower)
  python benchmarks/volume_speed.py --bundle my.zip --device cuda
  python benchmarks/volume_speed.py --compare old-bundle/   # side by side: ratio of wall times

With ``--compare``, every case runs with each bundle in turn (default bundle first, then each
``--compare`` bundle, case by case, so a busy machine slows them alike), and the last line gives
each bundle's mean wall time relative to the first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
import numpy as np, SimpleITK as sitk
from AnomalyDiffusionLib.metrics import dice
from AnomalyDiffusionLib.phantom import PhantomOptions, make_subject, write_case
from AnomalyDiffusionLib.pipeline import DetectOptions, detect
from AnomalyDiffusionLib.volumes import read_labelmap_like
from AnomalyDiffusionLib.devices import tune_cpu_allocator

tune_cpu_allocator()  # as the CLI does
seed, out, bundle, device = int(sys.argv[1]), sys.argv[2], sys.argv[3] or None, sys.argv[4]
faithful = sys.argv[5] == "1"
ph = make_subject(seed, PhantomOptions(brats_grid=True, n_lesions=1, modalities=("flair", "t2")))
paths = write_case(ph, out, f"case{seed}")
r0 = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.perf_counter()
opts = DetectOptions(device=device, faithful=faithful)
res = detect({"flair": paths["flair"], "t2": paths["t2"]}, bundle=bundle, options=opts)
wall = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
truth = read_labelmap_like(paths["seg"], res.case) > 0
pred = None
if res.labelmap is not None:
    pred = res.case.reorientation.to_canonical(sitk.GetArrayFromImage(res.labelmap)) > 0
print(json.dumps({
    "seed": seed,
    "size": list(res.case.reference.GetSize()),
    "slices_analysed": res.summary["slices_analysed"],
    "wall_s": round(wall, 1),
    "cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 1),
    "peak_rss_GB": round(r1.ru_maxrss / 1024**2, 2),
    "stages_s": res.summary["timings_s"],
    "shortcuts": res.summary["shortcuts"],
    "dice_vs_truth": None if pred is None else round(dice(pred, truth), 3),
    "device": res.summary["device"],
}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", default="", help="bundle folder or zip (default: the embedded bundle)")
    p.add_argument("--cases", type=int, default=1, help="phantom cases (default 1)")
    p.add_argument("--seed", type=int, default=500, help="seed of the first case (default 500)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--faithful", action="store_true", help="the papers' settings instead of the bundle's shortcuts")
    p.add_argument(
        "--compare", action="append", default=[], metavar="BUNDLE", help="also run this bundle on every case"
    )
    args = p.parse_args(argv)
    bundles = [args.bundle, *args.compare]
    rows: dict[str, list[dict]] = {b: [] for b in bundles}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.cases):
            for b in bundles:
                cmd = [
                    sys.executable,
                    "-c",
                    CHILD,
                    str(args.seed + i),
                    tmp,
                    b,
                    args.device,
                    "1" if args.faithful else "0",
                ]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    print(r.stderr, file=sys.stderr)
                    return r.returncode
                row = json.loads(r.stdout.strip().splitlines()[-1])
                row["bundle"] = b or "(embedded)"
                rows[b].append(row)
                print(json.dumps(row), flush=True)
    means = {}
    for b, rs in rows.items():
        walls = [r["wall_s"] for r in rs]
        means[b] = sum(walls) / len(walls)
        print(
            f"{b or '(embedded)'}: {len(rs)} case(s) of {rs[0]['size']}: wall {means[b]:.1f} s/case "
            f"(max {max(walls):.1f}), CPU {sum(r['cpu_s'] for r in rs) / len(rs):.1f} s/case, "
            f"peak RSS {max(r['peak_rss_GB'] for r in rs):.2f} GB, device {rs[0]['device']}"
        )
    if len(bundles) > 1:
        ratios = ", ".join(f"{b}: {means[b] / means[bundles[0]]:.2f}" for b in bundles[1:])
        print(f"wall time relative to {bundles[0] or '(embedded)'}: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
