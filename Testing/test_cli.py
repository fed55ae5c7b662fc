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


def run(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("anomaly-diffusion")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "AnomalyDiffusionLib.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_demo_runs_and_matches_its_ground_truth(tmp_path):
    r = run("--progress", "jsonl", "demo", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith('{"stage"')]
    assert {rec["stage"] for rec in lines} >= {"phantom", "pipeline"} and lines[-1]["fraction"] == 1.0
    out = tmp_path / "demo"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["output_geometry_equals_input"] is True
    assert summary["dice_roundtrip_vs_truth"] > 0.85
    ref = sitk.ReadImage(str(out / "inputs" / "inputs_flair.nii.gz"))
    # every axial slice whose lesion covers ≥ 30 mm² (≥ 5 model pixels at 2.4 mm) is recovered;
    # only fragments smaller than the model's pixels may vanish at the lesion's ends
    reo = Reorientation.from_direction(np.asarray(ref.GetDirection()).reshape(3, 3))
    truth = reo.to_canonical(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "inputs" / "inputs_seg.nii.gz")))) > 0
    back = reo.to_canonical(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "lesion_roundtrip.nii.gz")))) > 0
    big = truth.sum((1, 2)) >= 30
    assert big.sum() > 10 and back.any((1, 2))[big].all()
    t = np.flatnonzero(truth.any((1, 2)))
    assert summary["lesion_slices_truth"] == [int(t.min()), int(t.max())]
    for name in ("model_space_flair.nii.gz", "lesion_roundtrip.nii.gz"):
        img = sitk.ReadImage(str(out / name))
        assert img.GetSize() == ref.GetSize() and img.GetSpacing() == ref.GetSpacing()
        assert img.GetOrigin() == ref.GetOrigin()
        # NIfTI stores the direction as a float32 quaternion: a copied direction re-reads to ~1e-9
        assert img.GetDirection() == pytest.approx(ref.GetDirection(), abs=1e-7)
    assert (out / "overview.png").stat().st_size > 10_000
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
    assert list((tmp_path / "o").iterdir()) == []


def test_phantom_and_info_commands(tmp_path):
    assert (
        cli.main(["--progress", "none", "phantom", "--out", str(tmp_path / "p"), "--cases", "1", "--spacing", "3"]) == 0
    )
    assert (tmp_path / "p" / "Case_0" / "Case_0_seg.nii.gz").is_file()
    assert cli.main(["--progress", "none", "info"]) == 0


def test_help_and_version():
    r = run("--help")
    assert r.returncode == 0 and "demo" in r.stdout
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
