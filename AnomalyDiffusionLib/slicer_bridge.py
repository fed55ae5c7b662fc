"""Everything the Slicer module decides, in plain Python (no Slicer, Qt or torch imports).

The module (``AnomalyDiffusion/AnomalyDiffusion.py``) stays thin: it exports the input volumes,
starts :class:`DetectProcess` with the command :func:`detect_command` builds, polls it from a Qt
timer (the GUI never blocks), and turns the result folder into scene nodes following
:func:`output_plan`. Keeping these decisions here lets CI test them without Slicer:

* the CLI command line (with Slicer's own Python, ``PythonSlicer``), its detect options derived from
  the one schema, :class:`~AnomalyDiffusionLib.options.DetectOptions` (checked before the process
  starts), and the ``batch`` command line for many cases from Slicer's Python console;
* parsing the ``--progress jsonl`` stream into one overall progress fraction and a status line;
* cancelling: the CLI runs in its own process group / session, and Cancel ends the whole tree;
* which output file becomes which node, with which name, colour and terminology entry;
* the score table's columns and the plot's series; the slice to jump to.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .options import DetectOptions, options_from_mapping

#: share of the overall progress bar each pipeline stage takes (they run in this order)
STAGE_WEIGHTS: dict[str, float] = {
    "reading": 0.05,
    "dode": 0.25,
    "fpdm": 0.60,
    "dode localisation": 0.05,
    "writing": 0.05,
}
STAGE_LABELS = {
    "reading": "Reading volumes",
    "dode": "Scoring slices (AnoDODE)",
    "fpdm": "Segmenting (AnoFPDM)",
    "dode localisation": "Localising (AnoDODE)",
    "writing": "Writing results",
    "batch": "Batch",
}

#: the segment the labelmap's value 1 becomes
SEGMENT_NAME = "Anomaly"
SEGMENT_COLOR = (0.95, 0.35, 0.15)  #: RGB in [0, 1]; orange-red, distinct from Slicer's default green
#: Slicer terminology entry: the module ships its own context (``Resources/AnomalyDiffusion.term.json``,
#: loaded at startup) with category SNOMED CT 49755003 "Morphologically Altered Structure" and type
#: 52988006 "Lesion"; anatomic region SNOMED CT 12738006 "Brain" from the DICOM master list
TERMINOLOGY_CONTEXT = "Segmentation category and type - AnomalyDiffusion"
SEGMENT_TERMINOLOGY = (
    f"{TERMINOLOGY_CONTEXT}"
    "~SCT^49755003^Morphologically Altered Structure"
    "~SCT^52988006^Lesion"
    "~^^"
    "~Anatomic codes - DICOM master list"
    "~SCT^12738006^Brain"
    "~^^"
)
#: heatmap display: a colour table and the share of the heatmap's range shown
HEATMAP_COLOR_NODE = "vtkMRMLColorTableNodeFileInferno.txt"
HEATMAP_OPACITY = 0.5
#: share of the heatmap's range below which the overlay is transparent (and its window starts)
HEATMAP_LOWER_FRACTION = 0.05
#: the table column the per-slice plot uses as X (the slice number)
PLOT_X_COLUMN = "slice"
#: plot series drawn from slices.csv: (column, label, colour)
PLOT_SERIES = (
    ("dode_score", "AnoDODE score (bpd)", (0.95, 0.6, 0.1)),
    ("lesion_area_mm2", "AnoFPDM lesion area (mm²)", (0.1, 0.75, 0.85)),
)


# ------------------------------------------------------------------------------- command line
@dataclass
class DetectRequest:
    """What the panel asks for. ``inputs``: modality → file path (FLAIR first). The named settings are
    the panel's; ``options`` may set any other detect option by its
    :class:`~AnomalyDiffusionLib.options.DetectOptions` field name (e.g. ``{"seed": 3}``)."""

    inputs: Mapping[str, str]
    out_dir: str
    bundle: str | None = None  #: None: the embedded default bundle
    device: str = "auto"
    methods: Sequence[str] | None = None  #: None: the bundle's default methods
    w: float | None = None
    early_stop: bool | None = None
    stride: int | None = None
    dode_threshold: float | None = None
    dode_scales: Sequence[int] | None = None
    faithful: bool = False
    output_format: str = "nrrd"  #: files handed back to Slicer (NRRD keeps geometry in doubles)
    options: Mapping[str, Any] = field(default_factory=dict)


#: the DetectRequest fields that are detect options (the rest: inputs, output folder, bundle, format)
_REQUEST_OPTIONS = ("device", "methods", "w", "early_stop", "stride", "dode_threshold", "dode_scales", "faithful")


def request_options(req: DetectRequest) -> DetectOptions:
    """The request's detect options, checked by the schema (``InputError``, a ``ValueError``, names
    the first bad value)."""
    values: dict[str, Any] = {k: getattr(req, k) for k in _REQUEST_OPTIONS}
    values["methods"] = None if values["methods"] is None else tuple(values["methods"])
    if values["dode_scales"] is not None:
        values["dode_scales"] = tuple(int(s) for s in values["dode_scales"])
    return options_from_mapping({**values, **dict(req.options)})


def detect_command(req: DetectRequest, python: str | None = None) -> list[str]:
    """The exact ``anomaly-diffusion detect`` command line, run as a module of ``python``
    (Slicer's ``PythonSlicer``; default: this interpreter). Options at their defaults are left out."""
    if "flair" not in req.inputs or "t2" not in req.inputs:
        raise ValueError("FLAIR and T2 volumes are required")
    options = request_options(req)
    cmd = [python or sys.executable, "-m", "AnomalyDiffusionLib.cli", "--progress", "jsonl", "detect"]
    for name in ("flair", "t2", "t1", "t1ce"):
        if req.inputs.get(name):
            cmd += [f"--{name}", str(req.inputs[name])]
    cmd += ["--out", str(req.out_dir), "--format", req.output_format]
    if req.bundle:
        cmd += ["--bundle", str(req.bundle)]
    return cmd + options.to_argv()


@dataclass
class BatchRequest:
    """A ``batch`` run: a BraTS-layout folder or cases CSV in, one folder per case out (see
    :mod:`~AnomalyDiffusionLib.batch`). ``options``: detect options by field name."""

    input: str
    out_dir: str
    bundle: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    output_format: str | None = None  #: None: each case's FLAIR format
    force: bool = False
    shard: tuple[int, int] | None = None  #: (I, N): every N-th case from I


def batch_command(req: BatchRequest, python: str | None = None) -> list[str]:
    """The exact ``anomaly-diffusion batch`` command line (progress as JSON lines, stage ``batch``),
    for :class:`DetectProcess` from Slicer's Python console."""
    options = options_from_mapping(req.options)
    cmd = [python or sys.executable, "-m", "AnomalyDiffusionLib.cli", "--progress", "jsonl", "batch"]
    cmd += ["--input", str(req.input), "--out", str(req.out_dir)]
    if req.output_format:
        cmd += ["--format", req.output_format]
    if req.bundle:
        cmd += ["--bundle", str(req.bundle)]
    if req.force:
        cmd += ["--force"]
    if req.shard is not None:
        cmd += ["--shard", f"{int(req.shard[0])}/{int(req.shard[1])}"]
    return cmd + options.to_argv()


# ------------------------------------------------------------------------------------ progress
@dataclass
class ProgressState:
    """What the panel shows: overall fraction in [0, 1] and a status line."""

    fraction: float = 0.0
    status: str = "Starting"
    stage: str | None = None
    error: str | None = None  #: the CLI's one-line error, without the "error: " prefix
    log: list[str] = field(default_factory=list)  #: non-progress output lines
    stages: list[str] = field(default_factory=list)  #: stages in the order they were reported


def _stage_start(stage: str) -> float:
    start = 0.0
    for name, weight in STAGE_WEIGHTS.items():
        if name == stage:
            return start
        start += weight
    return start


def parse_progress_line(line: str, state: ProgressState) -> ProgressState:
    """Fold one line of the CLI's output into ``state`` (returned). JSON progress records move the
    overall fraction forward (never back); ``error: ...`` lines become ``state.error``; anything
    else is kept in ``state.log``."""
    text = line.strip()
    if not text:
        return state
    if text.startswith("{"):
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            rec = None
        if isinstance(rec, dict) and "stage" in rec and "fraction" in rec:
            stage = str(rec["stage"])
            frac = min(max(float(rec["fraction"]), 0.0), 1.0)
            weights_total = sum(STAGE_WEIGHTS.values())
            if stage == "batch":  # a batch reports its overall fraction itself
                overall = frac
            elif stage in STAGE_WEIGHTS:
                overall = (_stage_start(stage) + STAGE_WEIGHTS[stage] * frac) / weights_total
            else:
                overall = state.fraction
            state.fraction = max(state.fraction, min(overall, 1.0))
            if stage != state.stage:
                state.stages.append(stage)
            state.stage = stage
            label = STAGE_LABELS.get(stage, stage)
            msg = str(rec.get("message") or "")
            state.status = f"{label}: {msg}" if msg else label
            return state
    if text.startswith("error: "):
        state.error = text[len("error: ") :]
        return state
    state.log.append(text)
    return state


# ------------------------------------------------------------------------------------- process
def popen_options(env: Mapping[str, str] | None = None, os_name: str | None = None, sp=subprocess) -> tuple[dict, dict]:
    """``(Popen keyword arguments, environment)`` for the CLI child process.

    Its own process group (so Cancel reaches every child); on Windows additionally no console window
    (``STARTUPINFO`` with ``SW_HIDE`` and ``CREATE_NO_WINDOW``, as ``slicer.util.launchConsoleProcess``
    hides it). The child writes UTF-8 whatever the system code page (``PYTHONIOENCODING``,
    ``PYTHONUTF8``), unbuffered so progress arrives line by line. ``os_name`` / ``sp`` let tests ask
    for the Windows options on another system.
    """
    os_name = os.name if os_name is None else os_name
    kwargs: dict = {}
    if os_name == "nt":
        kwargs["creationflags"] = sp.CREATE_NEW_PROCESS_GROUP | sp.CREATE_NO_WINDOW
        info = sp.STARTUPINFO()
        info.dwFlags |= sp.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        kwargs["startupinfo"] = info
    else:
        kwargs["start_new_session"] = True
    full_env = dict(os.environ if env is None else env)
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env["PYTHONIOENCODING"] = "utf-8"
    full_env["PYTHONUTF8"] = "1"
    return kwargs, full_env


class DetectProcess:
    """The CLI in its own process (group), read by a background thread; poll it from the GUI.

    ``poll()`` returns the latest :class:`ProgressState` without blocking; ``done`` tells when the
    process has ended and its output is fully read; ``cancel()`` ends the whole process tree.
    """

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None) -> None:
        self.command = list(command)
        self.state = ProgressState()
        self.returncode: int | None = None
        self.cancelled = False
        self._lines: queue.Queue[str | None] = queue.Queue()
        kwargs, full_env = popen_options(env)
        self._proc = subprocess.Popen(
            self.command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            env=full_env,
            cwd=cwd,
            **kwargs,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._ended = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def poll(self) -> ProgressState:
        """Consume the lines read so far; never blocks."""
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._ended = True
                break
            parse_progress_line(line, self.state)
        if self._ended and self.returncode is None:
            self.returncode = self._proc.wait()
        return self.state

    @property
    def done(self) -> bool:
        return self.returncode is not None

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and not self.cancelled

    def error_message(self) -> str:
        """One line for the user: the CLI's own error, or what is known about the failure."""
        if self.cancelled:
            return "cancelled"
        if self.state.error:
            return self.state.error
        tail = "; ".join(self.state.log[-3:])
        return f"the detection process exited with status {self.returncode}" + (f": {tail}" if tail else "")

    def output_text(self) -> str:
        """Everything the process printed that was not progress (for the application log)."""
        lines = list(self.state.log)
        if self.state.error:
            lines.append(f"error: {self.state.error}")
        return "\n".join(lines)

    def cancel(self, grace_s: float = 3.0) -> None:
        """End the process and all its children: SIGTERM to the group, SIGKILL after ``grace_s``."""
        self.cancelled = True
        if self._proc.poll() is None:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._proc.pid)], capture_output=True)
            else:
                try:
                    os.killpg(self._proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self._proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(self._proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        self.returncode = self._proc.wait()
        self._reader.join(timeout=5)

    def wait(self, progress=None, interval_s: float = 0.1, timeout_s: float | None = None) -> ProgressState:
        """Block until done (console/batch use), calling ``progress(fraction, status)`` on changes."""
        t0 = time.monotonic()
        last = None
        while not self.done:
            st = self.poll()
            if progress is not None and (st.fraction, st.status) != last:
                last = (st.fraction, st.status)
                progress(st.fraction, st.status)
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                self.cancel()
                raise TimeoutError(f"detection did not finish within {timeout_s} s")
            time.sleep(interval_s)
        return self.poll()


# ----------------------------------------------------------------------------- outputs → nodes
@dataclass(frozen=True)
class OutputItem:
    """One output file and the node it becomes."""

    kind: str  #: "segmentation" | "labelmap" | "heatmap" | "table" | "summary" | "overview"
    path: Path
    node_name: str


def output_plan(out_dir: str | os.PathLike, base_name: str, keep_labelmap: bool = False) -> list[OutputItem]:
    """Which files of a finished ``detect`` folder become which nodes (absent files are skipped).

    ``base_name`` is the FLAIR node's name; nodes are named after it so several runs stay apart.
    """
    out = Path(out_dir)
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"no summary.json in '{out}': the detection did not finish")
    summary = json.loads(summary_path.read_text())
    names = summary.get("outputs", {})
    plan = [OutputItem("summary", summary_path, f"{base_name} anomaly summary")]
    if "segmentation" in names:
        seg = out / names["segmentation"]
        plan.append(OutputItem("segmentation", seg, f"{base_name} anomalies"))
        if keep_labelmap:
            plan.append(OutputItem("labelmap", seg, f"{base_name} anomaly labelmap"))
    if "heatmap" in names:
        plan.append(OutputItem("heatmap", out / names["heatmap"], f"{base_name} anomaly heatmap"))
    if (out / "slices.csv").is_file():
        plan.append(OutputItem("table", out / "slices.csv", f"{base_name} slice scores"))
    if (out / "overview.png").is_file():
        plan.append(OutputItem("overview", out / "overview.png", f"{base_name} anomaly overview"))
    return plan


def read_table(path: str | os.PathLike) -> tuple[list[str], dict[str, list], dict[str, str]]:
    """``slices.csv`` → (column names, column values, column types "int" | "double" | "bool" |
    "string"), the types the table node's columns get. Empty cells (a method that did not run for a
    slice) become NaN in double columns."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = list(rows[0].keys()) if rows else []
    values: dict[str, list] = {}
    types: dict[str, str] = {}
    for c in cols:
        raw = [r[c] for r in rows]
        if c in ("dode_anomalous", "fpdm_ran", "fpdm_unhealthy"):
            types[c] = "bool"
            values[c] = [v in ("1", "True", "true") for v in raw]
        elif c == "slice" or c.startswith("fpdm_t_e_"):
            types[c] = "int"
            values[c] = [int(v) if v != "" else -1 for v in raw]
        else:
            try:
                values[c] = [float(v) if v != "" else float("nan") for v in raw]
                types[c] = "double"
            except ValueError:
                values[c] = raw
                types[c] = "string"
    return cols, values, types


def plot_series(columns: Sequence[str]) -> list[tuple[str, str, tuple[float, float, float]]]:
    """The (column, label, colour) series to plot against ``slice``, for the columns present."""
    return [s for s in PLOT_SERIES if s[0] in columns]


def jump_target(summary: Mapping) -> tuple[float, float, float] | None:
    """RAS point (mm) of the most anomalous slice's centre, for Slicer's jump-to-location."""
    most = summary.get("most_anomalous_slice")
    if not most or "center_ras_mm" not in most:
        return None
    x, y, z = (float(v) for v in most["center_ras_mm"])
    return (x, y, z)


def status_after(summary: Mapping) -> str:
    """The status line after a successful run."""
    most = summary.get("most_anomalous_slice") or {}
    vol = summary.get("lesion_volume_ml")
    parts = [str(summary.get("verdict", "done")).capitalize()]
    if vol:
        parts.append(f"{vol:.1f} mL segmented")
    if most.get("slice") is not None:
        parts.append(f"most anomalous slice {most['slice']} (S {most.get('superior_mm', 0):.0f} mm)")
    t = (summary.get("timings_s") or {}).get("total")
    if t is not None:
        parts.append(f"{t:.0f} s on {summary.get('device', '?')}")
    warnings = [str(w) for w in summary.get("warnings") or []]
    if warnings:
        parts.append("warning: " + "; ".join(warnings))
    return "; ".join(parts)


# ------------------------------------------------------------------------------ device probe
def device_probe_command(python: str | None = None) -> list[str]:
    """``anomaly-diffusion info --json`` with Slicer's Python: the panel learns the device from a
    child process, so Slicer's own process never imports torch nor opens a GPU context."""
    return [python or sys.executable, "-m", "AnomalyDiffusionLib.cli", "--progress", "none", "info", "--json"]


def parse_info_output(lines: Sequence[str]) -> dict | None:
    """The JSON object ``info --json`` printed (the last line that parses as one), else None."""
    for line in reversed(list(lines)):
        text = line.strip()
        if text.startswith("{"):
            try:
                rec = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "torch" in rec:
                return rec
    return None


def device_label(info: Mapping | None, output: str = "") -> str:
    """The panel's device line from ``info --json``'s object (None: the probe failed)."""
    if info is None:
        if "No module named 'torch'" in output or "No module named torch" in output:
            return "PyTorch not installed yet (installed on first run)"
        if "No module named" in output:
            return "Python packages not installed yet (installed on first run)"
        return "Device unknown (the probe failed; see the log)"
    if info.get("cuda_available"):
        return f"GPU: {info.get('cuda_device') or info.get('device') or 'CUDA'}"
    if info.get("mps_available"):
        return "Apple GPU (MPS) found; detection runs on the CPU"
    return "CPU only (no CUDA GPU found)"


# ------------------------------------------------------------------------------ requirements
def missing_requirements(lines: Sequence[str], skip: Sequence[str] = (), version_of=None) -> list[str]:
    """The requirement lines (``requirements.txt`` syntax) that the installed packages do not satisfy,
    for Slicer versions without ``slicer.packaging`` (5.10). ``skip``: distribution names left to
    others (torch from the PyTorch extension, Slicer's numpy). ``version_of(name)`` returns the
    installed version or None (default: ``importlib.metadata``). Versions are compared with
    ``packaging`` when it is importable, else a requirement is met by any installed version."""
    if version_of is None:
        import importlib.metadata

        def version_of(name):
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return None

    requirement: Any = None  # packaging's Requirement class when importable
    try:
        from packaging.requirements import Requirement as requirement
    except ImportError:  # pragma: no cover - Slicer ships packaging (pip needs it)
        pass
    skipped = {_canonical(s) for s in skip}
    missing = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if requirement is not None:
            req = requirement(line)
            name, spec = req.name, req.specifier
        else:
            name = re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]
            spec = None
        if _canonical(name) in skipped:
            continue
        installed = version_of(name)
        if installed is None or (spec is not None and not spec.contains(installed, prereleases=True)):
            missing.append(line)
    return missing


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ------------------------------------------------------------------- bundle settings / overrides
#: the settings the advanced box shows, each with the bundle value it starts from
OVERRIDE_FIELDS = ("w", "early_stop", "stride", "dode_threshold")


def read_manifest(bundle: str | os.PathLike) -> dict:
    """A bundle's ``manifest.json`` (folder or .zip) as a dict, without torch."""
    path = Path(bundle)
    if path.is_dir():
        return json.loads((path / "manifest.json").read_text())
    import zipfile

    with zipfile.ZipFile(path) as zf:
        name = next((n for n in zf.namelist() if n.rsplit("/", 1)[-1] == "manifest.json"), None)
        if name is None:
            raise FileNotFoundError(f"no manifest.json in '{path}'")
        return json.loads(zf.read(name))


def bundle_settings(manifest: Mapping) -> dict:
    """The calibrated values a run uses when nothing is overridden: AnoFPDM w, early stop, stride
    (``fpdm.settings``; w from the calibration when present) and the AnoDODE decision threshold."""
    out: dict = {}
    fpdm = manifest.get("fpdm") or {}
    settings = fpdm.get("settings") or {}
    cal = fpdm.get("calibration") or {}
    w = cal.get("w", settings.get("w"))
    if w is not None:
        out["w"] = float(w)
    if "early_stop" in settings:
        out["early_stop"] = bool(settings["early_stop"])
    if "stride" in settings:
        out["stride"] = int(settings["stride"])
    dode = manifest.get("dode") or {}
    if dode.get("decision_threshold") is not None:
        out["dode_threshold"] = float(dode["decision_threshold"])
    return out


#: decimals the panel's spin boxes show (a value read back from a spin box is rounded to them)
DISPLAY_DECIMALS = {"w": 2, "dode_threshold": 3}


def changed_settings(shown: Mapping, values: Mapping, decimals: Mapping[str, int] = DISPLAY_DECIMALS) -> dict:
    """Only the settings the user changed: the entries of ``values`` that differ from the values the
    panel showed from the bundle (``shown``), real numbers compared at the precision the panel shows
    (``decimals``); a setting with no shown value counts as changed."""
    out = {}
    for key in OVERRIDE_FIELDS:
        if key not in values or values[key] is None:
            continue
        v = values[key]
        base = shown.get(key)
        if base is None:
            out[key] = v
        elif key in decimals:
            if round(float(v), decimals[key]) != round(float(base), decimals[key]):
                out[key] = v
        elif v != base:
            out[key] = v
    return out
