"""Drive the module's panel (``AnomalyDiffusionPanel``) with a stub logic, outside Slicer.

Slicer, Qt and VTK are not importable here, so the few names the module file touches at import and
in the panel are replaced by minimal stand-ins (``sys.modules`` entries); the panel's own behaviour
— start, progress bar, success, failure message, cancel, clean-up, button states — is the real code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

from AnomalyDiffusionLib.slicer_bridge import ProgressState

MODULE = Path(__file__).resolve().parents[1] / "AnomalyDiffusion" / "AnomalyDiffusion.py"


class _Signal:
    def __init__(self):
        self.slots = {}

    def __call__(self, signal, slot):  # widget.connect("clicked(bool)", slot)
        self.slots[signal] = slot


class _Widget:
    def __init__(self, text=""):
        self.visible, self.enabled, self.text, self.value, self.toolTip = True, True, text, 0, ""
        self.currentText = text
        self.connect = _Signal()
        self.values = []

    def setVisible(self, v):
        self.visible = bool(v)

    def setEnabled(self, v):
        self.enabled = bool(v)

    def setText(self, t):
        self.text = t

    def setValue(self, v):
        self.value = v
        self.values.append(v)


class _Timer:
    def __init__(self):
        self.active = False
        self.connect = _Signal()

    def setInterval(self, ms):
        self.ms = ms

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


@pytest.fixture()
def module(monkeypatch):
    errors = []

    @contextlib.contextmanager
    def try_with_error_display(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:
            errors.append(f"{message}\n{exc}")
            raise

    util = types.SimpleNamespace(
        VTKObservationMixin=type(
            "VTKObservationMixin",
            (),
            {"__init__": lambda self: None, "addObserver": lambda *a, **k: None,
             "removeObserver": lambda *a, **k: None, "removeObservers": lambda *a, **k: None},
        ),
        tryWithErrorDisplay=try_with_error_display,
        errorDisplay=lambda text, **k: errors.append(text),
    )  # fmt: skip
    slicer = types.ModuleType("slicer")
    slicer.util = util
    slicer.app = types.SimpleNamespace(connect=lambda *a: None)
    for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode"):
        setattr(slicer, name, type(name, (), {}))
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda s: s
    i18n.translate = lambda ctx, s: s
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = pnw.WithinRange = lambda *a: None
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):  # fmt: skip
        setattr(slm, name, type(name, (), {"__init__": lambda self, *a: None}))
    util_mod = types.ModuleType("slicer.util")
    util_mod.VTKObservationMixin = util.VTKObservationMixin
    qt = types.ModuleType("qt")
    qt.QTimer = _Timer
    vtk = types.ModuleType("vtk")
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent="ModifiedEvent")
    stubs = {"slicer": slicer, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": pnw,
             "slicer.ScriptedLoadableModule": slm, "slicer.util": util_mod, "qt": qt, "vtk": vtk}  # fmt: skip
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("AnomalyDiffusionModuleUnderTest", MODULE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._test_errors = errors
    return mod


class FakeProcess:
    """Reports the given fractions, then ends with ``rc``."""

    def __init__(self, fractions, rc=0, error=None):
        self.fractions = list(fractions)
        self.rc, self.error = rc, error
        self.returncode = None
        self.cancelled = False
        self.state = ProgressState()

    def poll(self):
        if self.fractions:
            self.state.fraction = self.fractions.pop(0)
            self.state.status = f"Segmenting (AnoFPDM): {self.state.fraction:.2f}"
        elif self.returncode is None:
            self.returncode = self.rc
        return self.state

    @property
    def done(self):
        return self.returncode is not None

    @property
    def succeeded(self):
        return self.returncode == 0 and not self.cancelled

    def error_message(self):
        return "cancelled" if self.cancelled else self.error

    def cancel(self):
        self.cancelled = True
        self.returncode = -15


class FakeLogic:
    def __init__(self, process):
        self.process = process
        self.loaded = self.cleaned = 0
        self.params = types.SimpleNamespace(flairVolume="F", t2Volume="T", connectGui=lambda ui: 1,
                                            disconnectGui=lambda tag: None)  # fmt: skip

    def detectedDevice(self):
        return "CPU only (no CUDA GPU found)"

    def getParameterNode(self):
        return self.params

    def guessInputs(self):
        return None, None

    def startDetection(self, p):
        return self.process, {"tempDir": "/tmp/x"}

    def loadResults(self, run, p):
        self.loaded += 1
        return {"verdict": "anomalous", "lesion_volume_ml": 96.5, "timings_s": {"total": 86.0}, "device": "cpu",
                "most_anomalous_slice": {"slice": 40, "superior_mm": 21.0}}  # fmt: skip

    def cleanupRun(self, run):
        self.cleaned += 1


def _ui():
    names = ("applyButton", "cancelButton", "bundleSourceComboBox", "progressBar", "deviceLabel", "statusLabel",
             "bundlePathLineEdit", "bundleUrlLineEdit", "bundleChecksumLineEdit")  # fmt: skip
    ui = types.SimpleNamespace(**{n: _Widget() for n in names})
    ui.bundleSourceComboBox.currentText = "Embedded default"
    return ui


def _run_to_end(panel, limit=50):
    for _ in range(limit):
        if panel._run is None:
            return
        panel._poll()
    raise AssertionError("the panel never finished")


def test_success_updates_progress_loads_results_and_cleans_up(module):
    ui, logic = _ui(), FakeLogic(FakeProcess([0.1, 0.4, 0.9, 1.0]))
    panel = module.AnomalyDiffusionPanel(ui, logic)
    panel.initializeParameterNode()
    assert ui.deviceLabel.text.startswith("CPU only") and ui.applyButton.enabled
    assert not ui.bundlePathLineEdit.visible and not ui.bundleUrlLineEdit.visible
    panel.onApply()
    assert panel._timer.active and ui.progressBar.visible and ui.cancelButton.enabled and not ui.applyButton.enabled
    _run_to_end(panel)
    assert ui.progressBar.values == sorted(ui.progressBar.values) and ui.progressBar.values[-1] == 100
    assert logic.loaded == 1 and logic.cleaned == 1 and not panel._timer.active
    assert ui.statusLabel.text.startswith("Anomalous; 96.5 mL segmented; most anomalous slice 40")
    assert ui.applyButton.enabled and not ui.cancelButton.enabled and not ui.progressBar.visible


def test_failure_shows_the_cli_message_and_loads_nothing(module):
    ui, logic = _ui(), FakeLogic(FakeProcess([0.2], rc=2, error="FLAIR file not found: 'x'"))
    panel = module.AnomalyDiffusionPanel(ui, logic)
    panel.initializeParameterNode()
    panel.onApply()
    _run_to_end(panel)
    assert logic.loaded == 0 and logic.cleaned == 1
    assert ui.statusLabel.text == "Failed: FLAIR file not found: 'x'"
    assert module._test_errors == ["Anomaly detection failed:\nFLAIR file not found: 'x'"]


def test_cancel_leaves_the_scene_untouched(module):
    ui, logic = _ui(), FakeLogic(FakeProcess([0.1, 0.2, 0.3, 0.4, 0.5]))
    panel = module.AnomalyDiffusionPanel(ui, logic)
    panel.initializeParameterNode()
    panel.onApply()
    panel._poll()
    panel.cancel()
    assert logic.process.cancelled and logic.loaded == 0 and logic.cleaned == 1
    assert panel._run is None and ui.statusLabel.text.startswith("Cancelled")
    assert ui.applyButton.enabled and not ui.cancelButton.enabled


def test_apply_needs_both_volumes(module):
    ui, logic = _ui(), FakeLogic(FakeProcess([]))
    logic.params.t2Volume = None
    panel = module.AnomalyDiffusionPanel(ui, logic)
    panel.initializeParameterNode()
    assert not ui.applyButton.enabled


def test_start_failure_reaches_the_error_display(module):
    ui, logic = _ui(), FakeLogic(FakeProcess([]))

    def boom(p):
        raise RuntimeError("Model bundle not found: 'x'")

    logic.startDetection = boom
    panel = module.AnomalyDiffusionPanel(ui, logic)
    panel.initializeParameterNode()
    with pytest.raises(RuntimeError):
        panel.onApply()
    assert panel._run is None and "Model bundle not found" in module._test_errors[0]
