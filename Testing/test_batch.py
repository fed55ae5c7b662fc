"""``anomaly-diffusion batch`` (issue 18): BraTS folders and CSVs, per-case failures, resume after
SIGTERM with byte-identical outputs, shards and torchrun ranks that add up to the unsharded run, and
volume-level metrics against truth masks computed by hand.

The runs use an untrained tiny bundle whose AnoFPDM calibration is opened up (every slice called
unhealthy, no median filter) so that it segments something, on 3 mm phantoms, AnoFPDM only, on 12
axial slices: the figures are meaningless, the plumbing and the arithmetic are not.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_tiny_bundle

from AnomalyDiffusionLib import cli
from AnomalyDiffusionLib.batch import (
    BatchCase,
    find_cases,
    fingerprint,
    parse_shard,
    select_shard,
    up_to_date,
)
from AnomalyDiffusionLib.bundle import open_bundle
from AnomalyDiffusionLib.errors import InputError
from AnomalyDiffusionLib.metrics import false_positive_volume, lesion_slice_sensitivity, volume_level
from AnomalyDiffusionLib.options import DetectOptions
from AnomalyDiffusionLib.phantom import PhantomOptions, write_brats_folder

CASES = ["Case_0", "Case_1", "Case_2", "Case_3"]
OK = ["Case_0", "Case_2", "Case_3"]
OPTIONS = ["--device", "cpu", "--methods", "fpdm", "--slices", "25:37"]
VOLUMES = ("segmentation.nii.gz", "heatmap.nii.gz", "slices.csv", "overview.png")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 phantom cases in BraTS 2021 layout, Case_1's FLAIR corrupted, and the opened-up tiny bundle."""
    root = tmp_path_factory.mktemp("batch")
    phantom = PhantomOptions(spacing=3.0, n_lesions=1, modalities=("flair", "t2"))
    write_brats_folder(root / "in", 4, seed=3, options=phantom)
    (root / "in" / "Case_1" / "Case_1_flair.nii.gz").write_bytes(b"not a volume")
    bundle = make_tiny_bundle(root / "tiny")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["fpdm"]["calibration"].update(median_size=1, cos_threshold=1.0)  # weights untouched: still verified
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return root / "in", bundle


def batch_argv(data, out: Path, *extra: str) -> list[str]:
    folder, bundle = data
    return ["--progress", "none", "batch", "--input", str(folder), "--out", str(out), "--bundle", str(bundle),
            *OPTIONS, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """One uninterrupted, unsharded batch of the 4 cases: (output folder, exit status)."""
    out = tmp_path_factory.mktemp("ref") / "out"
    return out, cli.main(batch_argv(data, out))


def table(path: Path, drop: tuple[str, ...] = ("time_s",)) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def assert_same_case_outputs(a: Path, b: Path, cases=OK) -> None:
    """Every output file byte-identical, summary.json equal but for its timings."""
    for c in cases:
        assert sorted(p.name for p in (a / c).iterdir()) == sorted(p.name for p in (b / c).iterdir()), c
        for name in VOLUMES:
            assert (a / c / name).read_bytes() == (b / c / name).read_bytes(), (c, name)
        sa, sb = (json.loads((x / c / "summary.json").read_text()) for x in (a, b))
        sa.pop("timings_s"), sb.pop("timings_s")
        assert sa == sb, c


# ------------------------------------------------------------------------------------- cases
def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_cases_from_brats_2021_and_2023_folders_and_a_csv(tmp_path):
    root = tmp_path / "brats"
    for m in ("t2f", "t2w", "t1n", "t1c", "seg"):
        _touch(root / "BraTS-GLI-00001-000" / f"BraTS-GLI-00001-000-{m}.nii.gz")
    for m in ("flair", "t2", "t1", "t1ce", "seg"):
        _touch(root / "BraTS2021_00000" / f"BraTS2021_00000_{m}.nii.gz")
    _touch(root / "BraTS2021_00002" / "BraTS2021_00002_flair.nrrd")  # no T2: a failed case, not a crash
    _touch(root / "notes" / "readme.txt")  # not a case folder
    _touch(root / ".cache" / "x_flair.nii.gz")  # hidden
    cases = find_cases(root)
    assert [c.id for c in cases] == ["BraTS-GLI-00001-000", "BraTS2021_00000", "BraTS2021_00002"]
    c23, c21, bad = cases
    assert {k: Path(v).name for k, v in c23.inputs.items()} == {
        "flair": "BraTS-GLI-00001-000-t2f.nii.gz", "t2": "BraTS-GLI-00001-000-t2w.nii.gz",
        "t1": "BraTS-GLI-00001-000-t1n.nii.gz", "t1ce": "BraTS-GLI-00001-000-t1c.nii.gz",
    }  # fmt: skip
    assert Path(c23.truth).name == "BraTS-GLI-00001-000-seg.nii.gz" and c23.problem is None
    assert Path(c21.inputs["t1ce"]).name == "BraTS2021_00000_t1ce.nii.gz" and Path(c21.inputs["t1"]).name.endswith(
        "_t1.nii.gz"
    )
    assert bad.problem == f"no T2 file in '{root / 'BraTS2021_00002'}'"

    sheet = tmp_path / "list" / "cases.csv"
    sheet.parent.mkdir()
    sheet.write_text("id,flair,t2,truth\na,img/a_f.nii.gz,/abs/a_t2.nii.gz,\nb,img/b_f.nii.gz,,img/b_seg.nii.gz\n")
    a, b = find_cases(sheet)
    assert a.inputs == {"flair": str(sheet.parent / "img" / "a_f.nii.gz"), "t2": "/abs/a_t2.nii.gz"}
    assert a.truth is None and a.problem is None
    assert b.truth == str(sheet.parent / "img" / "b_seg.nii.gz") and b.problem.startswith("no T2 file given")
    for text, needle in (
        ("id,flair\na,f\n", "expected id,flair,t2"),
        ("id,flair,t2,t3\na,f,t,x\n", "expected id,flair,t2"),
        ("id,flair,t2\na,f,t\na,f,t\n", "appears twice"),
        ("id,flair,t2\n../up,f,t\n", "cannot be a folder name"),
        ("id,flair,t2\ncases.csv,f,t\n", "cannot be a folder name"),
    ):
        sheet.write_text(text)
        with pytest.raises(InputError, match=needle):
            find_cases(sheet)
    with pytest.raises(InputError, match="not found"):
        find_cases(tmp_path / "nowhere")


def test_shards_partition_the_cases():
    cases = [BatchCase(str(i)) for i in range(7)]
    for n in (1, 2, 3, 7, 9):
        parts = [select_shard(cases, i, n) for i in range(n)]
        assert sorted(c.id for p in parts for c in p) == sorted(c.id for c in cases)
    assert [c.id for c in select_shard(cases, 1, 3)] == ["1", "4"]
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(bad)


def test_volume_metrics_by_hand():
    truth = np.zeros((4, 3, 3), bool)
    truth[1, :2, :2] = True  # 4 voxels on slice 1
    truth[2, 0, 0] = True  # 1 voxel on slice 2
    pred = np.zeros_like(truth)
    pred[1, 0, :] = True  # 3 voxels, 2 inside
    pred[3, 2, 2] = True  # 1 voxel on a slice without lesion
    # DICE = 2·2 / (4 + 5); slices with lesion: 1 and 2, marked: 1; outside the truth: 2 voxels of 0.5 mL
    assert volume_level(pred, truth, 0.5) == {
        "dice": pytest.approx(4 / 9),
        "lesion_slice_sensitivity": 0.5,
        "false_positive_ml": 1.0,
        "truth_volume_ml": 2.5,
    }
    assert np.isnan(lesion_slice_sensitivity(pred, np.zeros_like(truth)))
    assert false_positive_volume(truth, truth, 1.0) == 0.0


# ------------------------------------------------------------------------------------ running
def test_a_failed_case_is_recorded_and_the_batch_goes_on(reference):
    out, code = reference
    assert code == 1  # the number of failed cases
    rows = table(out / "cases.csv", drop=())
    assert [r["id"] for r in rows] == CASES
    assert [r["status"] for r in rows] == ["ok", "failed", "ok", "ok"]
    failed = rows[1]
    assert failed["error"].startswith("cannot read FLAIR file") and "Case_1_flair.nii.gz" in failed["error"]
    assert failed["verdict"] == "" and not (out / "Case_1").exists()
    for r in (rows[0], rows[2], rows[3]):
        assert r["error"] == "" and r["verdict"] in ("anomalous", "no anomaly found") and float(r["time_s"]) > 0
        s = json.loads((out / r["id"] / "summary.json").read_text())
        assert float(r["lesion_volume_ml"]) == s["lesion_volume_ml"]
        assert int(r["most_anomalous_slice"]) == s["most_anomalous_slice"]["slice"]
        assert [int(r["lesion_slice_first"]), int(r["lesion_slice_last"])] == s["lesion_slices"]
        assert s["options"]["methods"] == ["fpdm"] and s["options"]["slice_range"] == [25, 37]
    agg = json.loads((out / "summary.json").read_text())
    assert (agg["cases"], agg["ok"], agg["failed"], agg["skipped"]) == (4, 3, 1, 0)
    assert list(agg["failed_cases"]) == ["Case_1"]
    vols = [float(r["lesion_volume_ml"]) for r in rows if r["status"] == "ok"]
    stats = agg["statistics"]["lesion_volume_ml"]
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(np.mean(vols), abs=1e-6)
    assert stats["sd"] == pytest.approx(np.std(vols, ddof=1), abs=1e-6)
    assert stats["median"] == pytest.approx(np.median(vols), abs=1e-6)
    assert agg["settings"]["methods"] == ["fpdm"] and agg["bundle"]["name"] == "tiny-test"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no partial folder or temporary file


def test_a_case_folder_holds_exactly_what_detect_writes(data, reference, tmp_path):
    out, _ = reference
    folder, bundle = data
    c = "Case_2"
    argv = ["--progress", "none", "detect", "--flair", str(folder / c / f"{c}_flair.nii.gz"),
            "--t2", str(folder / c / f"{c}_t2.nii.gz"), "--out", str(tmp_path / c), "--bundle", str(bundle),
            *OPTIONS]  # fmt: skip
    assert cli.main(argv) == 0
    assert_same_case_outputs(out, tmp_path, cases=[c])


def test_truth_masks_give_the_metrics_computed_by_hand(data, reference):
    out, _ = reference
    folder, _ = data
    rows = {r["id"]: r for r in table(out / "cases.csv")}
    for c in OK:
        seg_img = sitk.ReadImage(str(out / c / "segmentation.nii.gz"))
        truth_img = sitk.ReadImage(str(folder / c / f"{c}_seg.nii.gz"))
        assert seg_img.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)  # array axis 0 is axial
        assert seg_img.GetSize() == truth_img.GetSize()
        p = sitk.GetArrayFromImage(seg_img) > 0
        t = sitk.GetArrayFromImage(truth_img) > 0
        voxel_ml = float(np.prod(seg_img.GetSpacing())) / 1000.0
        dice = 2.0 * np.logical_and(p, t).sum() / (p.sum() + t.sum())
        lesion_z = [k for k in range(t.shape[0]) if t[k].any()]
        sens = sum(p[k].any() for k in lesion_z) / len(lesion_z)
        fp_ml = np.logical_and(p, ~t).sum() * voxel_ml
        r = rows[c]
        assert dice > 0 and 0 < sens < 1  # the test is not trivial
        assert float(r["dice"]) == pytest.approx(dice, abs=1e-6)
        assert float(r["lesion_slice_sensitivity"]) == pytest.approx(sens, abs=1e-6)
        assert float(r["false_positive_ml"]) == pytest.approx(fp_ml, abs=1e-6)
        assert float(r["truth_volume_ml"]) == pytest.approx(t.sum() * voxel_ml, abs=1e-6)


def test_resume_skips_done_cases_force_and_new_settings_redo_them(data, reference, tmp_path, capsys):
    """A CSV naming one of the reference's cases, run into a copy of its folder: up to date (not run);
    ``--force`` runs it again (same bytes); another seed and stride are other settings (runs it, and
    prints the calibration warning of detect once)."""
    ref, _ = reference
    folder, bundle = data
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    sheet = tmp_path / "one.csv"
    sheet.write_text(f"id,flair,t2,truth\nCase_3,{folder}/Case_3/Case_3_flair.nii.gz,"
                     f"{folder}/Case_3/Case_3_t2.nii.gz,{folder}/Case_3/Case_3_seg.nii.gz\n")  # fmt: skip
    argv = ["--progress", "none", "batch", "--input", str(sheet), "--out", str(out), "--bundle", str(bundle), *OPTIONS]
    before = (out / "_batch" / "Case_3.json").read_text()
    for leftover in (".partial-Case_3", ".old-Case_3"):  # what a kill -9 mid-case can leave
        _touch(out / leftover / "heatmap.nii.gz")
    assert cli.main(argv) == 0
    assert "Case_3: up to date" in capsys.readouterr().out
    assert (out / "_batch" / "Case_3.json").read_text() == before
    assert not (out / ".partial-Case_3").exists() and not (out / ".old-Case_3").exists()
    assert cli.main([*argv, "--force"]) == 0
    assert "Case_3: ok" in capsys.readouterr().out
    assert_same_case_outputs(ref, out, cases=["Case_3"])
    assert cli.main([*argv, "--seed", "1", "--stride", "20"]) == 0
    printed = capsys.readouterr()
    assert "Case_3: ok" in printed.out
    warnings = [line for line in printed.err.splitlines() if line.startswith("warning: ")]
    assert len(set(warnings)) == len(warnings)  # each once
    assert sum(w.startswith("warning: AnoFPDM stride 20 differs from the stride 10") for w in warnings) == 1
    assert json.loads((out / "Case_3" / "summary.json").read_text())["options"]["seed"] == 1

    b = open_bundle(bundle)
    case = find_cases(sheet)[0]
    fp = fingerprint(b, DetectOptions(seed=1, stride=20, methods=("fpdm",), slice_range=(25, 37)), None, True)
    assert up_to_date(out, case, fp)
    assert not up_to_date(out, case, fingerprint(b, DetectOptions(methods=("fpdm",), slice_range=(25, 37)), None, True))
    (out / "Case_3" / "heatmap.nii.gz").unlink()
    assert not up_to_date(out, case, fp)  # an output missing: not done


def test_shards_and_merge_only_equal_the_unsharded_run(data, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "out"
    assert cli.main(batch_argv(data, out, "--shard", "0/2")) == 0  # Case_0, Case_2
    assert not (out / "cases.csv").exists()  # shards leave the table to --merge-only
    assert cli.main(batch_argv(data, out, "--shard", "1/2")) == 1  # Case_1 (fails), Case_3
    assert cli.main(batch_argv(data, out, "--merge-only")) == 1
    assert table(out / "cases.csv") == table(ref / "cases.csv")
    assert_same_case_outputs(ref, out)


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigterm_after_the_first_case_then_rerun_gives_identical_outputs(data, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "AnomalyDiffusionLib.cli", *batch_argv(data, out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("[1/4] Case_0: ok"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().splitlines()[-1] == "error: cancelled"
    assert (out / "Case_0" / "summary.json").is_file() and not (out / "Case_3").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no half-written case left
    assert not (out / "cases.csv").exists()

    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "[1/4] Case_0: up to date" in r.stdout
    assert table(out / "cases.csv") == table(ref / "cases.csv")
    assert_same_case_outputs(ref, out)


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes_gives_the_same_table(data, reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "AnomalyDiffusionLib.cli", *batch_argv(data, out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0  # one case failed: rank 1 (Case_1, Case_3) exits 1, rank 0 with the total
    assert "shard 0/2: [1/2] Case_0: ok" in r.stdout and "shard 1/2: [1/2] Case_1: failed" in r.stdout
    assert "4 cases: 3 ok, 1 failed, 0 not run" in r.stdout  # rank 0's aggregate, once
    assert r.stdout.count("4 cases:") == 1
    assert table(out / "cases.csv") == table(ref / "cases.csv")
    assert_same_case_outputs(ref, out)
