"""What the Slicer module decides, tested without Slicer: command line, progress stream, process
tree cancellation, output → node plan, table columns, the slice to jump to, the child process's
Windows and encoding options, the device probe, the requirement check of Slicer 5.10 and the
bundle's calibrated settings with their overrides."""

from __future__ import annotations

import json
import os
import sys
import time
import types
import zipfile
from pathlib import Path

import pytest
from conftest import make_tiny_bundle

from AnomalyDiffusionLib.phantom import PhantomOptions, make_subject, write_case
from AnomalyDiffusionLib.slicer_bridge import (
    SEGMENT_TERMINOLOGY,
    DetectProcess,
    DetectRequest,
    ProgressState,
    bundle_settings,
    changed_settings,
    detect_command,
    device_label,
    device_probe_command,
    jump_target,
    missing_requirements,
    output_plan,
    parse_info_output,
    parse_progress_line,
    plot_series,
    popen_options,
    read_manifest,
    read_table,
    status_after,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def case_and_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge")
    ph = make_subject(21, PhantomOptions(spacing=3.0, n_lesions=1, modalities=("flair", "t2")))
    return write_case(ph, root, "c"), make_tiny_bundle(root / "tiny")


def test_command_line_is_exact():
    req = DetectRequest(
        inputs={"flair": "/d/f.nrrd", "t2": "/d/t2.nrrd", "t1": ""},
        out_dir="/tmp/o",
        device="cpu",
        methods=("fpdm",),
        w=2.0,
        early_stop=False,
        stride=10,
        dode_scales=(128, 192),
    )
    # detect options follow in the schema's order (options.DetectOptions), defaults left out
    assert detect_command(req, python="/slicer/bin/PythonSlicer") == [
        "/slicer/bin/PythonSlicer", "-m", "AnomalyDiffusionLib.cli", "--progress", "jsonl", "detect",
        "--flair", "/d/f.nrrd", "--t2", "/d/t2.nrrd", "--out", "/tmp/o", "--format", "nrrd",
        "--methods", "fpdm", "--device", "cpu", "--w", "2.0", "--stride", "10", "--no-early-stop",
        "--dode-scales", "128,192",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="T2"):
        detect_command(DetectRequest(inputs={"flair": "f"}, out_dir="o"))
    with pytest.raises(ValueError, match="methods"):
        detect_command(DetectRequest(inputs={"flair": "f", "t2": "t"}, out_dir="o", methods=()))


def test_progress_lines_fold_into_one_monotone_bar():
    st = ProgressState()
    seq = [
        ('{"stage": "reading", "fraction": 1.0, "message": "40 brain slices", "time": 1}', 0.05),
        ('{"stage": "dode", "fraction": 0.5, "message": "slice likelihoods", "time": 2}', 0.175),
        ('{"stage": "fpdm", "fraction": 0.5, "message": "step 300/600", "time": 3}', 0.6),
        ('{"stage": "fpdm", "fraction": 0.25, "message": "step 1/600", "time": 4}', 0.6),  # never backwards
        ('{"stage": "writing", "fraction": 1.0, "message": "done", "time": 5}', 1.0),
    ]
    for line, want in seq:
        parse_progress_line(line, st)
        assert st.fraction == pytest.approx(want)
    assert st.status == "Writing results: done"
    parse_progress_line("anomalous; lesion volume 3.2 mL", st)
    parse_progress_line("{not json", st)
    parse_progress_line("error: FLAIR file not found: 'x'", st)
    assert st.error == "FLAIR file not found: 'x'" and st.log == ["anomalous; lesion volume 3.2 mL", "{not json"]


def test_process_runs_the_exact_command_and_streams_progress(case_and_bundle, tmp_path):
    paths, bundle = case_and_bundle
    req = DetectRequest(inputs={"flair": str(paths["flair"]), "t2": str(paths["t2"])}, out_dir=str(tmp_path / "o"),
                        bundle=str(bundle), device="cpu")  # fmt: skip
    proc = DetectProcess(detect_command(req))
    seen = []
    state = proc.wait(progress=lambda f, s: seen.append((f, s)), timeout_s=300)
    assert proc.succeeded, proc.error_message()
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    # every stage line is parsed, whatever the polling caught between reads
    assert state.stages == ["reading", "dode", "fpdm", "writing"]
    assert any("outputs in" in line for line in state.log)
    plan = output_plan(tmp_path / "o", "FLAIR", keep_labelmap=True)
    kinds = [p.kind for p in plan]
    assert kinds == ["summary", "segmentation", "labelmap", "heatmap", "table", "overview"]
    assert all(p.path.is_file() for p in plan)
    assert plan[1].path.suffix == ".nrrd" and plan[1].node_name == "FLAIR anomalies"
    cols, values, types = read_table(tmp_path / "o" / "slices.csv")
    assert types["slice"] == "int" and types["dode_score"] == "double" and types["fpdm_ran"] == "bool"
    assert all(values["fpdm_ran"]) and len(values["slice"]) == len(set(values["slice"]))
    assert [s[0] for s in plot_series(cols)] == ["dode_score", "lesion_area_mm2"]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    target = jump_target(summary)
    assert target is not None and target[2] == pytest.approx(summary["most_anomalous_slice"]["superior_mm"])
    assert summary["verdict"].split()[0].capitalize() in status_after(summary)


def test_process_failure_reports_the_cli_message(case_and_bundle, tmp_path):
    paths, _ = case_and_bundle
    req = DetectRequest(inputs={"flair": str(tmp_path / "missing.nrrd"), "t2": str(paths["t2"])},
                        out_dir=str(tmp_path / "o"))  # fmt: skip
    proc = DetectProcess(detect_command(req))
    proc.wait(timeout_s=120)
    assert not proc.succeeded and proc.returncode == 2
    assert proc.error_message() == f"FLAIR file not found: '{tmp_path / 'missing.nrrd'}'"
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_cancel_ends_the_whole_process_tree(tmp_path):
    """The CLI's own children (e.g. data loaders) must die with it: a parent that spawns a sleeping
    child and reports its pid; after cancel neither process exists."""
    script = (
        "import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print('child', c.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = DetectProcess([sys.executable, "-c", script])
    child = None
    t0 = time.monotonic()
    while child is None and time.monotonic() - t0 < 30:
        st = proc.poll()
        child = next((int(x.split()[1]) for x in st.log if x.startswith("child")), None)
        time.sleep(0.05)
    assert child is not None
    proc.cancel(grace_s=2.0)
    assert proc.done and proc.cancelled and not proc.succeeded and proc.error_message() == "cancelled"
    for pid in (proc.pid, child):
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            # a killed child of a dead parent is reaped by init; give it a moment
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        else:
            pytest.fail(f"process {pid} survived cancel")


def test_cancelled_detect_leaves_no_output(case_and_bundle, tmp_path):
    paths, bundle = case_and_bundle
    out = tmp_path / "o"
    req = DetectRequest(inputs={"flair": str(paths["flair"]), "t2": str(paths["t2"])}, out_dir=str(out),
                        bundle=str(bundle), device="cpu")  # fmt: skip
    proc = DetectProcess(detect_command(req))
    t0 = time.monotonic()
    while proc.poll().stage is None and time.monotonic() - t0 < 120:  # running: the CLI reported a stage
        time.sleep(0.05)
    proc.cancel()
    # the CLI turns SIGTERM into a cancellation: its partial folder and the output folder it created
    # are removed before it exits
    assert proc.returncode == 2 and not out.exists()


def test_terminology_entry_matches_the_shipped_context():
    """The 7-part entry (context~category~type~modifier~region context~region~modifier, codes as
    scheme^value^meaning) names a category and type that exist in the module's .term.json, and the
    segment colour is that type's recommended colour."""
    from pathlib import Path

    from AnomalyDiffusionLib.slicer_bridge import SEGMENT_COLOR

    term = json.loads(
        (
            Path(__file__).resolve().parents[1] / "AnomalyDiffusion" / "Resources" / "AnomalyDiffusion.term.json"
        ).read_text()
    )
    parts = SEGMENT_TERMINOLOGY.split("~")
    assert len(parts) == 7 and parts[0] == term["SegmentationCategoryTypeContextName"]
    cat = next(
        c for c in term["SegmentationCodes"]["Category"] if parts[1] == f"SCT^{c['CodeValue']}^{c['CodeMeaning']}"
    )
    typ = next(t for t in cat["Type"] if parts[2] == f"SCT^{t['CodeValue']}^{t['CodeMeaning']}")
    assert [round(255 * v) for v in SEGMENT_COLOR] == typ["recommendedDisplayRGBValue"]


# ------------------------------------------------------------------------- child process options
def test_windows_child_has_no_console_window_and_writes_utf8():
    class STARTUPINFO:
        def __init__(self):
            self.dwFlags, self.wShowWindow = 0, 1

    sp = types.SimpleNamespace(
        CREATE_NEW_PROCESS_GROUP=0x200, CREATE_NO_WINDOW=0x08000000, STARTF_USESHOWWINDOW=1, STARTUPINFO=STARTUPINFO
    )
    kwargs, env = popen_options({"PATH": "C:\\x"}, os_name="nt", sp=sp)
    assert kwargs["creationflags"] == 0x200 | 0x08000000 and "start_new_session" not in kwargs
    info = kwargs["startupinfo"]
    assert info.dwFlags & 1 and info.wShowWindow == 0  # SW_HIDE, as slicer.util.launchConsoleProcess
    assert env["PYTHONIOENCODING"] == "utf-8" and env["PYTHONUTF8"] == "1" and env["PATH"] == "C:\\x"
    kwargs, env = popen_options({}, os_name="posix")
    assert kwargs == {"start_new_session": True} and env["PYTHONIOENCODING"] == "utf-8"


def test_child_output_is_read_as_utf8(tmp_path):
    script = "import sys; print('Läsion µ ✓'); sys.exit(3)"
    p = DetectProcess([sys.executable, "-c", script], env={**os.environ, "PYTHONIOENCODING": "ascii"})
    p.wait(timeout_s=30)
    assert p.state.log == ["Läsion µ ✓"] and p.returncode == 3  # forced back to UTF-8
    assert "Läsion µ ✓" in p.output_text()


# ------------------------------------------------------------------------------- device probe
def test_device_probe_asks_the_cli_for_json():
    p = DetectProcess(device_probe_command(sys.executable), cwd=str(ROOT))
    p.wait(timeout_s=300)
    info = parse_info_output(p.state.log)
    assert p.succeeded and info is not None, p.output_text()
    assert {"torch", "cuda_available", "mps_available", "device"} <= set(info)
    assert device_label(info).startswith("GPU: " if info["cuda_available"] else ("Apple GPU", "CPU only"))


def test_device_label_names_cuda_mps_cpu_and_a_missing_torch():
    assert device_label({"torch": "2", "cuda_available": True, "device": "H200"}) == "GPU: H200"
    assert device_label({"torch": "2", "cuda_available": False, "mps_available": True}).startswith("Apple GPU (MPS)")
    assert device_label({"torch": "2", "cuda_available": False, "mps_available": False}).startswith("CPU only")
    assert device_label(None, "ModuleNotFoundError: No module named 'torch'").startswith("PyTorch not installed")
    assert device_label(None, "ModuleNotFoundError: No module named 'timm'").startswith("Python packages not")
    assert device_label(None, "Segmentation fault").startswith("Device unknown")
    assert parse_info_output(["warning: x", '{"torch": "2.4", "cuda_available": false}', ""])["torch"] == "2.4"
    assert parse_info_output(["{not json", '{"stage": "x"}']) is None


# ----------------------------------------------------------------------------- requirements
def test_missing_requirements_checks_names_and_versions():
    installed = {"timm": "1.0.9", "scipy": "1.10.0", "safetensors": "0.4.5", "torch": "2.1"}
    lines = ["# comment", "", "timm>=1.0,<2", "scipy>=1.11,<2", "safetensors>=0.4,<1  # weights",
             "nilearn==0.14.1", "torch>=2.4", "scikit_image>=0.22"]  # fmt: skip
    got = missing_requirements(lines, skip=["torch", "scikit-image"], version_of=installed.get)
    assert got == ["scipy>=1.11,<2", "nilearn==0.14.1"]


def test_missing_requirements_of_this_environment_are_none():
    """The shipped requirements.txt is satisfied by the test environment (importlib.metadata)."""
    lines = (ROOT / "AnomalyDiffusion" / "Resources" / "requirements.txt").read_text().splitlines()
    assert missing_requirements(lines) == []
    assert missing_requirements(["surely-not-installed-package-xyz>=1"]) == ["surely-not-installed-package-xyz>=1"]


# ------------------------------------------------------------------------- bundle settings
def test_bundle_settings_from_folder_and_zip(tmp_path):
    manifest = {"fpdm": {"settings": {"w": 2.0, "stride": 30, "early_stop": False}, "calibration": {"w": 5.0}},
                "dode": {"decision_threshold": 7.5}}  # fmt: skip
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    zipped = tmp_path / "b.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("b/manifest.json", json.dumps(manifest))
    for path in (folder, zipped):
        assert bundle_settings(read_manifest(path)) == {"w": 5.0, "early_stop": False, "stride": 30,
                                                        "dode_threshold": 7.5}  # fmt: skip
    assert bundle_settings({"dode": {"decision_threshold": None}}) == {}


def test_changed_settings_keep_only_what_differs():
    shown = {"w": 5.0, "early_stop": False, "stride": 30, "dode_threshold": 7.320472816393783}
    same = {"w": 5.0, "early_stop": False, "stride": 30, "dode_threshold": 7.32}  # as a 3-decimal spin box reads
    assert changed_settings(shown, same) == {}
    assert changed_settings(shown, dict(same, dode_threshold=7.321)) == {"dode_threshold": 7.321}
    assert changed_settings(dict(shown, w=4.567), dict(same, w=4.57)) == {}
    assert changed_settings(shown, dict(same, early_stop=True, stride=10)) == {"early_stop": True, "stride": 10}
    assert changed_settings({}, {"w": 3.0, "stride": None}) == {"w": 3.0}


def test_status_line_lists_warnings():
    text = status_after({"verdict": "normal", "warnings": ["stride 10 differs from the calibrated 30", "w"]})
    assert text == "Normal; warning: stride 10 differs from the calibrated 30; w"
    assert "warning" not in status_after({"verdict": "normal", "warnings": []})
