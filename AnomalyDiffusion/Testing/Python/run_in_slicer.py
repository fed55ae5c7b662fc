"""End-to-end check of the AnomalyDiffusion module inside a real Slicer (5.10 or 5.12).

Run by a maintainer (CI has no Slicer):

    Slicer --no-main-window --python-script AnomalyDiffusion/Testing/Python/run_in_slicer.py [--device cpu]
        [--install] [--keep]

It gets the logic the documented way (``slicer.util.getModuleLogic("AnomalyDiffusion")``), makes the
phantom sample case, runs *Detect anomalies* through the logic with the embedded bundle, saves the
scene to a temporary folder, clears the scene, loads the saved scene back and checks that every
output node (segmentation, heatmap, score table, plot chart and its series) came back with its
content. It prints one line per check and exits non-zero on any failure (2: the Python dependencies
are missing and ``--install`` was not given).

``--install`` installs missing Python packages first (without asking); ``--keep`` keeps the saved
scene folder and prints its path.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import slicer

FAILURES: list[str] = []


def check(condition: bool, what: str) -> bool:
    print(("ok:   " if condition else "FAIL: ") + what, flush=True)
    if not condition:
        FAILURES.append(what)
    return condition


def describe(node) -> dict:
    """What must survive saving and loading, per node."""
    import numpy as np

    out = {"class": node.GetClassName(), "name": node.GetName()}
    if node.IsA("vtkMRMLScalarVolumeNode"):
        a = slicer.util.arrayFromVolume(node)
        out.update(shape=a.shape, sum=float(np.nansum(a)))
    elif node.IsA("vtkMRMLSegmentationNode"):
        seg = node.GetSegmentation()
        out["segments"] = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
        out["terminology"] = [seg.GetNthSegment(i).GetTerminology() for i in range(seg.GetNumberOfSegments())]
    elif node.IsA("vtkMRMLTableNode"):
        out.update(rows=node.GetNumberOfRows(), columns=node.GetNumberOfColumns())
    elif node.IsA("vtkMRMLPlotChartNode"):
        series = [node.GetNthPlotSeriesNode(i) for i in range(node.GetNumberOfPlotSeriesNodes())]
        out["series"] = sorted((s.GetXColumnName(), s.GetYColumnName(), s.GetPlotType()) for s in series)
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="AnomalyDiffusion end-to-end check in Slicer")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    ap.add_argument("--install", action="store_true", help="install missing Python packages first")
    ap.add_argument("--keep", action="store_true", help="keep the saved scene folder")
    args = ap.parse_args(argv)
    print(f"Slicer {slicer.app.applicationVersion}", flush=True)

    # 1. the console API
    try:
        logic = slicer.util.getModuleLogic("AnomalyDiffusion")
    except Exception as exc:
        check(False, f'slicer.util.getModuleLogic("AnomalyDiffusion") works ({exc})')
        return 1
    check(logic is not None, 'slicer.util.getModuleLogic("AnomalyDiffusion") returns the logic')
    import AnomalyDiffusion

    missing = AnomalyDiffusion.missingDependencies()
    if missing:
        if not args.install:
            print("SKIP: missing Python packages (run with --install): " + ", ".join(missing), flush=True)
            return 2
        logic.ensureDependencies(askConfirmation=False)
        missing = AnomalyDiffusion.missingDependencies()
        if not check(not missing, f"dependencies installed ({', '.join(missing) or 'all present'})"):
            return 1

    # 2. the phantom sample and a detection
    slicer.mrmlScene.Clear(0)
    t0 = time.monotonic()
    flair, t2, truth = logic.loadPhantomCase()
    check(flair is not None and t2 is not None and truth is not None, "phantom sample loaded (FLAIR, T2, truth)")
    summary = logic.process(flair, t2, device=args.device, ensureDependencies=False)
    print(f"detect: {summary.get('verdict')} in {time.monotonic() - t0:.0f} s on {summary.get('device')}", flush=True)
    nodes = {kind: slicer.mrmlScene.GetNodeByID(node_id) for kind, node_id in summary["nodes"].items()}
    check(set(nodes) == {"segmentation", "heatmap", "table", "chart"}, f"every output made ({sorted(nodes)})")
    before = {kind: describe(node) for kind, node in nodes.items() if node is not None}
    for kind, d in before.items():
        print(f"      {kind}: {d}", flush=True)
    if "chart" in before:
        check(all(s[0] == "slice" for s in before["chart"]["series"]), "the plot's X column is the slice number")

    # 3. save, clear, reload
    folder = Path(tempfile.mkdtemp(prefix="AnomalyDiffusionScene_"))
    try:
        check(bool(slicer.util.saveScene(str(folder))), f"scene saved to {folder}")
        mrml = sorted(folder.glob("*.mrml"))
        if not check(len(mrml) == 1, "one .mrml file written"):
            return 1
        slicer.mrmlScene.Clear(0)
        slicer.util.loadScene(str(mrml[0]))
        for kind, want in before.items():
            found = [
                n for n in slicer.util.getNodesByClass(want["class"]) if n.GetName() == want["name"]
            ]  # same class and name
            if not check(len(found) == 1, f"{kind} '{want['name']}' came back"):
                continue
            got = describe(found[0])
            check(got == want, f"{kind} content unchanged" + ("" if got == want else f": {got} != {want}"))
    finally:
        if args.keep:
            print(f"scene kept in {folder}", flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    try:
        status = main(sys.argv[1:])
    except Exception:
        traceback.print_exc()
        status = 1
    print("PASSED" if status == 0 else f"FAILED ({len(FAILURES)} check(s))" if status == 1 else "SKIPPED", flush=True)
    slicer.util.exit(status)
