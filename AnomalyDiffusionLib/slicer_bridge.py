"""Everything the Slicer module decides, in plain Python (no Slicer, Qt or torch imports).

The module (``AnomalyDiffusion/AnomalyDiffusion.py``) stays thin: it exports the input volumes,
starts :class:`DetectProcess` with the command :func:`detect_command` builds, polls it from a Qt
timer (the GUI never blocks), and turns the result folder into scene nodes following
:func:`output_plan`. Keeping these decisions here lets CI test them without Slicer:

* the CLI command line (with Slicer's own Python, ``PythonSlicer``);
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
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

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
#: plot series drawn from slices.csv: (column, label, colour)
PLOT_SERIES = (
    ("dode_score", "AnoDODE score (bpd)", (0.95, 0.6, 0.1)),
    ("lesion_area_mm2", "AnoFPDM lesion area (mm²)", (0.1, 0.75, 0.85)),
)


# ------------------------------------------------------------------------------- command line
@dataclass
class DetectRequest:
    """What the panel asks for. ``inputs``: modality → file path (FLAIR first)."""

    inputs: Mapping[str, str]
    out_dir: str
    bundle: str | None = None  #: None: the embedded default bundle
    device: str = "auto"
    methods: Sequence[str] = ("fpdm", "dode")
    w: float | None = None
    early_stop: bool | None = None
    stride: int | None = None
    dode_threshold: float | None = None
    dode_scales: Sequence[int] | None = None
    faithful: bool = False
    output_format: str = "nrrd"  #: files handed back to Slicer (NRRD keeps geometry in doubles)


def detect_command(req: DetectRequest, python: str | None = None) -> list[str]:
    """The exact ``anomaly-diffusion detect`` command line, run as a module of ``python``
    (Slicer's ``PythonSlicer``; default: this interpreter)."""
    if "flair" not in req.inputs or "t2" not in req.inputs:
        raise ValueError("FLAIR and T2 volumes are required")
    methods = [m for m in req.methods]
    if not methods or any(m not in ("fpdm", "dode") for m in methods):
        raise ValueError(f"methods must be fpdm and/or dode, not {methods}")
    cmd = [python or sys.executable, "-m", "AnomalyDiffusionLib.cli", "--progress", "jsonl", "detect"]
    for name in ("flair", "t2", "t1", "t1ce"):
        if req.inputs.get(name):
            cmd += [f"--{name}", str(req.inputs[name])]
    cmd += ["--out", str(req.out_dir), "--device", req.device, "--methods", ",".join(methods)]
    cmd += ["--format", req.output_format]
    if req.bundle:
        cmd += ["--bundle", str(req.bundle)]
    if req.faithful:
        cmd += ["--faithful"]
    if req.w is not None:
        cmd += ["--w", repr(float(req.w))]
    if req.early_stop is not None:
        cmd += ["--early-stop" if req.early_stop else "--no-early-stop"]
    if req.stride is not None:
        cmd += ["--stride", str(int(req.stride))]
    if req.dode_threshold is not None:
        cmd += ["--dode-threshold", repr(float(req.dode_threshold))]
    if req.dode_scales:
        cmd += ["--dode-scales", ",".join(str(int(s)) for s in req.dode_scales)]
    return cmd


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
            if stage in STAGE_WEIGHTS:
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
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True  # its own process group: Cancel reaches every child
        full_env = dict(os.environ if env is None else env)
        full_env["PYTHONUNBUFFERED"] = "1"
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
    return "; ".join(parts)
