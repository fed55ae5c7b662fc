"""Drive the module's panel (``AnomalyDiffusionPanel``) and logic outside Slicer.

Slicer, Qt and VTK are not importable here, so the few names the module file touches are replaced by
minimal stand-ins (``sys.modules`` entries, a small fake MRML scene); the module's own behaviour is
the real code: start, progress bar, success, failure message and log, cancel, clean-up, button
states, the device probe, the advanced settings' override semantics, the dependency install path of
Slicer 5.10 (no ``slicer.packaging``) and 5.12, the Sample Data registration of both, outputs of
two runs kept apart, the plot's X column, outputs saved with the scene, and the console API through
``slicer.util.getModuleLogic``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import sys
import types
from pathlib import Path
from unittest import mock

import pytest

from AnomalyDiffusionLib import slicer_bridge
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
        self.attributes = []

    def addAttribute(self, nodeType, name, value=None):
        self.attributes.append((nodeType, name, value))

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


class FakeArray:
    def __init__(self):
        self.name, self.values = None, []

    def SetName(self, name):
        self.name = name

    def InsertNextValue(self, v):
        self.values.append(v)


class FakeNode:
    """A scene node: ID, name, attributes, the few typed behaviours the module relies on; any other
    method call is accepted and recorded in ``calls``."""

    STORABLE = ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode")

    def __init__(self, scene, cls, name):
        self.scene, self.cls, self.name = scene, cls, name
        self.id = f"{cls}{next(scene.counter)}"
        self.attributes, self.calls = {}, []
        self.storage = None
        self.storableModified = 0
        self.series_ids, self.columns = [], []
        self.x = self.y = self.plotType = None
        self.display = mock.MagicMock()
        self.segmentation = mock.MagicMock()
        self.image = mock.MagicMock()
        self.image.GetScalarRange.return_value = (0.0, 2.0)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: self.calls.append((name, a))

    def GetID(self):
        return self.id

    def GetName(self):
        return self.name

    def IsA(self, cls):
        return cls == self.cls or (cls == "vtkMRMLStorableNode" and self.cls in self.STORABLE)

    def SetAttribute(self, key, value):
        self.attributes[key] = value

    def GetAttribute(self, key):
        return self.attributes.get(key)

    def StorableModified(self):
        self.storableModified += 1

    def GetStorageNode(self):
        return self.storage

    def GetDisplayNode(self):
        return self.display

    def GetImageData(self):
        return self.image

    def GetSegmentation(self):
        return self.segmentation

    def WriteData(self, node):  # a storage node exporting an input volume
        Path(self.fileName).write_bytes(b"")
        return True

    def SetFileName(self, name):
        self.fileName = name

    # charts, series, tables
    def AddAndObservePlotSeriesNodeID(self, node_id):
        self.series_ids.append(node_id)

    def GetNumberOfPlotSeriesNodes(self):
        return len(self.series_ids)

    def GetNthPlotSeriesNode(self, i):
        return self.scene.GetNodeByID(self.series_ids[i])

    def SetXColumnName(self, c):
        self.x = c

    def SetYColumnName(self, c):
        self.y = c

    def GetYColumnName(self):
        return self.y

    def SetPlotType(self, t):
        self.plotType = t

    def AddColumn(self, arr):
        self.columns.append(arr)

    def RemoveAllColumns(self):
        self.columns = []


class FakeScene:
    StartCloseEvent, EndCloseEvent = "StartCloseEvent", "EndCloseEvent"

    def __init__(self):
        import itertools

        self.nodes, self.removed, self.counter = {}, [], itertools.count(1)

    def AddNewNodeByClass(self, cls, name=""):
        node = FakeNode(self, cls, name or cls)
        self.nodes[node.id] = node
        return node

    def GenerateUniqueName(self, base):
        names = {n.name for n in self.nodes.values()}
        if base not in names:
            return base
        i = 1
        while f"{base}_{i}" in names:
            i += 1
        return f"{base}_{i}"

    def RemoveNode(self, node):  # as MRML: references to a removed node go with it
        self.nodes.pop(node.id, None)
        self.removed.append(node)
        for other in self.nodes.values():
            if other.storage is node:
                other.storage = None

    def GetNodeByID(self, node_id):
        return self.nodes.get(node_id)

    def byClass(self, cls):
        return [n for n in self.nodes.values() if n.cls == cls]


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture()
def module(monkeypatch, tmp_path):
    errors = []
    scene = FakeScene()

    @contextlib.contextmanager
    def try_with_error_display(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:  # as Slicer's: shows the message, then re-raises
            errors.append(f"{message}\n{exc}")
            raise

    def load_volume(path, props, cls="vtkMRMLScalarVolumeNode"):
        node = scene.AddNewNodeByClass(cls, props["name"])
        node.storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        node.storage.fileName = path
        return node

    widgets = {}

    def get_module_logic(name):  # as slicer.util.getModuleLogic in v5.10.0 and v5.12.3
        try:
            logic = widgets[name].logic
        except AttributeError:
            logic = None
        if not logic:
            raise RuntimeError(f"Could not find module widget representation with name '{name}'")
        return logic

    util = types.SimpleNamespace(
        VTKObservationMixin=type(
            "VTKObservationMixin",
            (),
            {"__init__": lambda self: None, "addObserver": lambda *a, **k: None,
             "removeObserver": lambda *a, **k: None, "removeObservers": lambda *a, **k: None},
        ),
        tryWithErrorDisplay=try_with_error_display,
        errorDisplay=lambda text, **k: errors.append(text),
        loadVolume=load_volume,
        loadLabelVolume=lambda path, props: load_volume(path, props, "vtkMRMLLabelMapVolumeNode"),
        getNodesByClass=scene.byClass,
        setSliceViewerLayers=lambda **k: None,
        tempDirectory=lambda key: str(_mkdir(tmp_path / key)),
        startupEnvironment=lambda: {"PATH": "/usr/bin"},
        getModuleLogic=get_module_logic,
        confirmOkCancelDisplay=lambda text, **k: True,
        pip_install=mock.MagicMock(),
        WaitCursor=contextlib.nullcontext,
        createProgressDialog=lambda **k: mock.MagicMock(),
        loadUI=lambda path: mock.MagicMock(),
        childWidgetVariables=lambda w: _ui(),
    )  # fmt: skip
    slicer = types.ModuleType("slicer")
    slicer.util = util
    slicer.app = types.SimpleNamespace(connect=lambda *a: None, processEvents=lambda *a: None, cachePath=str(tmp_path))
    slicer.mrmlScene = scene
    slicer.modules = mock.MagicMock()
    slicer.vtkMRMLSubjectHierarchyNode = mock.MagicMock()
    slicer.vtkMRMLSliceNode = mock.MagicMock()
    slicer.vtkMRMLPlotSeriesNode = types.SimpleNamespace(
        PlotTypeLine="Line", PlotTypeScatter="Scatter", LineStyleSolid="Solid", MarkerStyleNone="NoMarker"
    )
    for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTableNode"):
        setattr(slicer, name, type(name, (), {}))
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda s: s
    i18n.translate = lambda ctx, s: s
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.Choice = pnw.WithinRange = lambda *a: None
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (), {"__init__": lambda self, *a: None}))

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.layout = mock.MagicMock()

        def setup(self):
            pass

        def resourcePath(self, name):
            return name

    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    util_mod = types.ModuleType("slicer.util")
    util_mod.VTKObservationMixin = util.VTKObservationMixin
    qt = types.ModuleType("qt")
    qt.QTimer = _Timer
    qt.QEventLoop = types.SimpleNamespace(ExcludeUserInputEvents=1)
    qt.QFileDialog = types.SimpleNamespace(
        getExistingDirectory=lambda *a: "/data/bundles/mine", getOpenFileName=lambda *a: "/data/bundles/b.zip"
    )
    vtk = types.ModuleType("vtk")
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent="ModifiedEvent")
    vtk.vtkIntArray = vtk.vtkDoubleArray = vtk.vtkStringArray = FakeArray
    stubs = {"slicer": slicer, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": pnw,
             "slicer.ScriptedLoadableModule": slm, "slicer.util": util_mod, "qt": qt, "vtk": vtk}  # fmt: skip
    for name, mod in stubs.items():
        monkeypatch.setitem(sys.modules, name, mod)
    spec = importlib.util.spec_from_file_location("AnomalyDiffusionModuleUnderTest", MODULE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._test_errors = errors
    mod._test_scene = scene
    mod._test_widgets = widgets
    return mod


class FakeProcess:
    """Reports the given fractions, then ends with ``rc``."""

    def __init__(self, fractions, rc=0, error=None, output=""):
        self.fractions = list(fractions)
        self.rc, self.error, self.output = rc, error, output
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

    def wait(self, progress=None, **k):
        while not self.done:
            self.poll()
        return self.state

    @property
    def done(self):
        return self.returncode is not None

    @property
    def succeeded(self):
        return self.returncode == 0 and not self.cancelled

    def error_message(self):
        return "cancelled" if self.cancelled else self.error

    def output_text(self):
        return self.output

    def cancel(self):
        self.cancelled = True
        self.returncode = -15


class FakeProbe(FakeProcess):
    pass


def _params(**kw):
    values = dict(flairVolume="F", t2Volume="T", bundleSource="Embedded default", bundlePath="", bundleUrl="",
                  bundleChecksum="", guidance=5.0,
                  earlyStop=False, stride=30, decisionThreshold=0.0, shownSettings="",
                  connectGui=lambda ui: 1, disconnectGui=lambda tag: None)  # fmt: skip
    values.update(kw)
    return types.SimpleNamespace(**values)


class FakeLogic:
    def __init__(self, process, settings=None):
        self.process = process
        self.settings = settings
        self.loaded = self.cleaned = self.probes = 0
        self.params = _params()

    def startDeviceProbe(self):
        self.probes += 1
        return FakeProbe([])

    def deviceLabel(self, probe):
        return "CPU only (no CUDA GPU found)"

    def bundleSettings(self, p):
        return self.settings

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
             "bundlePathLineEdit", "bundleUrlLineEdit", "bundleChecksumLineEdit", "bundleFolderButton",
             "bundleFileButton", "heatmapSelector")  # fmt: skip
    ui = types.SimpleNamespace(**{n: _Widget() for n in names})
    ui.bundleSourceComboBox.currentText = "Embedded default"
    return ui


def _panel(module, logic):
    """A panel whose device probe has finished."""
    ui = _ui()
    panel = module.AnomalyDiffusionPanel(ui, logic)
    panel._pollProbe()
    panel._pollProbe()
    return ui, panel


def _run_to_end(panel, limit=50):
    for _ in range(limit):
        if panel._run is None:
            return
        panel._poll()
    raise AssertionError("the panel never finished")


def test_success_updates_progress_loads_results_and_cleans_up(module):
    logic = FakeLogic(FakeProcess([0.1, 0.4, 0.9, 1.0]))
    ui, panel = _panel(module, logic)
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


def test_failure_shows_the_cli_message_and_loads_nothing(module, caplog):
    caplog.set_level(logging.INFO)
    logic = FakeLogic(FakeProcess([0.2], rc=2, error="FLAIR file not found: 'x'", output="Traceback ...\nline 2"))
    ui, panel = _panel(module, logic)
    panel.initializeParameterNode()
    panel.onApply()
    _run_to_end(panel)
    assert logic.loaded == 0 and logic.cleaned == 1
    assert ui.statusLabel.text == "Failed: FLAIR file not found: 'x'"
    assert module._test_errors == ["Anomaly detection failed:\nFLAIR file not found: 'x'"]
    # the whole output reaches Slicer's log, not only the status line
    assert "Traceback ...\nline 2" in caplog.text and "FLAIR file not found" in caplog.text


def test_cancel_leaves_the_scene_untouched(module):
    logic = FakeLogic(FakeProcess([0.1, 0.2, 0.3, 0.4, 0.5]))
    ui, panel = _panel(module, logic)
    panel.initializeParameterNode()
    panel.onApply()
    panel._poll()
    panel.cancel()
    assert logic.process.cancelled and logic.loaded == 0 and logic.cleaned == 1
    assert panel._run is None and ui.statusLabel.text.startswith("Cancelled")
    assert ui.applyButton.enabled and not ui.cancelButton.enabled


def test_apply_needs_both_volumes(module):
    logic = FakeLogic(FakeProcess([]))
    logic.params.t2Volume = None
    ui, panel = _panel(module, logic)
    panel.initializeParameterNode()
    assert not ui.applyButton.enabled


def test_start_failure_reaches_the_error_display(module):
    logic = FakeLogic(FakeProcess([]))

    def boom(p):
        raise RuntimeError("Model bundle not found: 'x'")

    logic.startDetection = boom
    _, panel = _panel(module, logic)
    panel.initializeParameterNode()
    with pytest.raises(RuntimeError):
        panel.onApply()
    assert panel._run is None and "Model bundle not found" in module._test_errors[0]


# ------------------------------------------------------------------------------- device probe
def test_device_comes_from_the_cli_probe_and_is_refreshed_after_a_run(module):
    logic = FakeLogic(FakeProcess([1.0]))
    logic.deviceLabel = lambda probe: "PyTorch not installed yet (installed on first run)"
    ui = _ui()
    panel = module.AnomalyDiffusionPanel(ui, logic)
    assert ui.deviceLabel.text == "Checking…" and panel._probeTimer.active and logic.probes == 1
    panel._pollProbe()
    panel._pollProbe()
    assert ui.deviceLabel.text.startswith("PyTorch not installed") and not panel._probeTimer.active
    panel.initializeParameterNode()
    logic.deviceLabel = lambda probe: "GPU: Test GPU"
    panel.onApply()
    _run_to_end(panel)
    assert logic.probes == 2  # the run installed PyTorch: asked again
    panel._pollProbe()
    panel._pollProbe()
    assert ui.deviceLabel.text == "GPU: Test GPU"


def test_device_probe_runs_info_json_in_a_child_process(module, monkeypatch):
    started = []
    monkeypatch.setattr(slicer_bridge, "DetectProcess", lambda cmd, env=None, cwd=None: started.append(cmd) or "p")
    monkeypatch.setattr(module.AnomalyDiffusionLogic, "pythonExecutable", staticmethod(lambda: "/s/PythonSlicer"))
    assert module.AnomalyDiffusionLogic().startDeviceProbe() == "p"
    assert started == [["/s/PythonSlicer", "-m", "AnomalyDiffusionLib.cli", "--progress", "none", "info", "--json"]]


# ------------------------------------------------------------------------------ override box
BUNDLE = {"w": 5.0, "early_stop": False, "stride": 30, "dode_threshold": 7.32}


def test_advanced_box_shows_the_bundles_values(module):
    logic = FakeLogic(FakeProcess([]), settings=BUNDLE)
    logic.params = _params(guidance=2.0, stride=10)  # a previous session's values
    _, panel = _panel(module, logic)
    panel.initializeParameterNode()
    p = logic.params
    assert (p.guidance, p.earlyStop, p.stride, p.decisionThreshold) == (5.0, False, 30, 7.32)
    assert json.loads(p.shownSettings) == BUNDLE
    # re-entering the module keeps the user's edits
    p.stride = 12
    panel.initializeParameterNode()
    assert p.stride == 12
    # an unrelated change keeps them; another bundle shows its values
    logic.settings = dict(BUNDLE, stride=20)
    panel._onParameterNodeModified()
    assert p.stride == 12
    p.bundleSource, p.bundlePath = "Local file or folder", "/b2"
    panel._onParameterNodeModified()
    assert p.stride == 20 and json.loads(p.shownSettings)["stride"] == 20


def test_only_changed_settings_are_overridden(module):
    logic = module.AnomalyDiffusionLogic()
    p = _params(guidance=5.0, earlyStop=False, stride=10, decisionThreshold=7.32, shownSettings=json.dumps(BUNDLE))
    assert logic.overrides(p, None) == {"stride": 10}
    p.guidance, p.earlyStop = 3.0, True
    assert logic.overrides(p, None) == {"w": 3.0, "early_stop": True, "stride": 10}
    p = _params(guidance=5.0, earlyStop=False, stride=30, decisionThreshold=7.32, shownSettings=json.dumps(BUNDLE))
    assert logic.overrides(p, None) == {}


def test_without_shown_values_the_run_compares_with_the_bundle_itself(module, tmp_path):
    manifest = {"fpdm": {"settings": {"w": 4.0, "stride": 25, "early_stop": True}, "calibration": {"w": 4.0}},
                "dode": {"decision_threshold": 6.5}}  # fmt: skip
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    logic = module.AnomalyDiffusionLogic()
    p = _params(guidance=4.0, earlyStop=True, stride=25, decisionThreshold=6.5, shownSettings="")
    assert logic.overrides(p, str(bundle)) == {}
    p.guidance = 5.0
    assert logic.overrides(p, str(bundle)) == {"w": 5.0}


def test_local_bundle_path_is_checked_with_a_message(module, tmp_path):
    """An empty field (a fresh parameter node) asks for a bundle instead of trying "."; a missing
    path is named; an existing folder is used as typed."""
    logic = module.AnomalyDiffusionLogic()
    p = _params(bundleSource="Local file or folder")
    assert logic.bundleSettings(p) is None
    with pytest.raises(ValueError, match="Choose the model bundle"):
        logic.bundleLocation(p)
    p.bundlePath = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"not found: '.*nowhere'"):
        logic.bundleLocation(p)
    p.bundlePath = f"  {tmp_path}  "
    assert logic.bundleLocation(p) == str(tmp_path)


def test_embedded_bundle_settings_are_its_manifests(module):
    logic = module.AnomalyDiffusionLogic()
    path = logic.embeddedBundlePath()
    manifest = json.loads((path / "manifest.json").read_text())
    got = logic.bundleSettings(_params())
    assert got["stride"] == manifest["fpdm"]["settings"]["stride"]
    assert got["w"] == manifest["fpdm"]["calibration"]["w"]
    assert got["dode_threshold"] == manifest["dode"]["decision_threshold"]


def test_folder_button_sets_the_bundle_path(module):
    logic = FakeLogic(FakeProcess([]))
    ui, panel = _panel(module, logic)
    panel.initializeParameterNode()
    ui.bundleSourceComboBox.currentText = "Local file or folder"
    panel._updateBundleWidgets()
    assert ui.bundleFolderButton.visible and ui.bundleFileButton.visible and ui.bundlePathLineEdit.visible
    panel.onChooseBundleFolder()
    assert logic.params.bundlePath == "/data/bundles/mine"
    panel.onChooseBundleFile()
    assert logic.params.bundlePath == "/data/bundles/b.zip"
    ui.bundleSourceComboBox.currentText = "Embedded default"
    panel._updateBundleWidgets()
    assert not ui.bundleFileButton.visible and not ui.bundleFolderButton.visible


def test_heatmap_selector_offers_only_module_heatmaps(module):
    ui, _ = _panel(module, FakeLogic(FakeProcess([])))
    assert ui.heatmapSelector.attributes == [("vtkMRMLScalarVolumeNode", module.OUTPUT_ROLE_ATTRIBUTE, "heatmap")]


def test_status_line_shows_the_runs_warnings(module):
    logic = FakeLogic(FakeProcess([1.0]))
    summary = logic.loadResults(None, None)
    logic.loadResults = lambda run, p: dict(summary, warnings=["w 3.0 differs from the calibrated w 5.0"])
    ui, panel = _panel(module, logic)
    panel.initializeParameterNode()
    panel.onApply()
    _run_to_end(panel)
    assert ui.statusLabel.text.endswith("warning: w 3.0 differs from the calibrated w 5.0")


# ------------------------------------------------------------------------------- dependencies
@pytest.fixture()
def torch_installed(monkeypatch):
    torch_logic = mock.MagicMock()
    torch_logic.torchInstalled.return_value = True
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=lambda: torch_logic))
    return torch_logic


def test_slicer_5_10_installs_missing_requirements_with_pip_install(module, monkeypatch, torch_installed):
    """No ``slicer.packaging`` (5.10): the library's own requirement check, then ``pip_install``."""
    assert not module._hasSlicerPackaging()
    answers = [["nilearn==0.14.1", "timm>=1.0,<2"], []]
    seen = []

    def missing(lines, skip=()):
        seen.append((list(lines), list(skip)))
        return answers.pop(0)

    monkeypatch.setattr(slicer_bridge, "missing_requirements", missing)
    logic = module.AnomalyDiffusionLogic()
    steps = []
    logic.logCallback = steps.append
    sys.modules["slicer"].util.pip_install.side_effect = lambda names: steps.append(("pip", names))
    logic.ensureDependencies()
    sys.modules["slicer"].util.pip_install.assert_called_once_with(["nilearn==0.14.1", "timm>=1.0,<2"])
    # the status line names what is being installed before pip blocks
    assert steps[0].startswith("Installing nilearn==0.14.1, timm>=1.0,<2") and steps[1][0] == "pip"
    assert "timm>=1.0,<2" in seen[0][0] and "torch" in seen[0][1] and len(seen) == 2


def test_slicer_5_10_declined_install_is_an_error(module, monkeypatch, torch_installed):
    monkeypatch.setattr(slicer_bridge, "missing_requirements", lambda lines, skip=(): ["nilearn==0.14.1"])
    sys.modules["slicer"].util.confirmOkCancelDisplay = lambda text, **k: False
    with pytest.raises(RuntimeError, match="not installed"):
        module.AnomalyDiffusionLogic().ensureDependencies()
    sys.modules["slicer"].util.pip_install.assert_not_called()


def test_slicer_5_10_failed_install_is_an_error(module, monkeypatch, torch_installed):
    monkeypatch.setattr(slicer_bridge, "missing_requirements", lambda lines, skip=(): ["nilearn==0.14.1"])
    with pytest.raises(RuntimeError, match="nilearn"):
        module.AnomalyDiffusionLogic().ensureDependencies()


def test_slicer_5_12_uses_pip_ensure(module, monkeypatch, torch_installed):
    packaging = types.ModuleType("slicer.packaging")
    packaging.__spec__ = importlib.machinery.ModuleSpec("slicer.packaging", None)
    packaging.load_requirements = lambda path: ["REQS from " + Path(path).name]
    packaging.pip_ensure = mock.MagicMock()
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    sys.modules["slicer"].packaging = packaging
    assert module._hasSlicerPackaging()
    module.AnomalyDiffusionLogic().ensureDependencies()
    args, kwargs = packaging.pip_ensure.call_args
    assert args == (["REQS from requirements.txt"],) and "torch" in kwargs["skip_packages"]
    sys.modules["slicer"].util.pip_install.assert_not_called()


def test_pytorch_is_installed_through_the_pytorch_extension(module, monkeypatch, torch_installed):
    torch_installed.torchInstalled.return_value = False
    torch_installed.installTorch.return_value = None  # declined
    logic = module.AnomalyDiffusionLogic()
    steps = []
    logic.logCallback = steps.append
    with pytest.raises(RuntimeError, match="PyTorch"):
        logic.ensureDependencies()
    assert torch_installed.installTorch.call_args.kwargs["askConfirmation"] is True
    assert steps == ["Installing PyTorch (this may take several minutes)…"]


def test_bundle_download_reports_progress_to_the_status_line(module, monkeypatch, tmp_path):
    """A bundle download goes through SampleData (checksum, cache) with its progress lines routed to
    the panel's status line, without their HTML markup."""
    payload = b"bundle bytes"
    digest = hashlib.sha256(payload).hexdigest()

    class SampleDataLogic:
        def __init__(self, logMessage=None):
            self.logMessage = logMessage

        def downloadFile(self, uri, folder, name, checksum=None):
            self.logMessage("<i>Downloaded 6 B (50% of 12 B)...</i>")
            (Path(folder) / name).write_bytes(payload)
            self.logMessage("Download finished")
            return str(Path(folder) / name)

    monkeypatch.setitem(sys.modules, "SampleData", types.SimpleNamespace(SampleDataLogic=SampleDataLogic))
    sys.modules["slicer"].util.computeChecksum = lambda algo, path: hashlib.sha256(Path(path).read_bytes()).hexdigest()
    logic = module.AnomalyDiffusionLogic()
    ui, panel = _panel(module, FakeLogic(FakeProcess([])))
    logic.logCallback = panel.showStep
    shown = []
    monkeypatch.setattr(ui.statusLabel, "setText", lambda text: shown.append(text))
    p = _params(bundleSource="Download URL", bundleUrl="https://x/b.zip", bundleChecksum=f"SHA256:{digest}")
    path = logic.bundleLocation(p)
    assert Path(path).read_bytes() == payload
    assert shown == ["Downloading the model bundle from https://x/b.zip…", "Downloaded 6 B (50% of 12 B)...",
                     "Download finished"]  # fmt: skip


def test_panel_takes_the_logics_step_messages(module):
    logic = FakeLogic(FakeProcess([]))
    ui, panel = _panel(module, logic)
    assert logic.logCallback == panel.showStep
    panel.showStep("Installing PyTorch")
    assert ui.statusLabel.text == "Installing PyTorch"
    panel.cleanup()
    assert logic.logCallback is None  # a console run after the panel is gone does not touch its widgets


# -------------------------------------------------------------------------------- sample data
def _sample_data(with_categories):
    registered = {"sources": [], "categories": []}

    class SampleDataLogic:
        @staticmethod
        def registerCustomSampleDataSource(**kw):
            registered["sources"].append(kw)

    if with_categories:
        SampleDataLogic.registerCustomSampleDataCategory = staticmethod(
            lambda category, title: registered["categories"].append((category, title))
        )
    return types.SimpleNamespace(SampleDataLogic=SampleDataLogic), registered


@pytest.mark.parametrize("with_categories", [False, True], ids=["5.10", "5.12"])
def test_sample_data_registers_on_both_versions(module, monkeypatch, with_categories):
    sample_data, registered = _sample_data(with_categories)
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    module.registerSampleData()
    (source,) = registered["sources"]
    assert source["category"] == module.SAMPLE_CATEGORY and source["customDownloader"] is module.downloadPhantomSample
    assert registered["categories"] == ([(module.SAMPLE_CATEGORY, "Anomaly Diffusion")] if with_categories else [])


def test_sample_download_ensures_dependencies_and_shows_failures(module, monkeypatch):
    calls = []
    status = []
    sys.modules["slicer"].util.showStatusMessage = lambda text, duration=0: status.append(text)

    def deps(self):
        calls.append("deps")
        self.log("Installing PyTorch")  # its steps reach the main window's status bar

    monkeypatch.setattr(module.AnomalyDiffusionLogic, "ensureDependencies", deps)

    def phantom(self, tick=None):
        calls.append("phantom")
        tick()
        raise RuntimeError("phantom: nilearn missing")

    monkeypatch.setattr(module.AnomalyDiffusionLogic, "loadPhantomCase", phantom)
    assert module.downloadPhantomSample(None) == []
    assert calls == ["deps", "phantom"] and status == ["Installing PyTorch"]
    assert module._test_errors == ["The phantom sample could not be made.\nphantom: nilearn missing"]


# ------------------------------------------------------------------------- results in the scene
def _write_outputs(out, n_slices=4):
    out.mkdir(parents=True, exist_ok=True)
    summary = {"verdict": "anomalous", "outputs": {"segmentation": "seg.nrrd", "heatmap": "heat.nrrd"},
               "most_anomalous_slice": {"slice": 2, "center_ras_mm": [0, 0, 3]}}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary))
    rows = ["slice,dode_score,lesion_area_mm2"] + [f"{i + 10},{i * 0.5},{i * 2}" for i in range(n_slices)]
    (out / "slices.csv").write_text("\n".join(rows) + "\n")


def _run(module, tmp_path, name, outputs=None):
    scene = module._test_scene
    flair = scene.byClass("vtkMRMLScalarVolumeNode")[0] if scene.byClass("vtkMRMLScalarVolumeNode") else None
    if flair is None:
        flair = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Patient FLAIR")
    out = tmp_path / name
    _write_outputs(out)
    request = slicer_bridge.DetectRequest(inputs={"flair": "f", "t2": "t"}, out_dir=str(out))
    return module.AnomalyDiffusionLogic().loadResults(
        {"tempDir": out, "request": request, "flair": flair, "outputs": outputs or {}}
    )


def test_two_runs_keep_two_results(module, tmp_path):
    scene = module._test_scene
    first = _run(module, tmp_path, "run1")
    second = _run(module, tmp_path, "run2")
    for kind in ("segmentation", "heatmap", "table", "chart"):
        assert first["nodes"][kind] != second["nodes"][kind], kind
        assert scene.GetNodeByID(first["nodes"][kind]) is not None, kind
    names = [scene.GetNodeByID(r["nodes"]["heatmap"]).GetName() for r in (first, second)]
    assert names == ["Patient FLAIR anomaly heatmap", "Patient FLAIR anomaly heatmap_1"]
    assert len(scene.byClass("vtkMRMLPlotChartNode")) == 2
    assert len(scene.byClass("vtkMRMLPlotSeriesNode")) == 4  # two series per chart


def test_a_picked_table_is_reused_with_its_chart_not_duplicated(module, tmp_path):
    scene = module._test_scene
    first = _run(module, tmp_path, "run1")
    table = scene.GetNodeByID(first["nodes"]["table"])
    again = _run(module, tmp_path, "run2", outputs={"table": table})
    assert again["nodes"]["table"] == table.GetID() and again["nodes"]["chart"] == first["nodes"]["chart"]
    assert len(scene.byClass("vtkMRMLPlotChartNode")) == 1 and len(scene.byClass("vtkMRMLPlotSeriesNode")) == 2
    assert again["nodes"]["heatmap"] != first["nodes"]["heatmap"]  # not picked: a new one


def test_plot_uses_the_slice_number_as_x(module, tmp_path):
    scene = module._test_scene
    result = _run(module, tmp_path, "run1")
    chart = scene.GetNodeByID(result["nodes"]["chart"])
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert {s.y for s in series} == {"dode_score", "lesion_area_mm2"}
    assert all(s.x == "slice" and s.plotType == "Scatter" for s in series)  # a line plot ignores X
    table = scene.GetNodeByID(result["nodes"]["table"])
    assert table.columns[0].name == "slice" and table.columns[0].values == [10, 11, 12, 13]


def test_outputs_are_saved_with_the_scene(module, tmp_path):
    scene = module._test_scene
    result = _run(module, tmp_path, "run1")
    heat = scene.GetNodeByID(result["nodes"]["heatmap"])
    # the temporary file's storage node is gone: Save writes the volume instead of pointing at it
    assert heat.GetStorageNode() is None
    assert any(n.cls == "vtkMRMLVolumeArchetypeStorageNode" for n in scene.removed)
    for kind in ("segmentation", "heatmap", "table"):
        assert scene.GetNodeByID(result["nodes"][kind]).storableModified > 0, kind
    # the heatmap is transparent below its lower threshold
    heat.display.SetApplyThreshold.assert_called_with(1)
    heat.display.SetLowerThreshold.assert_called_once_with(0.1)


# ------------------------------------------------------------------------------ console API
def test_console_api_through_get_module_logic(module, monkeypatch, tmp_path):
    """``slicer.util.getModuleLogic("AnomalyDiffusion").process(...)``: the widget exposes its logic,
    the run does not change the panel's parameter node, and the outputs land in the scene."""
    scene = module._test_scene
    gui_params = _params(flairVolume=None, t2Volume=None)
    monkeypatch.setattr(module.AnomalyDiffusionLogic, "getParameterNode", lambda self: gui_params)
    monkeypatch.setattr(module.AnomalyDiffusionLogic, "pythonExecutable", staticmethod(lambda: sys.executable))
    module.AnomalyDiffusionLogic.startDeviceProbe = lambda self: FakeProbe([])
    module.AnomalyDiffusionLogic.deviceLabel = lambda self, probe: "CPU only"
    widget = module.AnomalyDiffusionWidget()
    module._test_widgets["AnomalyDiffusion"] = widget
    with pytest.raises(RuntimeError):  # before setup, as in Slicer: no logic yet
        sys.modules["slicer"].util.getModuleLogic("AnomalyDiffusion")
    widget.setup()
    logic = sys.modules["slicer"].util.getModuleLogic("AnomalyDiffusion")
    assert isinstance(logic, module.AnomalyDiffusionLogic) and logic is widget.panel.logic

    commands = []

    def fake_process(command, env=None, cwd=None):
        commands.append(command)
        _write_outputs(Path(command[command.index("--out") + 1]))
        return FakeProcess([0.5, 1.0])

    monkeypatch.setattr(slicer_bridge, "DetectProcess", fake_process)
    flair = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Console FLAIR")
    t2 = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Console T2")
    summary = logic.process(flair, t2, device="cpu", ensureDependencies=False)
    (command,) = commands
    assert command[command.index("--device") + 1] == "cpu"
    assert not {"--w", "--stride", "--early-stop", "--dode-threshold"} & set(command)  # the bundle's values
    assert set(summary["nodes"]) == {"segmentation", "heatmap", "table", "chart"}
    assert all(scene.GetNodeByID(i) is not None for i in summary["nodes"].values())
    assert scene.GetNodeByID(summary["nodes"]["heatmap"]).GetName() == "Console FLAIR anomaly heatmap"
    assert gui_params.flairVolume is None and gui_params.t2Volume is None  # the panel's choice untouched
    # methods and the AnoFPDM decision default to the bundle's: neither flag is passed
    assert "--methods" not in command and "--calibration" not in command
    logic.process(flair, t2, device="cpu", methods=("fpdm",), calibration="bundle", ensureDependencies=False)
    command = commands[-1]
    assert command[command.index("--methods") + 1] == "fpdm"
    assert command[command.index("--calibration") + 1] == "bundle"
    logic.process(flair, t2, device="cpu", calibration="volume", ensureDependencies=False)
    assert commands[-1][commands[-1].index("--calibration") + 1] == "volume"


# ------------------------------------------------------------------------- parent transforms
def _transformed(scene, name, transform):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.GetParentTransformNode = lambda: transform
    node.GetTransformNodeID = lambda: getattr(transform, "id", None)
    return node


@pytest.mark.parametrize("linear", [True, False])
def test_inputs_are_exported_in_the_flairs_frame(module, tmp_path, monkeypatch, linear):
    scene = module._test_scene
    slicer = sys.modules["slicer"]
    sys.modules["vtk"].vtkGeneralTransform = sys.modules["vtk"].vtkTransform = mock.MagicMock
    between = []
    slicer.vtkMRMLTransformNode = types.SimpleNamespace(
        GetTransformBetweenNodes=lambda a, b, out: between.append((a, b)),
        IsGeneralTransformLinear=lambda t, out: linear,
    )
    flair = _transformed(scene, "FLAIR", scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "toWorld"))
    t2 = _transformed(scene, "T2", scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration"))
    written = []
    monkeypatch.setattr(FakeNode, "WriteData", lambda self, node: written.append(node) or True)
    logic = module.AnomalyDiffusionLogic()
    logic._exportInFlairFrame(flair, flair, tmp_path / "flair.nrrd")
    assert written == [flair] and between == []  # the FLAIR as it is
    if not linear:
        with pytest.raises(ValueError, match="harden"):
            logic._exportInFlairFrame(t2, flair, tmp_path / "t2.nrrd")
        return
    logic._exportInFlairFrame(t2, flair, tmp_path / "t2.nrrd")
    export = written[-1]
    assert export is not t2 and between == [(t2.GetParentTransformNode(), flair.GetParentTransformNode())]
    assert [c[0] for c in export.calls if c[0] in ("CopyOrientation", "ApplyTransformMatrix")] == [
        "CopyOrientation",
        "ApplyTransformMatrix",
    ]
    assert export.GetID() not in scene.nodes  # the temporary node is gone


def test_outputs_follow_the_flairs_transform(module, tmp_path):
    scene = module._test_scene
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "toWorld")
    _transformed(scene, "Patient FLAIR", transform)
    result = _run(module, tmp_path, "run1")
    for kind in ("segmentation", "heatmap"):
        calls = scene.GetNodeByID(result["nodes"][kind]).calls
        assert ("SetAndObserveTransformNodeID", (transform.id,)) in calls, kind


def test_console_batch_runs_the_batch_command(module, monkeypatch, tmp_path):
    """``logic.processBatch``: the bridge's ``batch`` command line in a child process; returns the
    aggregate, or raises with the command's one-line error."""
    monkeypatch.setattr(module.AnomalyDiffusionLogic, "pythonExecutable", staticmethod(lambda: "PythonSlicer"))
    commands = []

    def fake_process(command, env=None, cwd=None):
        commands.append(command)
        out = Path(command[command.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"cases": 2, "ok": 1, "failed": 1}))
        return FakeProcess([0.5, 1.0], rc=1)  # exit status 1: one case failed

    monkeypatch.setattr(slicer_bridge, "DetectProcess", fake_process)
    logic = module.AnomalyDiffusionLogic()
    agg = logic.processBatch(tmp_path / "brats", tmp_path / "out", options={"device": "cpu", "stride": 60})
    assert agg == {"cases": 2, "ok": 1, "failed": 1}
    assert commands == [
        ["PythonSlicer", "-m", "AnomalyDiffusionLib.cli", "--progress", "jsonl", "batch", "--input",
         str(tmp_path / "brats"), "--out", str(tmp_path / "out"), "--device", "cpu", "--stride", "60"]
    ]  # fmt: skip

    def failing(command, env=None, cwd=None):
        proc = FakeProcess([], rc=2)
        proc.state.error = "batch input not found: 'x' (a BraTS-layout folder or a CSV)"
        proc.error_message = lambda: proc.state.error
        return proc

    monkeypatch.setattr(slicer_bridge, "DetectProcess", failing)
    with pytest.raises(RuntimeError, match="batch input not found"):
        logic.processBatch(tmp_path / "x", tmp_path / "out2")
