"""3D Slicer module "Pancreas Attention U-Net": a thin shell over AttentionUNetSegLib.

The panel and the Slicer-only parts live here (dependency installation, sample data, timers, views).
Everything else -- the child process that runs the network, its progress lines, importing its result into
the scene -- is in ``AttentionUNetSegLib.runner`` and ``mrml_bridge``, which are tested outside Slicer.
This file must stay importable at Slicer start-up without torch: heavy imports happen on first use.
"""

import importlib.util
import logging
import shutil
import subprocess
import sys
import time
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from AttentionUNetSegLib import locations, runner
from AttentionUNetSegLib.errors import Cancelled, UserError
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

SAMPLE_CT = "CTAAbdomenPanoramix"
REQUESTER = "Pancreas Attention U-Net"
POLL_INTERVAL_MS = 100
logger = logging.getLogger(__name__)


class AttentionUNetSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Pancreas Attention U-Net"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["AttentionUNetSeg contributors (https://github.com/attentionunetseg)"]
        self.parent.helpText = helpText()
        self.parent.acknowledgementText = (
            "<p>The network follows the 3D Attention U-Net of Oktay O, Schlemper J, Le Folgoc L, et al. "
            '"Attention U-Net: Learning Where to Look for the Pancreas." Medical Imaging with Deep Learning '
            '(MIDL) 2018, <a href="https://arxiv.org/abs/1804.03999">arXiv:1804.03999</a>. '
            "Please cite it when you use this module.</p>"
            "<p>Built on PyTorch (through the PyTorch extension by F. Perez-Garcia and A. Lasso), MONAI, "
            "SimpleITK and 3D Slicer.</p>"
        )


def helpText() -> str:
    card = locations.model_card_path()
    model = (
        runner.model_card_summary_html(card.read_text(encoding="utf-8"))
        if card.is_file()
        else "<p>No trained model is bundled with this copy; segmenting will say so.</p>"
    )
    return (
        "<p>Segments the pancreas in an abdominal CT with a 3D Attention U-Net and shows the attention-gate "
        "coefficients as a heatmap: where the network looked.</p>"
        "<p>Select a CT and click <b>Segment Pancreas</b>. The result is a <i>Pancreas</i> segment and one "
        "attention volume per gate level; the attention display settings change the views only, never the "
        "result. Inference runs in a separate process: the application stays responsive and the run can be "
        "cancelled. PyTorch and the other Python packages are installed on first use, after you confirm.</p>"
        f"{model}"
        "<p>Limits: trained for adult abdominal CT in Hounsfield units; other modalities, children, or a "
        "pancreas outside the field of view give unreliable results. Always review the segmentation.</p>"
        "<p><b>Research use only.</b> Not for clinical decisions.</p>"
        '<p>More: <a href="https://github.com/attentionunetseg/SlicerAttentionUNetSeg">project page</a>.</p>'
    )


@parameterNodeWrapper
class AttentionUNetSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode  # None: a new one (reused on the next run of the same CT)
    device: Annotated[str, Choice(list(runner.DEVICE_CHOICES))] = "Auto"
    quality: Annotated[str, Choice(list(runner.QUALITY_CHOICES))] = "full"
    showAttention: bool = True
    attentionMap: Annotated[str, Choice(list(runner.ATTENTION_MAP_CHOICES))] = "combined"
    attentionOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    attentionColorMap: Annotated[str, Choice(list(runner.ATTENTION_COLOUR_MAPS))] = "Heat"
    show3D: bool = False


class AttentionUNetSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._gpuQuery = None
        self._shownDisplay = None  # the display settings last applied to the result

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AttentionUNetSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AttentionUNetSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.updateSampleOffer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.updateSampleOffer)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSampleButton)
        self.ui.settingsCollapsibleButton.connect("contentsCollapsed(bool)", self.onSettingsCollapsed)

        self.initializeParameterNode()
        self.updateSampleOffer()

    def cleanup(self):
        """Slicer is closing or the module is reloaded: stop a running child process."""
        self.logic.cancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.logic.cancel()
        self.logic.lastResult = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.updateSampleOffer()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = firstCT()

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
            self.onParameterChanged()

    def onParameterChanged(self, caller=None, event=None):
        """Display settings apply to the last result at once; they never re-run the network."""
        parameters = self._parameterNode
        if outputOfAnotherInput(parameters.outputSegmentation, parameters.inputVolume):
            parameters.outputSegmentation = None  # never write into the segmentation of another CT unasked
            return  # that change calls this again
        self.updateApplyButton()
        self.ui.attentionMapComboBox.enabled = parameters.showAttention
        self.ui.attentionOpacitySlider.enabled = parameters.showAttention
        self.ui.attentionColorMapComboBox.enabled = parameters.showAttention
        display = (parameters.attentionMap, parameters.showAttention, parameters.attentionOpacity,
                   parameters.attentionColorMap, parameters.show3D)
        if display != self._shownDisplay and self.logic.hasResult() and not self.logic.running:
            self.logic.showAttention(*display[:4])
            self.logic.showSurface(parameters.show3D)
            self._shownDisplay = display  # other parameters (a new input, say) leave the views alone

    def updateApplyButton(self):
        if self.logic.running:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the segmentation; the scene stays as it was."
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = "Segment Pancreas"
            ready = self._parameterNode is not None and self._parameterNode.inputVolume is not None
            self.ui.applyButton.toolTip = "Segment the pancreas in the input CT." if ready else "Select a CT first."
            self.ui.applyButton.enabled = ready

    def updateSampleOffer(self, caller=None, event=None):
        self.ui.loadSampleButton.visible = firstCT() is None

    def onLoadSampleButton(self):
        with slicer.util.tryWithErrorDisplay("Could not load the sample CT.", waitCursor=True):
            self._parameterNode.inputVolume = self.logic.loadSampleCT()

    def onSettingsCollapsed(self, collapsed):
        """Ask which GPU torch sees when the user first looks at the device setting (a child process)."""
        if collapsed or self._gpuQuery is not None:
            return
        if importlib.util.find_spec("torch") is None:
            self.ui.gpuLabel.text = ("GPU: not known yet; PyTorch is installed on first use (the PyTorch "
                                     "extension picks a CUDA build when it finds an NVIDIA driver).")
            return
        self.ui.gpuLabel.text = "GPU: checking..."
        self._gpuQuery = runner.GpuQuery(pythonExecutable())
        self._pollGpuQuery()

    def _pollGpuQuery(self):
        if not self._gpuQuery.done:
            qt.QTimer.singleShot(POLL_INTERVAL_MS, self._pollGpuQuery)
            return
        self.ui.gpuLabel.text = f"GPU: {self._gpuQuery.answer()}"

    def onApplyButton(self):
        if self.logic.running:
            self.logic.cancel()
            return
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Segmentation failed.", waitCursor=True):
            self.logic.installDependencies(askConfirmation=True)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting..."
            self.ui.resultLabel.text = ""
            self.logic.segmentPancreas(
                parameters.inputVolume, parameters.outputSegmentation,
                device=runner.DEVICE_CHOICES[parameters.device], quality=parameters.quality,
                waitForCompletion=False, progressCallback=self.onProgress, completionCallback=self.onCompleted,
            )
        self.updateApplyButton()

    def onProgress(self, fraction, text):
        self.ui.progressBar.value = round(100 * fraction)
        self.ui.statusLabel.text = text

    def onCompleted(self, result, error):
        self.updateApplyButton()
        if isinstance(error, Cancelled):
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Cancelled; the scene is as it was."
        elif error is not None:
            self.ui.statusLabel.text = f"Failed: {error}"
            if not isinstance(error, UserError):
                logger.error("Segmentation failed", exc_info=error)
            slicer.util.errorDisplay(f"Segmentation failed: {error}")
        else:
            self.ui.statusLabel.text = "Done."
            self.ui.resultLabel.text = resultLine(result)
            self._shownDisplay = None
            self.logic.getParameterNode().outputSegmentation = result.outputs.segmentation_node
            if self._parameterNode:
                self.onParameterChanged()
            self._gpuQuery = None  # torch may have been installed just now: ask again
            self.onSettingsCollapsed(self.ui.settingsCollapsibleButton.collapsed)


class AttentionUNetSegLogic(ScriptedLoadableModuleLogic):
    """Segmentation without the GUI, for the panel, scripts and tests (see :meth:`segmentPancreas`)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastResult = None  # runner.RunResult of the last finished run
        self._run = None
        self._progressCallback = None
        self._completionCallback = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)

    def getParameterNode(self):
        return AttentionUNetSegParameterNode(super().getParameterNode())

    @property
    def running(self):
        return self._run is not None

    def hasResult(self):
        """Whether the last result's nodes are all still in the scene (the user may have deleted some)."""
        if self.lastResult is None:
            return False
        outputs = self.lastResult.outputs
        nodes = [outputs.segmentation_node, *outputs.attention_nodes.values()]
        return all(slicer.mrmlScene.IsNodePresent(node) for node in nodes)

    def installDependencies(self, askConfirmation=True):
        """Install what is missing: torch through the PyTorch extension, then the Lib's other packages.

        Each installation asks the user first (when ``askConfirmation``); raises ``UserError`` if one is
        declined or fails.
        """
        if importlib.util.find_spec("torch") is None:
            self._installTorch(askConfirmation)
        missing = runner.missing_requirements()
        if missing:
            self._pipInstall(missing, askConfirmation)

    def segmentPancreas(self, volumeNode, segmentationNode=None, device="auto", quality="full",
                        waitForCompletion=True, progressCallback=None, completionCallback=None):
        """Segment the pancreas in ``volumeNode`` into ``segmentationNode`` (None: a new or the previous one).

        :param device: "auto", "cpu", "cuda" or "cuda:N".
        :param quality: "full" or "fast".
        :param progressCallback: ``progressCallback(fraction, text)`` as the child process reports.
        :param completionCallback: without waiting, called with ``(runner.RunResult, None)`` or
            ``(None, exception)`` (``Cancelled`` after :meth:`cancel`).
        :return: with ``waitForCompletion`` the ``runner.RunResult`` (raises ``UserError`` on bad input or a
            failed run, the scene unchanged); without, None at once.
        """
        if self.running:
            raise UserError("a segmentation is already running", "", "wait for it to finish or cancel it")
        missing = runner.missing_requirements() + (["torch"] if importlib.util.find_spec("torch") is None else [])
        if missing:
            raise UserError(f"Python packages missing: {', '.join(missing)}", "they are installed on first use",
                            "click Segment Pancreas in the module panel, or call logic.installDependencies()")
        run = runner.SegmentationRun(slicer.mrmlScene, volumeNode, segmentationNode, device=device,
                                     quality=quality, python=pythonExecutable(),
                                     work_root=slicer.app.temporaryPath)
        run.start()
        logger.info("Running %s", " ".join(run.child.command))
        if waitForCompletion:
            def report(progress):
                if progressCallback:
                    progressCallback(progress.fraction, progress.text)
                slicer.app.processEvents()

            return self._finished(run.wait(report))
        self._run = run
        self._progressCallback = progressCallback
        self._completionCallback = completionCallback
        self._timer.start()
        return None

    def cancel(self):
        """Stop a running segmentation; the scene stays as it was."""
        if not self.running:
            return
        self._timer.stop()
        run, self._run = self._run, None
        run.cancel()
        self._complete(None, Cancelled("segmentation cancelled"))

    def showAttention(self, mapName="combined", visible=True, opacity=0.5, colorMap="Heat"):
        """Show one attention map of the last result over its CT in the slice views (or hide it)."""
        from AttentionUNetSegLib import mrml_bridge

        nodes = self.lastResult.outputs.attention_nodes
        shown = nodes.get(mapName, nodes["combined"])  # a model with fewer gate levels has fewer maps
        for node in nodes.values():
            if node is not shown:
                mrml_bridge.show_attention(slicer.mrmlScene, node, visible=False)
        runner.set_attention_colour_map(slicer.mrmlScene, shown, colorMap)
        mrml_bridge.show_attention(slicer.mrmlScene, shown, opacity, visible)

    def showSurface(self, visible):
        """Show the pancreas of the last result as a 3D surface (or hide it)."""
        segmentation = self.lastResult.outputs.segmentation_node
        display = segmentation.GetDisplayNode()
        turningOn = visible and not display.GetVisibility3D()
        if visible:
            segmentation.CreateClosedSurfaceRepresentation()
        display.SetVisibility3D(visible)
        layoutManager = slicer.app.layoutManager()
        if turningOn and layoutManager is not None and layoutManager.threeDWidget(0) is not None:
            layoutManager.threeDWidget(0).threeDView().resetFocalPoint()

    def loadSampleCT(self):
        """Slicer's sample abdominal CT angiography, downloaded once and cached by SampleData."""
        import SampleData

        try:
            loaded = SampleData.SampleDataLogic().downloadSample(SAMPLE_CT)
        except Exception as exc:  # noqa: BLE001 -- any download failure: say so in one line
            raise UserError(f"could not download the sample CT {SAMPLE_CT}", str(exc).splitlines()[0],
                            "check the network connection, or load a CT of your own") from None
        nodes = loaded if isinstance(loaded, (list, tuple)) else [loaded]
        volume = next((node for node in nodes if node is not None and node.IsA("vtkMRMLScalarVolumeNode")), None)
        if volume is None:
            raise UserError(f"could not download the sample CT {SAMPLE_CT}", "Sample Data returned no volume",
                            "check the network connection, or load a CT of your own")
        return volume

    # --- internals ------------------------------------------------------------------------------------

    def _poll(self):
        for progress in self._run.poll():
            if self._progressCallback:
                self._progressCallback(progress.fraction, progress.text)
        if self._run.running:
            return
        self._timer.stop()
        run, self._run = self._run, None
        if self._progressCallback:
            self._progressCallback(1.0, "Importing the result into the scene")
            slicer.app.processEvents()
        try:
            result = self._finished(run.finish())
        except Exception as exc:  # noqa: BLE001 -- every failure goes to the caller's completion callback
            self._complete(None, exc)
            return
        self._complete(result, None)

    def _finished(self, result):
        self.lastResult = result
        self.showAttention()
        logger.info(resultLine(result))
        return result

    def _complete(self, result, error):
        callback, self._completionCallback, self._progressCallback = self._completionCallback, None, None
        if callback:
            callback(result, error)
        elif error is not None and not isinstance(error, Cancelled):
            logger.error("Segmentation failed: %s", error)

    def _installTorch(self, askConfirmation):
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise UserError("PyTorch is not installed and the PyTorch extension is missing",
                            "this module installs PyTorch through that extension",
                            "install 'PyTorch' from the Extensions Manager, restart Slicer, try again") from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=askConfirmation, torchVersionRequirement=runner.TORCH_REQUIREMENT)
        if torch is None:
            raise UserError("PyTorch was not installed", "the installation was declined or failed",
                            "install it in the PyTorch Utils module, then try again")

    def _pipInstall(self, requirements, askConfirmation):
        try:
            from slicer.packaging import pip_ensure  # Slicer 5.10 and newer: checks, asks, installs
        except ImportError:
            pip_ensure = None
        try:
            if pip_ensure is not None:
                pip_ensure(list(requirements), prompt_install=askConfirmation, requester=REQUESTER,
                           skip_in_testing=False)
                return
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    "Segmenting the pancreas needs these Python packages, which will be installed now:\n"
                    + "\n".join(requirements), REQUESTER):
                raise RuntimeError("declined")
            slicer.util.pip_install(list(requirements))
        except RuntimeError:
            raise UserError(f"Python packages not installed: {', '.join(requirements)}",
                            "the installation was declined", "click Segment Pancreas again and accept") from None
        except subprocess.CalledProcessError as exc:
            raise UserError(f"installing {', '.join(requirements)} failed", f"pip exited with status {exc.returncode}",
                            "check the network connection; the Python console shows pip's log") from None


def firstCT():
    """The first scalar volume that is not one of this module's attention maps (None if there is none)."""
    from AttentionUNetSegLib.mrml_bridge import OUTPUT_ATTRIBUTE

    for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
        if not node.GetAttribute(OUTPUT_ATTRIBUTE):
            return node
    return None


def outputOfAnotherInput(segmentationNode, volumeNode):
    """Whether a segmentation this module made belongs to another CT than ``volumeNode``."""
    from AttentionUNetSegLib.mrml_bridge import INPUT_ROLE

    if segmentationNode is None:
        return False
    madeFor = segmentationNode.GetNodeReferenceID(INPUT_ROLE)
    return madeFor is not None and (volumeNode is None or madeFor != volumeNode.GetID())


def pythonExecutable():
    """Slicer's own Python (PythonSlicer): the child process sees Slicer's packages, torch included."""
    return shutil.which("PythonSlicer") or sys.executable


def resultLine(result):
    return f"Pancreas {result.volume_ml:.1f} mL; {result.seconds:.0f} s on {result.device}"


class AttentionUNetSegTest(ScriptedLoadableModuleTest):
    """Real inference on the CPU on Slicer's sample abdominal CT; nothing is mocked and nothing skipped."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentPancreasOnSampleCT()

    def test_SegmentPancreasOnSampleCT(self):
        logic = AttentionUNetSegLogic()
        logic.installDependencies(askConfirmation=False)
        self.delayDisplay(f"Loading {SAMPLE_CT}")
        try:
            volume = logic.loadSampleCT()
        except UserError as exc:
            self.fail(f"the self-test needs the sample CT and could not get it: {exc}")

        self.delayDisplay("Segmenting on the CPU")
        first = logic.segmentPancreas(volume, device="cpu")
        self.assertPlausibleResult(volume, first)

        self.delayDisplay("Second run reuses the nodes")
        nodeIDs = sceneNodeIDs()
        second = logic.segmentPancreas(volume, device="cpu", quality="fast")
        self.assertEqual(sceneNodeIDs(), nodeIDs)
        self.assertIs(second.outputs.segmentation_node, first.outputs.segmentation_node)
        self.assertEqual({n: node.GetID() for n, node in second.outputs.attention_nodes.items()},
                         {n: node.GetID() for n, node in first.outputs.attention_nodes.items()})

        self.delayDisplay("Cancel leaves the scene unchanged")
        self.assertCancelLeavesSceneUnchanged(logic, volume, second)
        self.delayDisplay("Test passed")

    def assertPlausibleResult(self, volume, result):
        segmentation = result.outputs.segmentation_node
        segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pancreas")
        self.assertTrue(segmentId, "the segmentation has no Pancreas segment")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        volumeMl = np.count_nonzero(mask) * np.prod(volume.GetSpacing()) / 1000.0
        self.assertTrue(20.0 <= volumeMl <= 300.0, f"implausible pancreas volume {volumeMl:.1f} mL")

        heatmap = result.outputs.attention_nodes["combined"]
        values = slicer.util.arrayFromVolume(heatmap)
        self.assertGreaterEqual(float(values.min()), 0.0)
        self.assertLessEqual(float(values.max()), 1.0)
        self.assertEqual(heatmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        np.testing.assert_allclose(ijkToRas(heatmap), ijkToRas(volume), atol=1e-3)
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            self.assertEqual(composite.GetForegroundVolumeID(), heatmap.GetID())
            self.assertGreater(composite.GetForegroundOpacity(), 0.0)

    def assertCancelLeavesSceneUnchanged(self, logic, volume, previous):
        before = sceneState(previous)
        outcome = []
        progressed = []
        logic.segmentPancreas(volume, device="cpu", waitForCompletion=False,
                              progressCallback=lambda fraction, text: progressed.append(fraction),
                              completionCallback=lambda result, error: outcome.append(error))
        while logic.running and not progressed:  # cancel once the child is working
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertTrue(logic.running, "the run ended before it could be cancelled")
        logic.cancel()
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0], Cancelled)
        self.assertEqual(sceneState(previous), before)


def sceneNodeIDs():
    scene = slicer.mrmlScene
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def sceneState(result):
    """Node IDs plus the voxels of a result, to tell whether a run changed the scene."""
    segmentation = result.outputs.segmentation_node
    segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pancreas")
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId)
    heatmap = slicer.util.arrayFromVolume(result.outputs.attention_nodes["combined"])
    return sceneNodeIDs(), int(np.count_nonzero(mask)), float(heatmap.sum())


def ijkToRas(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])
