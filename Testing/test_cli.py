"""The anomaly-diffusion command line, run as a user would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from AnomalyDiffusionLib import cli
from AnomalyDiffusionLib.errors import Cancelled
from AnomalyDiffusionLib.progress import CancelToken, tracked
from AnomalyDiffusionLib.volumes import Reorientation

DEMO_MIN_DICE = 0.5


def run(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("anomaly-diffusion")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "AnomalyDiffusionLib.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # the whole demo: about 4 minutes on one thread
def test_demo_runs_detect_and_matches_its_ground_truth(tmp_path):
    """The README's main job: detect with the embedded bundle on a phantom case, scored against the
    phantom's own lesion mask (acceptance of issue #5: lesion slices found, DICE ≥ 0.5, exact geometry)."""
    r = run("--progress", "jsonl", "demo", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"stage"')]
    assert {rec["stage"] for rec in lines} >= {"phantom", "reading", "fpdm", "writing"}
    assert lines[-1]["fraction"] == 1.0
    out = tmp_path / "demo"
    summary = json.loads((out / "summary.json").read_text())
    demo = summary["demo"]
    assert demo["output_geometry_equals_input"] is True
    truth_range, found = demo["lesion_slices_truth"], demo["lesion_slices_found"]
    assert found is not None and found[0] <= truth_range[1] and found[1] >= truth_range[0]
    assert demo["dice_vs_truth"] >= DEMO_MIN_DICE
    assert summary["bundle"]["name"] == "phantom-small" and "NOT FOR CLINICAL USE" in summary["bundle"]["intended_use"]
    ref = sitk.ReadImage(str(out / "inputs" / "inputs_flair.nii.gz"))
    reo = Reorientation.from_direction(np.asarray(ref.GetDirection()).reshape(3, 3))
    truth = reo.to_canonical(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "inputs" / "inputs_seg.nii.gz")))) > 0
    t = np.flatnonzero(truth.any((1, 2)))
    assert truth_range == [int(t.min()), int(t.max())]
    for name in ("segmentation.nii.gz", "heatmap.nii.gz"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == ref.GetSize() and img.GetSpacing() == ref.GetSpacing()
        assert img.GetOrigin() == ref.GetOrigin()
        # NIfTI stores the direction as a float32 quaternion: a copied direction re-reads to ~1e-9
        assert img.GetDirection() == pytest.approx(ref.GetDirection(), abs=1e-7)
    assert (out / "overview.png").stat().st_size > 10_000
    rows = (out / "slices.csv").read_text().splitlines()
    assert len(rows) == summary["slices_analysed"] + 1
    assert not list(out.glob(".partial-*"))


def test_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys):
    def fail(tmp, **kwargs):
        (tmp / "half-written.nii.gz").write_bytes(b"x")
        from AnomalyDiffusionLib.errors import InputError

        raise InputError("FLAIR file 'x' is constant")

    monkeypatch.setattr(cli, "run_demo", fail)
    code = cli.main(["--progress", "none", "demo", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: FLAIR file 'x' is constant"]
    assert not (tmp_path / "o").exists()  # the folder it created is gone again


def test_phantom_and_info_commands(tmp_path):
    assert (
        cli.main(["--progress", "none", "phantom", "--out", str(tmp_path / "p"), "--cases", "1", "--spacing", "3"]) == 0
    )
    assert (tmp_path / "p" / "Case_0" / "Case_0_seg.nii.gz").is_file()
    assert cli.main(["--progress", "none", "info"]) == 0


def test_bundle_commands(tmp_path, capsys):
    from conftest import make_tiny_bundle

    b = make_tiny_bundle(tmp_path / "b")
    assert cli.main(["bundle", "verify", str(b)]) == 0
    assert capsys.readouterr().out.startswith("OK: bundle 'tiny-test'")
    assert cli.main(["bundle", "info", str(b), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["methods"] == ["fpdm", "dode"] and info["dode"]["encoder"]["pretrained"] is False
    (b / "models/dode_score_64.safetensors").write_bytes(b"tampered")
    assert cli.main(["bundle", "verify", str(b)]) == 2
    assert "error: bundle file 'models/dode_score_64.safetensors' has 8 bytes" in capsys.readouterr().err


def test_help_and_version():
    r = run("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("demo", "detect", "bundle"))
    r = run("detect", "--help")
    assert r.returncode == 0 and "--faithful" in r.stdout and "--flair" in r.stdout
    with pytest.raises(SystemExit):
        cli.main(["--version"])


def test_tracked_reports_progress_and_cancels():
    seen = []
    items = list(tracked(range(4), 4, "s", lambda s, f, m: seen.append(f)))
    assert items == [0, 1, 2, 3] and seen == [0.0, 0.25, 0.5, 0.75, 1.0]
    token = CancelToken()
    got = []
    with pytest.raises(Cancelled):
        for i in tracked(range(10), 10, "s", cancel=token):
            got.append(i)
            if i == 2:
                token.cancel()
    assert got == [0, 1, 2]
