"""AnomalyDiffusion: find and outline anomalies in brain MRI (FLAIR + T2) with diffusion models.

A thin Slicer layer over ``AnomalyDiffusionLib``: the heavy work runs as the library's command line
(``anomaly-diffusion detect``) in a separate process with Slicer's own Python, so the GUI never
freezes; every decision (command line, progress parsing, output → node plan, names, colours, table
types, the slice to jump to) lives in ``AnomalyDiffusionLib.slicer_bridge``, which CI tests without
Slicer.

Console / batch use (``Slicer --no-main-window --python-script``)::

    logic = slicer.util.getModuleLogic("AnomalyDiffusion")
    nodes = logic.process(flairNode, t2Node)                     # nodes in -> nodes out (blocking)
    summary = logic.processFiles("flair.nii.gz", "t2.nii.gz", "outdir")   # files in -> files out
    table = logic.processBatch("/data/BraTS2021", "outdir")          # many cases (anomaly-diffusion batch)
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent


def _libraryRoot() -> Path:
    """The folder that holds the ``AnomalyDiffusionLib`` package: beside this module once the
    extension is built (installed with it), or the repository root in a source checkout."""
    for cand in (MODULE_DIR, MODULE_DIR.parent):
        if (cand / "AnomalyDiffusionLib" / "__init__.py").is_file():
            return cand
    raise RuntimeError(f"AnomalyDiffusionLib was not found beside {MODULE_DIR}")


def _bridge():
    """``AnomalyDiffusionLib.slicer_bridge`` (pure Python: importable before torch is installed)."""
    root = str(_libraryRoot())
    if root not in sys.path:
        sys.path.insert(0, root)
    from AnomalyDiffusionLib import slicer_bridge

    return slicer_bridge


# -------------------------------------------------------------------------------------- module
class AnomalyDiffusion(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Anomaly Diffusion")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["AnomalyDiffusion developers"]
        self.parent.helpText = _(
            "Detects and outlines anomalies (tumours, lesions) in brain MRI from FLAIR and T2 volumes with two "
            "diffusion-model methods:<ul>"
            "<li><b>AnoFPDM</b> segments lesions from the forward process of a classifier-free-guided DDPM "
            "(Che et al., <i>Unsupervised anomaly detection in medical images with forward process diffusion "
            "models</i>).</li>"
            "<li><b>AnoDODE</b> scores every axial slice by the likelihood (bits/dim) of multi-scale "
            "EfficientNet features under a diffusion ODE (Hu &amp; Jin, <i>AnoDODE: anomaly detection with "
            "diffusion ODE</i>).</li></ul>"
            "Click <b>Detect anomalies</b> to get a segmentation, a heatmap overlay, a per-slice score table and "
            "plot, and a jump to the most anomalous slice. The embedded model was trained on synthetic phantoms "
            "and is <b>not for clinical use</b>."
        )
        self.parent.acknowledgementText = _(
            "Built on PyTorch, timm, SimpleITK and 3D Slicer. Anatomy of the synthetic phantom: MNI ICBM152 2009a "
            "(McConnell Brain Imaging Centre)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)
        slicer.app.connect("startupCompleted()", loadTerminology)


def loadTerminology() -> None:
    """Make the segment's terminology context (``Resources/AnomalyDiffusion.term.json``) known."""
    path = MODULE_DIR / "Resources" / "AnomalyDiffusion.term.json"
    try:
        slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(path))
    except Exception as exc:  # the Terminologies module is optional for the core function
        logging.warning("AnomalyDiffusion: could not load %s (%s)", path, exc)


#: the Sample Data category; Slicer 5.12 shows a registered (translatable) title for it, 5.10 shows
#: the category name itself, so the name is readable too
SAMPLE_CATEGORY = "Anomaly Diffusion"


def registerSampleData() -> None:
    """Register the synthetic phantom case (FLAIR, T2 and its lesion mask) as Sample Data. It is made
    locally by the library (no download), so it works offline."""
    import SampleData

    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):  # Slicer >= 5.12
        SampleData.SampleDataLogic.registerCustomSampleDataCategory(SAMPLE_CATEGORY, title=_("Anomaly Diffusion"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=SAMPLE_CATEGORY,
        sampleName="AnomalyDiffusionPhantom",
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "AnomalyDiffusionPhantom.png"),
        customDownloader=downloadPhantomSample,
    )


def downloadPhantomSample(source=None):
    """Sample Data button: make the phantom case (installing the dependencies first, after asking),
    with a progress dialog; a failure is shown to the user, not only in the Python console."""
    try:
        with slicer.util.tryWithErrorDisplay(_("The phantom sample could not be made."), waitCursor=True):
            logic = AnomalyDiffusionLogic()
            # installing the packages on first use takes minutes: each step on the main window's status bar
            logic.logCallback = lambda text: (
                slicer.util.showStatusMessage(text),
                slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents),
            )
            logic.ensureDependencies()
            dialog = slicer.util.createProgressDialog(
                labelText=_("Making a synthetic phantom case…"), windowTitle=_("Anomaly Diffusion"), maximum=0
            )
            try:
                return logic.loadPhantomCase(tick=slicer.app.processEvents)
            finally:
                dialog.close()
    except Exception:  # already shown to the user; the log keeps the traceback
        logging.error("AnomalyDiffusion: the phantom sample could not be made", exc_info=True)
        return []


# ------------------------------------------------------------------------------ parameter node
#: Decision combo box text -> ``detect --calibration`` (None: the bundle's default)
CALIBRATIONS = {
    "Bundle default": None,
    "This case's own level (volume)": "volume",
    "Fixed thresholds of the papers (bundle)": "bundle",
}


@parameterNodeWrapper
class AnomalyDiffusionParameterNode:
    flairVolume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    t1Volume: vtkMRMLScalarVolumeNode
    t1ceVolume: vtkMRMLScalarVolumeNode
    bundleSource: Annotated[str, Choice(["Embedded default", "Local file or folder", "Download URL"])] = (
        "Embedded default"
    )
    # a str, not a Path: the Path connector writes an empty Path as "." into the field (v5.10.0 and
    # v5.12.3 guiConnectors.ctkPathLineEditToPathConnector); QLineEditToStrConnector shows "" as empty
    bundlePath: str = ""
    bundleUrl: str = ""
    bundleChecksum: str = ""  # "SHA256:<hex>"
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    methods: Annotated[
        str, Choice(["Bundle default", "Segmentation and slice scoring", "Segmentation", "Slice scoring"])
    ] = "Bundle default"
    # AnoFPDM's decision: the bundle's default, the case's own anomaly-map level, or the papers' fixed
    # dataset-level thresholds (``detect --calibration``)
    calibration: Annotated[
        str,
        Choice(["Bundle default", "This case's own level (volume)", "Fixed thresholds of the papers (bundle)"]),
    ] = "Bundle default"
    # advanced settings: they show the bundle's calibrated values (the panel sets them when the bundle
    # changes); a run overrides only those that differ from ``shownSettings`` (JSON of what was shown)
    guidance: Annotated[float, WithinRange(0.0, 40.0)] = 5.0
    earlyStop: bool = False
    stride: Annotated[int, WithinRange(1, 100)] = 30
    decisionThreshold: Annotated[float, WithinRange(0.0, 100.0)] = 0.0
    shownSettings: str = ""  # not bound to a widget
    dodeScales: str = ""
    faithful: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    outputHeatmap: vtkMRMLScalarVolumeNode
    outputTable: vtkMRMLTableNode


#: parameter node field -> bundle setting (``slicer_bridge.OVERRIDE_FIELDS``)
SETTING_FIELDS = {"guidance": "w", "earlyStop": "early_stop", "stride": "stride", "decisionThreshold": "dode_threshold"}

#: fields of the parameter node that no widget binds
UNBOUND_FIELDS = ("shownSettings",)

METHODS = {
    "Bundle default": None,
    "Segmentation and slice scoring": ("fpdm", "dode"),
    "Segmentation": ("fpdm",),
    "Slice scoring": ("dode",),
}


# -------------------------------------------------------------------------------------- widget
class AnomalyDiffusionWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Slicer's module widget: loads the .ui and hands it to :class:`AnomalyDiffusionPanel`."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None  # slicer.util.getModuleLogic("AnomalyDiffusion") reads the widget's .logic
        self.panel = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnomalyDiffusion.ui"))
        self.layout.addWidget(uiWidget)
        ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AnomalyDiffusionLogic()
        self.panel = AnomalyDiffusionPanel(ui, self.logic)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.panel.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.panel:
            self.panel.cleanup()

    def enter(self) -> None:
        self.panel.initializeParameterNode()

    def exit(self) -> None:
        self.panel.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.panel.cancel()
        self.panel.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.panel.initializeParameterNode()


class AnomalyDiffusionPanel(VTKObservationMixin):
    """The panel's behaviour. It receives the ``ui`` (child widget variables) and a ``logic`` object,
    so tests can drive it with another logic (anything with ``getParameterNode``, ``guessInputs``,
    ``startDeviceProbe``, ``deviceLabel``, ``bundleSettings``, ``startDetection``, ``loadResults`` and
    ``cleanupRun``)."""

    POLL_MS = 200

    def __init__(self, ui, logic) -> None:
        VTKObservationMixin.__init__(self)
        self.ui = ui
        self.logic = logic
        logic.logCallback = self.showStep
        self._parameterNode = None
        self._guiTag = None
        self._run = None  # (process, run info) while a detection runs
        self._probe = None  # the device probe process while it runs
        self._shownBundleKey = None  # the bundle whose settings the advanced box shows
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._poll)
        self._probeTimer = qt.QTimer()
        self._probeTimer.setInterval(self.POLL_MS)
        self._probeTimer.connect("timeout()", self._pollProbe)
        ui.applyButton.connect("clicked(bool)", self.onApply)
        ui.cancelButton.connect("clicked(bool)", self.cancel)
        ui.bundleSourceComboBox.connect("currentIndexChanged(int)", self._updateBundleWidgets)
        ui.bundleFolderButton.connect("clicked(bool)", self.onChooseBundleFolder)
        ui.bundleFileButton.connect("clicked(bool)", self.onChooseBundleFile)
        # only heatmaps this module made (or new ones) are offered: an input volume cannot be overwritten
        ui.heatmapSelector.addAttribute("vtkMRMLScalarVolumeNode", OUTPUT_ROLE_ATTRIBUTE, "heatmap")
        ui.progressBar.setVisible(False)
        ui.cancelButton.setEnabled(False)
        ui.statusLabel.setText(_("Select FLAIR and T2 volumes, then click Detect anomalies."))
        self.probeDevice()

    def showStep(self, text: str) -> None:
        """A step of blocking work (installing, downloading) on the status line, drawn at once; user
        input waits, so nothing can start a second run meanwhile (as SampleData's own log does)."""
        self.ui.statusLabel.setText(text)
        slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents)

    # ---- device
    def probeDevice(self) -> None:
        """Ask the CLI (``info --json``, a child process) which device ``auto`` would use."""
        self.ui.deviceLabel.setText(_("Checking…"))
        try:
            self._probe = self.logic.startDeviceProbe()
        except Exception as exc:
            logging.warning("AnomalyDiffusion: device probe could not start (%s)", exc)
            self._probe = None
            self.ui.deviceLabel.setText(_("Device unknown ({error})").format(error=exc))
            return
        self._probeTimer.start()

    def _pollProbe(self) -> None:
        if self._probe is None:
            self._probeTimer.stop()
            return
        self._probe.poll()
        if not self._probe.done:
            return
        self._probeTimer.stop()
        self.ui.deviceLabel.setText(self.logic.deviceLabel(self._probe))
        self._probe = None

    # ---- parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.flairVolume or not p.t2Volume:
            flair, t2 = self.logic.guessInputs()
            p.flairVolume = p.flairVolume or flair
            p.t2Volume = p.t2Volume or t2
        self._shownBundleKey = self._bundleKey()
        if not p.shownSettings:
            self.showBundleSettings()

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._guiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._checkCanApply()
            self._updateBundleWidgets()

    def cleanup(self) -> None:
        self.cancel()
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        self._probeTimer.stop()
        if getattr(self.logic, "logCallback", None) == self.showStep:
            self.logic.logCallback = None  # the logic may outlive this panel (console use)
        self.removeObservers()

    def _bundleKey(self):
        p = self._parameterNode
        return (p.bundleSource, p.bundlePath, p.bundleUrl, p.bundleChecksum) if p else None

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._checkCanApply()
        if self._parameterNode and self._bundleKey() != self._shownBundleKey:
            self.onBundleChanged()  # after the parameter node has the new choice (not on the widget signal)

    def onBundleChanged(self, *args) -> None:
        """Another bundle was chosen: show its calibrated settings."""
        self._updateBundleWidgets()
        if self._parameterNode:
            self._shownBundleKey = self._bundleKey()
            self.showBundleSettings()

    def onChooseBundleFolder(self, *args) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Model bundle folder"))
        if folder and self._parameterNode:
            self._parameterNode.bundlePath = str(folder)

    def onChooseBundleFile(self, *args) -> None:
        path = qt.QFileDialog.getOpenFileName(None, _("Model bundle file"), "", _("Bundle (*.zip)"))
        if path and self._parameterNode:
            self._parameterNode.bundlePath = str(path)

    def showBundleSettings(self) -> None:
        """Put the selected bundle's calibrated values in the advanced box and remember them: a run
        overrides only what the user then changes. Unknown (a bundle not downloaded yet): nothing shown,
        the run compares with the bundle's own values."""
        p = self._parameterNode
        try:
            settings = self.logic.bundleSettings(p)
        except Exception as exc:
            logging.info("AnomalyDiffusion: bundle settings not readable (%s)", exc)
            settings = None
        if not settings:
            p.shownSettings = ""
            return
        for field, key in SETTING_FIELDS.items():
            if key in settings:
                setattr(p, field, settings[key])
        p.shownSettings = json.dumps(settings)

    def _updateBundleWidgets(self, *args) -> None:
        source = self.ui.bundleSourceComboBox.currentText
        self.ui.bundlePathLineEdit.setVisible(source == "Local file or folder")
        self.ui.bundleFolderButton.setVisible(source == "Local file or folder")
        self.ui.bundleFileButton.setVisible(source == "Local file or folder")
        self.ui.bundleUrlLineEdit.setVisible(source == "Download URL")
        self.ui.bundleChecksumLineEdit.setVisible(source == "Download URL")

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._run is not None
        ok = bool(p and p.flairVolume and p.t2Volume) and not running
        self.ui.applyButton.setEnabled(ok)
        self.ui.applyButton.toolTip = (
            _("Run the detection") if ok else _("Select FLAIR and T2 volumes") if not running else _("Running")
        )

    # ---- run
    def onApply(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Anomaly detection could not start."), waitCursor=True):
            process, run = self.logic.startDetection(self._parameterNode)
            self._run = (process, run)
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.setVisible(True)
            self.ui.cancelButton.setEnabled(True)
            self.ui.statusLabel.setText(_("Starting…"))
            self._checkCanApply()
            self._timer.start()

    def _poll(self) -> None:
        if self._run is None:
            self._timer.stop()
            return
        process, run = self._run
        state = process.poll()
        self.ui.progressBar.setValue(round(100 * state.fraction))
        self.ui.statusLabel.setText(state.status)
        if not process.done:
            return
        self._timer.stop()
        self._run = None
        try:
            if process.succeeded:
                with slicer.util.tryWithErrorDisplay(_("Results could not be loaded."), waitCursor=True):
                    summary = self.logic.loadResults(run, self._parameterNode)
                    self.ui.statusLabel.setText(_bridge().status_after(summary))
                    for warning in summary.get("warnings") or []:
                        logging.warning("AnomalyDiffusion: %s", warning)
            elif process.cancelled:
                self.ui.statusLabel.setText(_("Cancelled; the scene was not changed."))
            else:
                message = process.error_message()
                output = process.output_text() if hasattr(process, "output_text") else ""
                logging.error("AnomalyDiffusion: detection failed: %s\n%s", message, output)
                self.ui.statusLabel.setText(_("Failed: {message}").format(message=message))
                slicer.util.errorDisplay(
                    _("Anomaly detection failed:\n{message}").format(message=message), detailedText=output
                )
        finally:
            self.logic.cleanupRun(run)
            self.ui.progressBar.setVisible(False)
            self.ui.cancelButton.setEnabled(False)
            self._checkCanApply()
            if not self.ui.deviceLabel.text.startswith(("GPU", "CPU", "Apple")):
                self.probeDevice()  # e.g. PyTorch was installed by this run

    def cancel(self, *args) -> None:
        """Stop a running detection (the whole process tree); the scene is left untouched."""
        if self._run is None:
            return
        process, _ = self._run
        process.cancel()
        self._poll()


# --------------------------------------------------------------------------------------- logic
#: node attribute naming what a node is for this module ("heatmap", "segmentation", "table", "chart")
OUTPUT_ROLE_ATTRIBUTE = "AnomalyDiffusion.Role"
#: chart attribute: the ID of the table its series plot (one chart per table, reused by later runs)
CHART_TABLE_ATTRIBUTE = "AnomalyDiffusion.TableID"
#: Python packages Slicer or the PyTorch extension provide; never installed from requirements.txt
SKIP_PACKAGES = ["torch", "torchvision", "SimpleITK", "numpy"]


def _hasSlicerPackaging() -> bool:
    """``slicer.packaging`` (``load_requirements``, ``pip_ensure``) ships from Slicer 5.12 on."""
    try:
        return importlib.util.find_spec("slicer.packaging") is not None
    except (ImportError, ValueError):
        return False


class AnomalyDiffusionLogic(ScriptedLoadableModuleLogic):
    """Runs ``anomaly-diffusion detect`` in a separate process and loads its outputs into the scene."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.keepTemporaryFiles = False
        #: ``logCallback(text)`` receives the steps of long blocking work (installing packages,
        #: downloading a bundle) as they happen; the panel shows them on its status line
        self.logCallback = None

    def log(self, text: str) -> None:
        """A step of long work: to Slicer's log and, if set, to ``logCallback`` (the status line)."""
        logging.info("AnomalyDiffusion: %s", text)
        if self.logCallback:
            self.logCallback(text)

    def _downloadMessage(self, message: str, logLevel: int = logging.DEBUG) -> None:
        """``SampleDataLogic``'s ``logMessage``: its progress lines, without their HTML markup."""
        text = re.sub(r"<[^>]+>", "", str(message)).strip()
        if text:
            self.log(text)

    def getParameterNode(self):
        return AnomalyDiffusionParameterNode(super().getParameterNode())

    # ---- environment
    @staticmethod
    def pythonExecutable() -> str:
        exe = shutil.which("PythonSlicer")
        if not exe:
            raise RuntimeError(_("Slicer's Python (PythonSlicer) was not found"))
        return exe

    def startDeviceProbe(self):
        """``anomaly-diffusion info --json`` in a child process (poll it; see :meth:`deviceLabel`):
        Slicer's own process never imports torch nor holds a GPU context for it."""
        bridge = _bridge()
        return bridge.DetectProcess(
            bridge.device_probe_command(self.pythonExecutable()),
            env=slicer.util.startupEnvironment(),
            cwd=str(_libraryRoot()),
        )

    def deviceLabel(self, probe) -> str:
        bridge = _bridge()
        info = bridge.parse_info_output(probe.state.log) if probe.succeeded else None
        if info is None:
            logging.info("AnomalyDiffusion: device probe output:\n%s", probe.output_text())
        return bridge.device_label(info, probe.output_text())

    def detectedDevice(self, timeout_s: float = 120.0) -> str:
        """Blocking form of the device probe (console use)."""
        probe = self.startDeviceProbe()
        try:
            probe.wait(timeout_s=timeout_s)
        except TimeoutError:
            return _("Device unknown (the probe timed out)")
        return self.deviceLabel(probe)

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """On first use (never at import): PyTorch through the PyTorch extension (it picks the CUDA
        build that fits this computer), the rest from ``Resources/requirements.txt``; asks first.
        Slicer 5.12+ installs them with ``slicer.packaging.pip_ensure``; 5.10, which lacks it, with
        ``slicer.util.pip_install`` after the library's own requirement check."""
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(
                _("The PyTorch extension is required: install 'PyTorch' from the Extensions Manager")
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            self.log(_("Installing PyTorch (this may take several minutes)…"))
            if torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=">=2.4") is None:
                raise RuntimeError(_("PyTorch is needed to detect anomalies; installation was declined"))
        requirementsPath = MODULE_DIR / "Resources" / "requirements.txt"
        if _hasSlicerPackaging():  # Slicer >= 5.12
            importlib.import_module("slicer.packaging")  # (a local "import slicer.x" would shadow slicer)
            requirements = slicer.packaging.load_requirements(str(requirementsPath))
            slicer.packaging.pip_ensure(
                requirements, skip_packages=SKIP_PACKAGES, prompt_install=askConfirmation, requester="AnomalyDiffusion"
            )
            return
        missing = _bridge().missing_requirements(requirementsPath.read_text().splitlines(), skip=SKIP_PACKAGES)
        if not missing:
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("Anomaly Diffusion needs these Python packages, which will be downloaded and installed now:")
            + "\n\n"
            + "\n".join(missing),
            windowTitle=_("Install Python packages"),
        ):
            raise RuntimeError(_("The required Python packages were not installed"))
        # Slicer 5.10's pip_install prints pip's output to the Python console and keeps the GUI
        # refreshing (slicer.util.logProcessOutput); the status line says what is happening
        self.log(
            _("Installing {names} (this may take several minutes; pip's output is in the Python console)…").format(
                names=", ".join(missing)
            )
        )
        with slicer.util.WaitCursor():
            slicer.util.pip_install(missing)
        still = _bridge().missing_requirements(requirementsPath.read_text().splitlines(), skip=SKIP_PACKAGES)
        if still:
            raise RuntimeError(_("Installing Python packages failed: {names}").format(names=", ".join(still)))

    def guessInputs(self):
        """FLAIR and T2 volumes by name (``flair``/``t2f``, ``t2``/``t2w``), if the user has not chosen."""
        flair = t2 = None
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            name = node.GetName().lower()
            if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute(OUTPUT_ROLE_ATTRIBUTE):
                continue
            if flair is None and ("flair" in name or "t2f" in name):
                flair = node
            elif t2 is None and ("t2" in name and "flair" not in name and "t2f" not in name):
                t2 = node
        return flair, t2

    @staticmethod
    def embeddedBundlePath() -> Path | None:
        """The embedded default bundle's folder (as ``AnomalyDiffusionLib.bundle.default_bundle_path``
        finds it), without importing the library's torch-dependent modules."""
        env = os.environ.get("ANOMALY_DIFFUSION_BUNDLE")
        if env:
            return Path(env)
        lib = _libraryRoot() / "AnomalyDiffusionLib"
        for base in (lib.parent / "Resources" / "Bundles", lib / "Resources" / "Bundles"):
            if (base / "phantom-small").exists():
                return base / "phantom-small"
        return None

    def _bundleCachePath(self, p) -> Path:
        digest = p.bundleChecksum.split(":", 1)[1].strip().lower()
        return Path(slicer.app.cachePath) / "AnomalyDiffusion" / "bundles" / (digest[:16] + ".zip")

    def bundleSettings(self, p) -> dict | None:
        """The selected bundle's calibrated settings (``slicer_bridge.bundle_settings``), or None when
        the bundle is not on this computer yet."""
        if p.bundleSource == "Local file or folder":
            text = p.bundlePath.strip()
            path = Path(text) if text and Path(text).exists() else None
        elif p.bundleSource == "Download URL":
            path = None
            if p.bundleChecksum.upper().startswith("SHA256:"):
                cached = self._bundleCachePath(p)
                path = cached if cached.is_file() else None
        else:
            path = self.embeddedBundlePath()
        if path is None:
            return None
        bridge = _bridge()
        return bridge.bundle_settings(bridge.read_manifest(path))

    def bundleLocation(self, p) -> str | None:
        """None (embedded default bundle), a local path, or a downloaded and SHA256-checked file in
        Slicer's cache (reused offline once present)."""
        if p.bundleSource == "Local file or folder":
            path = p.bundlePath.strip()
            if not path:
                raise ValueError(_("Choose the model bundle: a folder or a .zip file"))
            if not os.path.exists(path):
                raise ValueError(_("Model bundle not found: '{path}'").format(path=path))
            return path
        if p.bundleSource == "Download URL":
            if not p.bundleUrl:
                raise ValueError(_("Enter the model bundle's download URL"))
            if not p.bundleChecksum.upper().startswith("SHA256:"):
                raise ValueError(_("Enter the bundle's checksum as SHA256:<hex digest>"))
            target = self._bundleCachePath(p)
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = p.bundleChecksum.split(":", 1)[1].strip().lower()
            import SampleData

            # reuses a cached file whose checksum matches (works offline once downloaded); its
            # progress lines ("Downloaded 12 MB (40% of 30 MB)...") reach the status line
            self.log(_("Downloading the model bundle from {url}…").format(url=p.bundleUrl))
            path = SampleData.SampleDataLogic(logMessage=self._downloadMessage).downloadFile(
                p.bundleUrl, str(target.parent), target.name, checksum=f"SHA256:{digest}"
            )
            if not os.path.isfile(path) or slicer.util.computeChecksum("SHA256", path) != digest:
                raise RuntimeError(_("Download of the model bundle failed or its checksum did not match"))
            return path
        return None

    def overrides(self, p, bundle: str | None) -> dict:
        """The advanced settings to pass to the CLI: only those the user changed from the values the
        panel showed (``p.shownSettings``); when none were shown, compared with the bundle's own."""
        bridge = _bridge()
        if p.shownSettings:
            shown = json.loads(p.shownSettings)
        else:
            location = bundle or self.embeddedBundlePath()
            shown = bridge.bundle_settings(bridge.read_manifest(location)) if location else {}
        values = {key: getattr(p, field) for field, key in SETTING_FIELDS.items()}
        if "dode_threshold" not in shown and not values["dode_threshold"]:
            values["dode_threshold"] = None  # 0: the bundle's calibrated threshold
        return bridge.changed_settings(shown, values)

    # ---- one run
    def startDetection(self, p, ensureDependencies: bool = True):
        """Export the inputs, start the CLI, return ``(DetectProcess, run)``; poll the process.
        ``p``: the parameter node, or any object with its fields (console use)."""
        if not p.flairVolume or not p.t2Volume:
            raise ValueError(_("Select FLAIR and T2 volumes"))
        if ensureDependencies:
            self.ensureDependencies()
        bridge = _bridge()
        tempDir = Path(slicer.util.tempDirectory("__AnomalyDiffusion__"))
        inputs = {}
        for name, node in (("flair", p.flairVolume), ("t2", p.t2Volume), ("t1", p.t1Volume), ("t1ce", p.t1ceVolume)):
            if node is None:
                continue
            path = tempDir / f"{name}.nrrd"
            self._exportInFlairFrame(node, p.flairVolume, path)
            inputs[name] = str(path)
        bundle = self.bundleLocation(p)
        changed = self.overrides(p, bundle)
        scales = [int(s) for s in p.dodeScales.replace(" ", "").split(",") if s]
        request = bridge.DetectRequest(
            inputs=inputs,
            out_dir=str(tempDir / "out"),
            bundle=bundle,
            device=p.device,
            methods=METHODS[p.methods],
            w=changed.get("w"),
            early_stop=changed.get("early_stop"),
            stride=changed.get("stride"),
            dode_threshold=changed.get("dode_threshold"),
            dode_scales=scales or None,
            faithful=p.faithful,
            options={"calibration": CALIBRATIONS[p.calibration]} if CALIBRATIONS.get(p.calibration) else {},
        )
        command = bridge.detect_command(request, python=self.pythonExecutable())
        logging.info("AnomalyDiffusion: %s", " ".join(command))
        env = slicer.util.startupEnvironment()
        process = bridge.DetectProcess(command, env=env, cwd=str(_libraryRoot()))
        outputs = {
            "segmentation": p.outputSegmentation,
            "heatmap": p.outputHeatmap,
            "table": p.outputTable,
        }  # the user's picks at the start of the run; None: a new node
        return process, {"tempDir": tempDir, "request": request, "flair": p.flairVolume, "outputs": outputs}

    @staticmethod
    def _exportInFlairFrame(node, flair, path) -> None:
        """Write ``node`` as NRRD in the FLAIR's own coordinate frame: a (linear) transform between
        its parent transform and the FLAIR's, e.g. a T2 registered to the FLAIR, is applied to the
        written geometry; the outputs are placed under the FLAIR's parent transform."""
        export = node
        if node is not flair and (node.GetParentTransformNode() or flair.GetParentTransformNode()):
            toFlair = vtk.vtkGeneralTransform()
            slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
                node.GetParentTransformNode(), flair.GetParentTransformNode(), toFlair
            )
            linear = vtk.vtkTransform()
            if not slicer.vtkMRMLTransformNode.IsGeneralTransformLinear(toFlair, linear):
                raise ValueError(
                    _("{name} is under a non-linear transform relative to the FLAIR: harden it first").format(
                        name=node.GetName()
                    )
                )
            export = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "__AnomalyDiffusionExport__")
            export.SetAndObserveImageData(node.GetImageData())  # shared, not copied
            export.CopyOrientation(node)
            export.ApplyTransformMatrix(linear.GetMatrix())
        storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(str(path))
            storage.UseCompressionOff()
            if not storage.WriteData(export):
                raise RuntimeError(_("Could not export {name}").format(name=node.GetName()))
        finally:
            slicer.mrmlScene.RemoveNode(storage)
            if export is not node:
                slicer.mrmlScene.RemoveNode(export)

    def cleanupRun(self, run) -> None:
        if not self.keepTemporaryFiles:
            shutil.rmtree(run["tempDir"], ignore_errors=True)

    def loadResults(self, run, p=None) -> dict:
        """Turn the CLI's output folder into nodes (see ``slicer_bridge.output_plan``) and show them.
        Each run makes new, uniquely named nodes, except where the user picked an output node when
        the run started; the parameter node's selections are left as the user set them."""
        bridge = _bridge()
        flair = run["flair"]
        picked = run.get("outputs") or {}
        plan = bridge.output_plan(run["request"].out_dir, flair.GetName())
        summary = {}
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parentItem = shNode.GetItemParent(shNode.GetItemByDataNode(flair))
        created = {}
        for item in plan:
            if item.kind == "summary":
                summary = json.loads(item.path.read_text())
            elif item.kind == "segmentation":
                created["segmentation"] = self._loadSegmentation(item, flair, picked.get("segmentation"))
            elif item.kind == "heatmap":
                created["heatmap"] = self._loadHeatmap(item, flair, picked.get("heatmap"))
            elif item.kind == "table":
                created["table"], created["chart"] = self._loadTable(item, picked.get("table"))
        for role, node in created.items():
            if node is None:
                continue
            node.SetAttribute(OUTPUT_ROLE_ATTRIBUTE, role)
            shNode.SetItemParent(shNode.GetItemByDataNode(node), parentItem)
            if role in ("segmentation", "heatmap"):  # on the FLAIR's grid: under the FLAIR's transform
                node.SetAndObserveTransformNodeID(flair.GetTransformNodeID())
            if node.IsA("vtkMRMLStorableNode"):
                node.StorableModified()  # saved with the scene like any node the user made
        target = bridge.jump_target(summary)
        if target is not None:
            slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *target, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        summary["nodes"] = {k: v.GetID() for k, v in created.items() if v is not None}
        return summary

    @staticmethod
    def _newName(name: str) -> str:
        return slicer.mrmlScene.GenerateUniqueName(name)

    def _loadSegmentation(self, item, flair, segmentationNode=None):
        bridge = _bridge()
        labelmap = slicer.util.loadLabelVolume(str(item.path), {"name": item.node_name + " labelmap", "show": False})
        try:
            if segmentationNode is None:
                segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", self._newName(item.node_name)
                )
            segmentationNode.GetSegmentation().RemoveAllSegments()
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(flair)
            segmentId = segmentationNode.GetSegmentation().AddEmptySegment(
                bridge.SEGMENT_NAME, bridge.SEGMENT_NAME, bridge.SEGMENT_COLOR
            )
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(
                labelmap, segmentationNode, ids
            ):
                raise RuntimeError(_("The segmentation could not be imported"))
            segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
            segment.SetTag(segment.GetTerminologyEntryTagName(), bridge.SEGMENT_TERMINOLOGY)
            segmentationNode.CreateDefaultDisplayNodes()
        finally:
            slicer.mrmlScene.RemoveNode(labelmap)
        return segmentationNode

    def _loadHeatmap(self, item, flair, heatmapNode=None):
        bridge = _bridge()
        node = slicer.util.loadVolume(str(item.path), {"name": self._newName(item.node_name), "show": False})
        # the file lies in the run's temporary folder, deleted after loading: drop the reference so
        # Save writes the volume (the save dialog gives it a default storage node)
        storage = node.GetStorageNode()
        if storage is not None:
            slicer.mrmlScene.RemoveNode(storage)
        if heatmapNode is not None:  # reuse the chosen output node
            heatmapNode.SetAndObserveImageData(node.GetImageData())
            heatmapNode.CopyOrientation(node)
            slicer.mrmlScene.RemoveNode(node)
            node = heatmapNode
            node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(bridge.HEATMAP_COLOR_NODE)
        lo, hi = node.GetImageData().GetScalarRange()
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(lo + bridge.HEATMAP_LOWER_FRACTION * (hi - lo), hi)
        # below the lower threshold the overlay is transparent: the FLAIR is not dimmed everywhere
        display.SetLowerThreshold(lo + bridge.HEATMAP_LOWER_FRACTION * (hi - lo))
        display.SetUpperThreshold(hi)
        display.SetApplyThreshold(1)
        slicer.util.setSliceViewerLayers(background=flair, foreground=node, foregroundOpacity=bridge.HEATMAP_OPACITY)
        return node

    def _loadTable(self, item, tableNode=None):
        bridge = _bridge()
        cols, values, types = bridge.read_table(item.path)
        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", self._newName(item.node_name))
        tableNode.RemoveAllColumns()
        arrays = {
            "int": vtk.vtkIntArray,
            "double": vtk.vtkDoubleArray,
            "bool": vtk.vtkIntArray,
            "string": vtk.vtkStringArray,
        }
        for c in cols:
            arr = arrays[types[c]]()
            arr.SetName(c)
            for v in values[c]:
                if types[c] == "string":
                    arr.InsertNextValue(str(v))
                else:
                    arr.InsertNextValue(int(v) if types[c] in ("int", "bool") else float(v))
            tableNode.AddColumn(arr)
        chart = self._chartForTable(tableNode, tableNode.GetName() + " plot")
        chart.SetTitle(_("Per-slice anomaly scores"))
        chart.SetXAxisTitle(_("axial slice (inferior → superior)"))
        existing = {}
        for i in range(chart.GetNumberOfPlotSeriesNodes()):
            series = chart.GetNthPlotSeriesNode(i)
            existing[series.GetYColumnName()] = series
        for column, label, color in bridge.plot_series(cols):
            series = existing.get(column)
            if series is None:
                series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", label)
                chart.AddAndObservePlotSeriesNodeID(series.GetID())
            series.SetAndObserveTableNodeID(tableNode.GetID())
            series.SetXColumnName(bridge.PLOT_X_COLUMN)
            series.SetYColumnName(column)
            # a scatter series places its points at the X column's values (a line series would space
            # them equally, by row); drawn as a line without markers
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            series.SetColor(*color)
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        return tableNode, chart

    def _chartForTable(self, tableNode, name):
        """The chart a previous run made for this table, else a new one."""
        for chart in slicer.util.getNodesByClass("vtkMRMLPlotChartNode"):
            if chart.GetAttribute(CHART_TABLE_ATTRIBUTE) == tableNode.GetID():
                return chart
        chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", self._newName(name))
        chart.SetAttribute(CHART_TABLE_ATTRIBUTE, tableNode.GetID())
        return chart

    # ---- console / batch API
    def process(
        self,
        flair,
        t2,
        t1=None,
        t1ce=None,
        bundle=None,
        device="auto",
        methods=None,
        progress=None,
        ensureDependencies=True,
        calibration=None,
    ) -> dict:
        """Blocking: nodes in → nodes out. Returns the summary with ``summary["nodes"]`` (node IDs of
        the segmentation, heatmap, table and chart). ``progress(fraction, status)`` is called on changes."""
        p = self.consoleParameters(
            flairVolume=flair,
            t2Volume=t2,
            t1Volume=t1,
            t1ceVolume=t1ce,
            device=device,
            methods=next(
                k
                for k, v in METHODS.items()
                if (v is None) == (methods is None) and (v is None or tuple(v) == tuple(methods))
            ),
            calibration=next(k for k, v in CALIBRATIONS.items() if v == calibration),
            bundleSource="Local file or folder" if bundle else "Embedded default",
            bundlePath=str(bundle) if bundle else "",
        )
        process, run = self.startDetection(p, ensureDependencies=ensureDependencies)
        try:
            process.wait(progress=progress)
            if not process.succeeded:
                raise RuntimeError(process.error_message())
            return self.loadResults(run, p)
        finally:
            self.cleanupRun(run)

    @staticmethod
    def consoleParameters(**values):
        """Parameters for a console run, apart from the GUI's parameter node (a console ``process()``
        leaves the panel's selections alone): the parameter node's defaults, then ``values``. The
        advanced settings start unset, so the bundle's calibrated values apply unless given."""
        import types

        fields = dict(
            flairVolume=None,
            t2Volume=None,
            t1Volume=None,
            t1ceVolume=None,
            bundleSource="Embedded default",
            bundlePath="",
            bundleUrl="",
            bundleChecksum="",
            device="auto",
            methods="Bundle default",
            calibration="Bundle default",
            guidance=None,
            earlyStop=None,
            stride=None,
            decisionThreshold=None,
            dodeScales="",
            faithful=False,
            shownSettings="{}",
            outputSegmentation=None,
            outputHeatmap=None,
            outputTable=None,
        )
        unknown = set(values) - set(fields)
        if unknown:
            raise TypeError(f"unknown parameter(s): {sorted(unknown)}")
        fields.update(values)
        return types.SimpleNamespace(**fields)

    def processFiles(self, flairPath, t2Path, outDir, bundle=None, device="auto", progress=None) -> dict:
        """Blocking: files in → files out (the CLI's outputs in ``outDir``); returns the summary."""
        bridge = _bridge()
        request = bridge.DetectRequest(
            inputs={"flair": str(flairPath), "t2": str(t2Path)},
            out_dir=str(outDir),
            bundle=bundle,
            device=device,
            output_format="nii.gz",
        )
        process = bridge.DetectProcess(
            bridge.detect_command(request, python=self.pythonExecutable()),
            env=slicer.util.startupEnvironment(),
            cwd=str(_libraryRoot()),
        )
        process.wait(progress=progress)
        if not process.succeeded:
            raise RuntimeError(process.error_message())
        return json.loads((Path(outDir) / "summary.json").read_text())

    def processBatch(
        self, inputPath, outDir, bundle=None, options=None, force=False, outputFormat=None, progress=None
    ) -> dict:
        """Blocking: every case of a BraTS-layout folder or cases CSV through ``anomaly-diffusion batch``
        (the same command line, in a child process): ``outDir/<id>/`` per case, ``outDir/cases.csv``.
        ``options``: detect options by name (e.g. ``{"device": "cpu", "stride": 60}``). Returns the
        aggregate ``outDir/summary.json`` (failed cases in its ``failed_cases``); raises
        ``RuntimeError`` with the command's one-line error when the batch cannot start."""
        bridge = _bridge()
        request = bridge.BatchRequest(
            input=str(inputPath),
            out_dir=str(outDir),
            bundle=bundle,
            options=dict(options or {}),
            force=force,
            output_format=outputFormat,
        )
        process = bridge.DetectProcess(
            bridge.batch_command(request, python=self.pythonExecutable()),
            env=slicer.util.startupEnvironment(),
            cwd=str(_libraryRoot()),
        )
        process.wait(progress=progress)
        summary = Path(outDir) / "summary.json"
        if process.cancelled or process.state.error or not summary.is_file():
            raise RuntimeError(process.error_message())
        logging.info("AnomalyDiffusion batch: %s", process.output_text())
        return json.loads(summary.read_text())

    def loadPhantomCase(self, seed: int = 7, tick=None):
        """A synthetic case (FLAIR, T2, lesion labelmap) made by the library, loaded into the scene.
        ``tick()`` is called while the library works (e.g. ``slicer.app.processEvents``)."""
        folder = Path(slicer.util.tempDirectory("__AnomalyDiffusionPhantom__"))
        command = [
            self.pythonExecutable(),
            "-m",
            "AnomalyDiffusionLib.cli",
            "--progress",
            "none",
            "phantom",
            "--out",
            str(folder),
            "--cases",
            "1",
            "--seed",
            str(seed),
            "--lesions",
            "1",
            "--spacing",
            "1.5",
        ]
        process = _bridge().DetectProcess(command, env=slicer.util.startupEnvironment(), cwd=str(_libraryRoot()))
        while not process.done:
            process.poll()
            if tick is not None:
                tick()
            time.sleep(0.05)
        if not process.succeeded:
            logging.error("AnomalyDiffusion: phantom failed:\n%s", process.output_text())
            raise RuntimeError(process.error_message())
        case = folder / "Case_0"
        nodes = [
            slicer.util.loadVolume(str(case / "Case_0_flair.nii.gz"), {"name": "Phantom FLAIR"}),
            slicer.util.loadVolume(str(case / "Case_0_t2.nii.gz"), {"name": "Phantom T2", "show": False}),
            slicer.util.loadLabelVolume(str(case / "Case_0_seg.nii.gz"), {"name": "Phantom lesion (truth)"}),
        ]
        return nodes


# ---------------------------------------------------------------------------------------- test
def missingDependencies() -> list[str]:
    """What a detection would still need installed (empty: ready): torch and the packages of
    ``Resources/requirements.txt``. Checked without importing them."""
    lines = ["torch", *(MODULE_DIR / "Resources" / "requirements.txt").read_text().splitlines()]
    return _bridge().missing_requirements(lines, skip=["torchvision", "SimpleITK", "numpy"])


class AnomalyDiffusionTest(ScriptedLoadableModuleTest):
    """Self-test: a phantom case in the scene, the logic with the embedded bundle, checks against the
    phantom's own lesion mask, the input geometry, the terminology, the table and plot, the slice jump
    and a cancel. Without the Python dependencies (a Slicer without the extension's packages, e.g. on
    the extension build machines) the detection parts are skipped with a message."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_bridge_decisions()
        missing = missingDependencies()
        if missing:
            message = "AnomalyDiffusion self-test: detection skipped, missing Python packages: " + ", ".join(missing)
            logging.warning(message)
            self.delayDisplay(message)
            return
        self.setUp()
        self.test_detect_on_phantom()
        self.setUp()
        self.test_cancel_leaves_the_scene_unchanged()

    def test_bridge_decisions(self):
        bridge = _bridge()
        state = bridge.ProgressState()
        bridge.parse_progress_line('{"stage": "fpdm", "fraction": 0.5, "message": "step 1/600"}', state)
        self.assertGreater(state.fraction, 0.3)
        self.assertTrue(state.status.startswith("Segmenting"))

    def test_detect_on_phantom(self):
        import numpy as np

        bridge = _bridge()
        self.delayDisplay("Making a phantom case")
        flair, t2, truth = AnomalyDiffusionLogic().loadPhantomCase()
        self.delayDisplay("Detecting anomalies (embedded bundle; about a minute on CPU)")
        logic = AnomalyDiffusionLogic()
        summary = logic.process(flair, t2, device="cpu", ensureDependencies=False)
        seg = slicer.mrmlScene.GetNodeByID(summary["nodes"]["segmentation"])
        heat = slicer.mrmlScene.GetNodeByID(summary["nodes"]["heatmap"])
        table = slicer.mrmlScene.GetNodeByID(summary["nodes"]["table"])
        chart = slicer.mrmlScene.GetNodeByID(summary["nodes"]["chart"])
        self.assertIsNotNone(seg)
        self.assertEqual(heat.GetImageData().GetDimensions(), flair.GetImageData().GetDimensions())
        segmentId = seg.GetSegmentation().GetSegmentIdBySegmentName(bridge.SEGMENT_NAME)
        segment = seg.GetSegmentation().GetSegment(segmentId)
        self.assertEqual(segment.GetTerminology(), bridge.SEGMENT_TERMINOLOGY)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentId, flair) > 0
        lesion = slicer.util.arrayFromVolume(truth) > 0
        self.assertEqual(mask.shape, lesion.shape)
        overlap = np.logical_and(mask, lesion).sum()
        self.assertGreater(overlap, 0, "the segmentation does not touch the phantom's lesion")
        # table: one row per axial slice, numbered; the plot's series use the slice number as X
        self.assertEqual(table.GetNumberOfRows(), flair.GetImageData().GetDimensions()[2])
        self.assertIsNotNone(table.GetTable().GetColumnByName(bridge.PLOT_X_COLUMN))
        self.assertGreater(chart.GetNumberOfPlotSeriesNodes(), 0)
        for i in range(chart.GetNumberOfPlotSeriesNodes()):
            series = chart.GetNthPlotSeriesNode(i)
            self.assertEqual(series.GetXColumnName(), bridge.PLOT_X_COLUMN)
            self.assertEqual(series.GetPlotType(), slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        # the red slice view shows the most anomalous slice
        target = bridge.jump_target(summary)
        if target is not None:
            red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            self.assertAlmostEqual(red.GetSliceOffset(), target[2], delta=2.0)
        # a second run keeps the first run's nodes
        second = logic.process(flair, t2, device="cpu", methods=("dode",), ensureDependencies=False)
        self.assertNotEqual(second["nodes"]["table"], summary["nodes"]["table"])
        self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(summary["nodes"]["table"]))
        self.delayDisplay(f"Test passed: {summary['verdict']}, overlap {int(overlap)} voxels")

    def test_cancel_leaves_the_scene_unchanged(self):
        flair, t2, _truth = AnomalyDiffusionLogic().loadPhantomCase()
        logic = AnomalyDiffusionLogic()
        before = slicer.mrmlScene.GetNumberOfNodes()
        p = logic.consoleParameters(flairVolume=flair, t2Volume=t2, device="cpu")
        process, run = logic.startDetection(p, ensureDependencies=False)
        try:
            deadline = time.monotonic() + 120
            while process.poll().fraction <= 0 and not process.done and time.monotonic() < deadline:
                time.sleep(0.1)
            process.cancel()
            self.assertTrue(process.cancelled)
            self.assertFalse(process.succeeded)
        finally:
            logic.cleanupRun(run)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), before)
        self.assertFalse(run["tempDir"].exists())
