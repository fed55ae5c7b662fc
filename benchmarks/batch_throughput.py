#!/usr/bin/env python
"""Throughput of ``anomaly-diffusion batch`` against a loop of ``anomaly-diffusion detect`` calls on
the same phantom cases (issue 18): cases per hour of each and their ratio.

A loop of ``detect`` pays, per case, the Python + torch (+ timm) import and the bundle's read and
sha256 check; ``batch`` pays them once per process. Both run the same commands a user would, as
child processes, on the same cases with the same options, and the script checks that both wrote
byte-identical segmentations and heatmaps.

  python benchmarks/batch_throughput.py                         # 6 cases, embedded bundle, CPU
  python benchmarks/batch_throughput.py --cases 6 --slices 25:35 --out runs/batch_throughput
  python benchmarks/batch_throughput.py --bundle my.zip --device cuda --slices ""

Prints one JSON object (also written to OUT/throughput.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "AnomalyDiffusionLib.cli", "--progress", "none", *args]


def timed(cmd: list[str]) -> float:
    """Wall seconds of one child process (which must succeed)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=6, help="phantom cases (default 6)")
    p.add_argument("--spacing", type=float, default=3.0, help="phantom voxel size in mm (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first phantom (default 0)")
    p.add_argument("--slices", default="25:35", help="detect --slices for every case ('' for all; default 25:35)")
    p.add_argument("--bundle", default=None, help="bundle (default: the embedded one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/batch_throughput", help="work folder (default runs/batch_throughput)")
    p.add_argument("--batch-first", action="store_true", help="run the batch before the loop (order effects)")
    args = p.parse_args()

    out = Path(args.out)
    data = out / "cases"
    if not data.is_dir():
        r = subprocess.run(
            cli("phantom", "--out", str(data), "--cases", str(args.cases), "--seed", str(args.seed),
                "--spacing", str(args.spacing), "--lesions", "1"),
            capture_output=True, text=True,
        )  # fmt: skip
        if r.returncode != 0:
            sys.exit(r.stderr)
    cases = sorted(d.name for d in data.iterdir() if d.is_dir())
    common = ["--device", args.device, "--format", "nii.gz"]
    if args.slices:
        common += ["--slices", args.slices]
    if args.bundle:
        common += ["--bundle", args.bundle]

    loop_out, batch_out = out / "loop", out / "batch"

    def loop() -> float:
        total = 0.0
        for c in cases:
            flair, t2 = data / c / f"{c}_flair.nii.gz", data / c / f"{c}_t2.nii.gz"
            total += timed(cli("detect", "--flair", str(flair), "--t2", str(t2), "--out", str(loop_out / c), *common))
        return total

    def batch() -> float:
        return timed(cli("batch", "--input", str(data), "--out", str(batch_out), "--force", *common))

    if args.batch_first:
        batch_s = batch()
        loop_s = loop()
    else:
        loop_s = loop()
        batch_s = batch()

    same = all(
        (loop_out / c / name).read_bytes() == (batch_out / c / name).read_bytes()
        for c in cases
        for name in ("segmentation.nii.gz", "heatmap.nii.gz")
    )

    def detect_s(folder: Path) -> float:
        return sum(json.loads((folder / c / "summary.json").read_text())["timings_s"]["total"] for c in cases)

    result = {
        "cases": len(cases),
        "phantom_spacing_mm": args.spacing,
        "slices": args.slices or "all",
        "bundle": json.loads((batch_out / "summary.json").read_text())["bundle"]["name"],
        "device": args.device,
        "loop_of_detect_s": round(loop_s, 1),
        "batch_s": round(batch_s, 1),
        "loop_cases_per_hour": round(3600 * len(cases) / loop_s, 1),
        "batch_cases_per_hour": round(3600 * len(cases) / batch_s, 1),
        "ratio_batch_over_loop": round(loop_s / batch_s, 3),
        "order": "batch, loop" if args.batch_first else "loop, batch",
        # time inside detect (summary timings) and the rest: interpreter, imports, bundle, writing
        "loop_detect_s": round(detect_s(loop_out), 1),
        "batch_detect_s": round(detect_s(batch_out), 1),
        "loop_outside_detect_s_per_case": round((loop_s - detect_s(loop_out)) / len(cases), 1),
        "batch_outside_detect_s_per_case": round((batch_s - detect_s(batch_out)) / len(cases), 1),
        "outputs_identical": same,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
