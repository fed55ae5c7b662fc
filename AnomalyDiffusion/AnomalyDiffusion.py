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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
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


def registerSampleData() -> None:
    """Register the synthetic phantom case (FLAIR, T2 and its lesion mask) as Sample Data. It is made
    locally by the library (no download), so it works offline."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataCategory("AnomalyDiffusion", title=_("Anomaly Diffusion"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="AnomalyDiffusion",
        sampleName="AnomalyDiffusionPhantom",
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "AnomalyDiffusionPhantom.png"),
        customDownloader=lambda source: AnomalyDiffusionLogic().loadPhantomCase(),
    )


# ------------------------------------------------------------------------------ parameter node
@parameterNodeWrapper
class AnomalyDiffusionParameterNode:
    flairVolume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    t1Volume: vtkMRMLScalarVolumeNode
    t1ceVolume: vtkMRMLScalarVolumeNode
    bundleSource: Annotated[str, Choice(["Embedded default", "Local file or folder", "Download URL"])] = (
        "Embedded default"
    )
    bundlePath: Path = Path()
    bundleUrl: str = ""
    bundleChecksum: str = ""  # "SHA256:<hex>"
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    methods: Annotated[str, Choice(["Segmentation and slice scoring", "Segmentation", "Slice scoring"])] = (
        "Segmentation and slice scoring"
    )
    overrideSettings: bool = False
    guidance: Annotated[float, WithinRange(0.0, 20.0)] = 2.0
    earlyStop: bool = False
    stride: Annotated[int, WithinRange(1, 100)] = 10
    decisionThreshold: Annotated[float, WithinRange(0.0, 100.0)] = 0.0
    dodeScales: str = ""
    faithful: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    outputHeatmap: vtkMRMLScalarVolumeNode
    outputTable: vtkMRMLTableNode


METHODS = {
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
        self.panel = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AnomalyDiffusion.ui"))
        self.layout.addWidget(uiWidget)
        ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.panel = AnomalyDiffusionPanel(ui, AnomalyDiffusionLogic())
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
    so tests can drive it with another logic (anything with ``getParameterNode``, ``detectedDevice``,
    ``startDetection``, ``loadResults`` and ``cleanupRun``)."""

    POLL_MS = 200

    def __init__(self, ui, logic) -> None:
        VTKObservationMixin.__init__(self)
        self.ui = ui
        self.logic = logic
        self._parameterNode = None
        self._guiTag = None
        self._run = None  # (process, run info) while a detection runs
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._poll)
        ui.applyButton.connect("clicked(bool)", self.onApply)
        ui.cancelButton.connect("clicked(bool)", self.cancel)
        ui.bundleSourceComboBox.connect("currentIndexChanged(int)", self._updateBundleWidgets)
        ui.progressBar.setVisible(False)
        ui.cancelButton.setEnabled(False)
        ui.deviceLabel.setText(logic.detectedDevice())
        ui.statusLabel.setText(_("Select FLAIR and T2 volumes, then click Detect anomalies."))

    # ---- parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.flairVolume or not p.t2Volume:
            flair, t2 = self.logic.guessInputs()
            p.flairVolume = p.flairVolume or flair
            p.t2Volume = p.t2Volume or t2

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._guiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()
            self._updateBundleWidgets()

    def cleanup(self) -> None:
        self.cancel()
        self.removeObservers()

    def _updateBundleWidgets(self, *args) -> None:
        source = self.ui.bundleSourceComboBox.currentText
        self.ui.bundlePathLineEdit.setVisible(source == "Local file or folder")
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
            elif process.cancelled:
                self.ui.statusLabel.setText(_("Cancelled; the scene was not changed."))
            else:
                message = process.error_message()
                self.ui.statusLabel.setText(_("Failed: {message}").format(message=message))
                slicer.util.errorDisplay(_("Anomaly detection failed:\n{message}").format(message=message))
        finally:
            self.logic.cleanupRun(run)
            self.ui.progressBar.setVisible(False)
            self.ui.cancelButton.setEnabled(False)
            self._checkCanApply()

    def cancel(self, *args) -> None:
        """Stop a running detection (the whole process tree); the scene is left untouched."""
        if self._run is None:
            return
        process, _ = self._run
        process.cancel()
        self._poll()


# --------------------------------------------------------------------------------------- logic
class AnomalyDiffusionLogic(ScriptedLoadableModuleLogic):
    """Runs ``anomaly-diffusion detect`` in a separate process and loads its outputs into the scene."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.keepTemporaryFiles = False

    def getParameterNode(self):
        return AnomalyDiffusionParameterNode(super().getParameterNode())

    # ---- environment
    @staticmethod
    def pythonExecutable() -> str:
        exe = shutil.which("PythonSlicer")
        if not exe:
            raise RuntimeError(_("Slicer's Python (PythonSlicer) was not found"))
        return exe

    def detectedDevice(self) -> str:
        """What ``auto`` will use, for the panel (without importing torch into Slicer's process when
        it is not installed yet)."""
        try:
            import torch
        except ImportError:
            return _("PyTorch not installed yet (installed on first run)")
        if torch.cuda.is_available():
            return _("GPU: {name}").format(name=torch.cuda.get_device_name(0))
        return _("CPU only (no CUDA GPU found)")

    def ensureDependencies(self) -> None:
        """On first use (never at import): PyTorch through the PyTorch extension (it picks the CUDA
        build that fits this computer), the rest from ``Resources/requirements.txt``; asks first."""
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(
                _("The PyTorch extension is required: install 'PyTorch' from the Extensions Manager")
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=">=2.4") is None:
                raise RuntimeError(_("PyTorch is needed to detect anomalies; installation was declined"))
        import slicer.packaging

        requirements = slicer.packaging.load_requirements(str(MODULE_DIR / "Resources" / "requirements.txt"))
        slicer.packaging.pip_ensure(
            requirements,
            skip_packages=["torch", "torchvision", "SimpleITK", "numpy"],  # Slicer's / PyTorch extension's own
            requester="AnomalyDiffusion",
        )

    def guessInputs(self):
        """FLAIR and T2 volumes by name (``flair``/``t2f``, ``t2``/``t2w``), if the user has not chosen."""
        flair = t2 = None
        for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            name = node.GetName().lower()
            if node.IsA("vtkMRMLLabelMapVolumeNode"):
                continue
            if flair is None and ("flair" in name or "t2f" in name):
                flair = node
            elif t2 is None and ("t2" in name and "flair" not in name and "t2f" not in name):
                t2 = node
        return flair, t2

    def bundleLocation(self, p) -> str | None:
        """None (embedded default bundle), a local path, or a downloaded and SHA256-checked file in
        Slicer's cache (reused offline once present)."""
        if p.bundleSource == "Local file or folder":
            path = str(p.bundlePath)
            if not path or path == "." or not os.path.exists(path):
                raise ValueError(_("Model bundle not found: '{path}'").format(path=path))
            return path
        if p.bundleSource == "Download URL":
            if not p.bundleUrl:
                raise ValueError(_("Enter the model bundle's download URL"))
            if not p.bundleChecksum.upper().startswith("SHA256:"):
                raise ValueError(_("Enter the bundle's checksum as SHA256:<hex digest>"))
            cache = Path(slicer.app.cachePath) / "AnomalyDiffusion" / "bundles"
            cache.mkdir(parents=True, exist_ok=True)
            digest = p.bundleChecksum.split(":", 1)[1].strip().lower()
            import SampleData

            # reuses a cached file whose checksum matches (works offline once downloaded)
            path = SampleData.SampleDataLogic().downloadFile(
                p.bundleUrl, str(cache), digest[:16] + ".zip", checksum=f"SHA256:{digest}"
            )
            if not os.path.isfile(path) or slicer.util.computeChecksum("SHA256", path) != digest:
                raise RuntimeError(_("Download of the model bundle failed or its checksum did not match"))
            return path
        return None

    # ---- one run
    def startDetection(self, p, ensureDependencies: bool = True):
        """Export the inputs, start the CLI, return ``(DetectProcess, run)``; poll the process."""
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
            storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
            try:
                storage.SetFileName(str(path))
                storage.UseCompressionOff()
                if not storage.WriteData(node):
                    raise RuntimeError(_("Could not export {name}").format(name=node.GetName()))
            finally:
                slicer.mrmlScene.RemoveNode(storage)
            inputs[name] = str(path)
        override = p.overrideSettings
        scales = [int(s) for s in p.dodeScales.replace(" ", "").split(",") if s] if override else None
        request = bridge.DetectRequest(
            inputs=inputs,
            out_dir=str(tempDir / "out"),
            bundle=self.bundleLocation(p),
            device=p.device,
            methods=METHODS[p.methods],
            w=p.guidance if override else None,
            early_stop=p.earlyStop if override else None,
            stride=p.stride if override else None,
            dode_threshold=p.decisionThreshold if override and p.decisionThreshold > 0 else None,
            dode_scales=scales or None,
            faithful=p.faithful,
        )
        command = bridge.detect_command(request, python=self.pythonExecutable())
        logging.info("AnomalyDiffusion: %s", " ".join(command))
        env = slicer.util.startupEnvironment()
        process = bridge.DetectProcess(command, env=env, cwd=str(_libraryRoot()))
        return process, {"tempDir": tempDir, "request": request, "flair": p.flairVolume}

    def cleanupRun(self, run) -> None:
        if not self.keepTemporaryFiles:
            shutil.rmtree(run["tempDir"], ignore_errors=True)

    def loadResults(self, run, p=None) -> dict:
        """Turn the CLI's output folder into nodes (see ``slicer_bridge.output_plan``) and show them."""
        bridge = _bridge()
        flair = run["flair"]
        plan = bridge.output_plan(run["request"].out_dir, flair.GetName())
        summary = {}
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parentItem = shNode.GetItemParent(shNode.GetItemByDataNode(flair))
        created = {}
        for item in plan:
            if item.kind == "summary":
                summary = json.loads(item.path.read_text())
            elif item.kind == "segmentation":
                created["segmentation"] = self._loadSegmentation(item, flair, p.outputSegmentation if p else None)
            elif item.kind == "heatmap":
                created["heatmap"] = self._loadHeatmap(item, flair, p.outputHeatmap if p else None)
            elif item.kind == "table":
                created["table"], created["chart"] = self._loadTable(item, p.outputTable if p else None)
        for node in created.values():
            if node is not None:
                shNode.SetItemParent(shNode.GetItemByDataNode(node), parentItem)
        if p is not None:
            if created.get("segmentation"):
                p.outputSegmentation = created["segmentation"]
            if created.get("heatmap"):
                p.outputHeatmap = created["heatmap"]
            if created.get("table"):
                p.outputTable = created["table"]
        target = bridge.jump_target(summary)
        if target is not None:
            slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *target, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        summary["nodes"] = {k: v.GetID() for k, v in created.items() if v is not None}
        return summary

    def _loadSegmentation(self, item, flair, segmentationNode=None):
        bridge = _bridge()
        labelmap = slicer.util.loadLabelVolume(str(item.path), {"name": item.node_name + " labelmap", "show": False})
        try:
            if segmentationNode is None:
                segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", item.node_name)
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
        node = slicer.util.loadVolume(str(item.path), {"name": item.node_name, "show": False})
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
        display.SetWindowLevelMinMax(lo + 0.05 * (hi - lo), hi)
        slicer.util.setSliceViewerLayers(background=flair, foreground=node, foregroundOpacity=bridge.HEATMAP_OPACITY)
        return node

    def _loadTable(self, item, tableNode=None):
        bridge = _bridge()
        cols, values, types = bridge.read_table(item.path)
        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", item.node_name)
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
        chart = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotChartNode", item.node_name + " plot")
        chart.SetTitle(_("Per-slice anomaly scores"))
        chart.SetXAxisTitle(_("axial slice (inferior → superior)"))
        for column, label, color in bridge.plot_series(cols):
            series = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", label)
            series.SetAndObserveTableNodeID(tableNode.GetID())
            series.SetXColumnName("slice")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeLine)
            series.SetColor(*color)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        slicer.modules.plots.logic().ShowChartInLayout(chart)
        return tableNode, chart

    # ---- console / batch API
    def process(
        self,
        flair,
        t2,
        t1=None,
        t1ce=None,
        bundle=None,
        device="auto",
        methods=("fpdm", "dode"),
        progress=None,
        ensureDependencies=True,
    ) -> dict:
        """Blocking: nodes in → nodes out. Returns the summary with ``summary["nodes"]`` (node IDs of
        the segmentation, heatmap, table and chart). ``progress(fraction, status)`` is called on changes."""
        p = self.getParameterNode()
        p.flairVolume, p.t2Volume, p.t1Volume, p.t1ceVolume = flair, t2, t1, t1ce
        p.device = device
        p.methods = next(k for k, v in METHODS.items() if tuple(v) == tuple(methods))
        if bundle:
            p.bundleSource, p.bundlePath = "Local file or folder", Path(bundle)
        else:
            p.bundleSource = "Embedded default"
        process, run = self.startDetection(p, ensureDependencies=ensureDependencies)
        try:
            process.wait(progress=progress)
            if not process.succeeded:
                raise RuntimeError(process.error_message())
            return self.loadResults(run, p)
        finally:
            self.cleanupRun(run)

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

    def loadPhantomCase(self, seed: int = 7):
        """A synthetic case (FLAIR, T2, lesion labelmap) made by the library, loaded into the scene."""
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
        process.wait()
        if not process.succeeded:
            raise RuntimeError(process.error_message())
        case = folder / "Case_0"
        nodes = [
            slicer.util.loadVolume(str(case / "Case_0_flair.nii.gz"), {"name": "Phantom FLAIR"}),
            slicer.util.loadVolume(str(case / "Case_0_t2.nii.gz"), {"name": "Phantom T2", "show": False}),
            slicer.util.loadLabelVolume(str(case / "Case_0_seg.nii.gz"), {"name": "Phantom lesion (truth)"}),
        ]
        return nodes


# ---------------------------------------------------------------------------------------- test
class AnomalyDiffusionTest(ScriptedLoadableModuleTest):
    """Self-test: a phantom case in the scene, the logic with the embedded bundle, checks against the
    phantom's own lesion mask and the input geometry."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_bridge_decisions()
        self.setUp()
        self.test_detect_on_phantom()

    def test_bridge_decisions(self):
        bridge = _bridge()
        state = bridge.ProgressState()
        bridge.parse_progress_line('{"stage": "fpdm", "fraction": 0.5, "message": "step 1/600"}', state)
        self.assertGreater(state.fraction, 0.3)
        self.assertTrue(state.status.startswith("Segmenting"))

    def test_detect_on_phantom(self):
        import numpy as np

        self.delayDisplay("Making a phantom case")
        flair, t2, truth = AnomalyDiffusionLogic().loadPhantomCase()
        self.delayDisplay("Detecting anomalies (embedded bundle; about a minute on CPU)")
        logic = AnomalyDiffusionLogic()
        summary = logic.process(flair, t2, device="cpu", ensureDependencies=False)
        seg = slicer.mrmlScene.GetNodeByID(summary["nodes"]["segmentation"])
        heat = slicer.mrmlScene.GetNodeByID(summary["nodes"]["heatmap"])
        self.assertIsNotNone(seg)
        self.assertEqual(heat.GetImageData().GetDimensions(), flair.GetImageData().GetDimensions())
        segmentId = seg.GetSegmentation().GetSegmentIdBySegmentName(_bridge().SEGMENT_NAME)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentId, flair) > 0
        lesion = slicer.util.arrayFromVolume(truth) > 0
        self.assertEqual(mask.shape, lesion.shape)
        overlap = np.logical_and(mask, lesion).sum()
        self.assertGreater(overlap, 0, "the segmentation does not touch the phantom's lesion")
        self.delayDisplay(f"Test passed: {summary['verdict']}, overlap {int(overlap)} voxels")
