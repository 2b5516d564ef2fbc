"""3D Slicer module "Pancreas Attention U-Net": a thin shell over AttentionUNetSegLib.

The panel, the logic facade for scripts and the self-test live here; the Qt timers and the Slicer application
are touched only here. Everything else -- the child process that runs the network, its protocol, importing
its result into the scene, installing packages -- is in ``AttentionUNetSegLib`` (``runner``, ``protocol``,
``mrml_bridge``, ``dependencies``), tested outside Slicer; the self-test runs outside Slicer too
(``Testing/run_slicer_selftest.py``). This file must stay importable at Slicer start-up without torch.
"""

import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
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

from AttentionUNetSegLib import dependencies, mrml_bridge, protocol, runner, user_cases
from AttentionUNetSegLib.errors import Cancelled, UserError
from AttentionUNetSegLib.model_card import model_card_summary_html, model_card_text

SAMPLE_CT = "CTAAbdomenPanoramix"
POLL_INTERVAL_MS = 100
DEVICE_CHOICES = {"Auto": "auto", "GPU": "cuda", "CPU": "cpu"}  # panel label -> protocol --device
USER_FOLDER = "AttentionUNetSeg"  # beside Slicer's settings file: the user's cases and fine-tuned models
WARNING_STYLE = "color: #c46a00"  # a result to check; readable on light and dark themes
LIB_PACKAGE = "AttentionUNetSegLib"  # reloaded with this file
CANCEL_LIMIT_SECONDS = 2.0  # the self-test's bound for Cancel to end the whole process tree
logger = logging.getLogger(__name__)


class AttentionUNetSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Pancreas Attention U-Net")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["AttentionUNetSeg contributors (https://github.com/attentionunetseg)"]
        self.parent.helpText = helpText()
        self.parent.acknowledgementText = _(
            "<p>The network follows the 3D Attention U-Net of Oktay O, Schlemper J, Le Folgoc L, et al. "
            '"Attention U-Net: Learning Where to Look for the Pancreas." Medical Imaging with Deep Learning '
            '(MIDL) 2018, <a href="https://arxiv.org/abs/1804.03999">arXiv:1804.03999</a>. '
            "Please cite it when you use this module.</p>"
            "<p>Built on PyTorch (through the PyTorch extension by F. Perez-Garcia and A. Lasso), SimpleITK "
            "and 3D Slicer.</p>"
        )


def helpText() -> str:
    card = model_card_text()
    model = (model_card_summary_html(card) if card
             else _("<p>No trained model is bundled with this copy; segmenting will say so.</p>"))
    return _(
        "<p>Segments the pancreas in an abdominal CT with a 3D Attention U-Net and shows the attention-gate "
        "coefficients as a heatmap: where the network looked.</p>"
        "<p>Select a CT and click <b>Segment Pancreas</b>. The result is a <i>Pancreas</i> segment, a verdict "
        "(ok, check, or no pancreas found) and the attention map of the chosen gate; the attention display "
        "settings change the views only, never the result. Inference runs in a separate process: the "
        "application stays responsive and the run can be cancelled. PyTorch (through the PyTorch extension, "
        "which imports it once into Slicer to install it) and safetensors are installed on first use, after "
        "you confirm.</p>"
    ) + model + _(
        "<p>Limits: trained for adult abdominal CT in Hounsfield units; other modalities, children, or a "
        "pancreas outside the field of view give unreliable results. Always review the segmentation.</p>"
        "<p><b>Research use only.</b> Not for clinical decisions.</p>"
        '<p>More: <a href="https://github.com/attentionunetseg/SlicerAttentionUNetSeg">project page</a>.</p>'
    )


@parameterNodeWrapper
class AttentionUNetSegParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode  # None: a new one (reused on the next run of the same CT)
    device: Annotated[str, Choice(list(DEVICE_CHOICES))] = "Auto"
    quality: Annotated[str, Choice(list(protocol.QUALITY_CHOICES))] = "full"
    showAttention: bool = True
    attentionMap: Annotated[str, Choice(list(protocol.ATTENTION_MAP_NAMES))] = "combined"
    attentionOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    attentionColorMap: Annotated[str, Choice(list(mrml_bridge.ATTENTION_COLOUR_MAPS))] = "Heat"


def connectGuiWithTag(parameterNode, ui):
    """``parameterNode.connectGui(ui)`` and the tag that disconnects it again, in every Slicer version.

    Slicer 5.8 computes the tag but returns None (fixed in 5.10, commit b5a65a49a0). Without the tag the old
    connections stay: they pile up, and rebuilding the combo boxes makes them write stale choices back.
    """
    nextTag = getattr(parameterNode, "_nextParameterGUIsTag", None)
    tag = parameterNode.connectGui(ui)
    return tag if tag is not None else nextTag


class AttentionUNetSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._gpuQuery = None
        self._shownInputID = None  # the input the output selector was last checked against

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AttentionUNetSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AttentionUNetSegLogic()
        self._sceneChangeTimer = qt.QTimer()  # node events come in bursts (a DICOM load): handle each burst once
        self._sceneChangeTimer.setSingleShot(True)
        self._sceneChangeTimer.setInterval(0)
        self._sceneChangeTimer.connect("timeout()", self.updateInputChoices)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodesChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSampleButton)
        self.ui.settingsCollapsibleButton.connect("contentsCollapsed(bool)", self.onSettingsCollapsed)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.modelComboBox.connect("activated(int)", self.onModelChosen)

        self.initializeParameterNode()
        self.updateInputChoices()
        self.updateLearning()

    def onReload(self):
        """Slicer's Reload re-reads this file only: forget the Lib too, so that edits to it take effect."""
        for name in [name for name in sys.modules if name.partition(".")[0] == LIB_PACKAGE]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self):
        """Slicer is closing or the module is reloaded: end a running child process tree."""
        self.logic.cancel()
        self.logic.discardResult()
        if self._gpuQuery is not None:
            self._gpuQuery.stop()
        self.setParameterNode(None)
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.logic.cancel()
        self.logic.discardResult()
        self.ui.show3DButton.setSegmentationNode(None)
        self.ui.show3DButton.enabled = False
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.updateInputChoices()

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
            self._parameterNodeGuiTag = connectGuiWithTag(self._parameterNode, self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
            self.onParameterChanged()

    def onParameterChanged(self, caller=None, event=None):
        """Display settings apply to the last result at once; another gate is imported from the run's files,
        never computed again."""
        parameters = self._parameterNode
        inputID = parameters.inputVolume.GetID() if parameters.inputVolume else None
        if inputID != self._shownInputID:  # only a new input resets an output the user chose
            self._shownInputID = inputID
            if outputOfAnotherInput(parameters.outputSegmentation, parameters.inputVolume):
                parameters.outputSegmentation = None  # never write into another CT's result unasked
        self.updateApplyButton()
        for widget in (self.ui.attentionMapComboBox, self.ui.attentionOpacitySlider,
                       self.ui.attentionColorMapComboBox):
            widget.enabled = parameters.showAttention
        if self.logic.hasResult() and not self.logic.busy:
            with slicer.util.tryWithErrorDisplay(_("Could not show the attention map.")):
                self.logic.showAttention(parameters.attentionMap, parameters.showAttention,
                                         parameters.attentionOpacity, parameters.attentionColorMap)

    def updateApplyButton(self):
        fineTuning = self.logic.running == "finetune"
        self.ui.finetuneButton.text = _("Cancel") if fineTuning else _("Fine-tune")
        self.ui.finetuneButton.enabled = fineTuning or (not self.logic.busy and bool(self.logic.caseNames()))
        if self.logic.importing or fineTuning:  # a click now would start a second run
            self.ui.applyButton.text = _("Importing...") if self.logic.importing else _("Segment Pancreas")
            self.ui.applyButton.enabled = False
        elif self.logic.running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the segmentation; the scene stays as it was.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.text = _("Segment Pancreas")
            ready = self._parameterNode is not None and self._parameterNode.inputVolume is not None
            self.ui.applyButton.toolTip = _("Segment the pancreas in the input CT.") if ready else _("Select a CT first.")
            self.ui.applyButton.enabled = ready

    def onNodesChanged(self, caller=None, event=None):
        self._sceneChangeTimer.start()

    def updateInputChoices(self):
        """Offer only plain CT volumes as input (no label maps, no attention maps), and the sample when none."""
        volumes = slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
        hidden = [node.GetID() for node in volumes if not runner.is_ct_candidate(node)]
        self.ui.inputVolumeSelector.sortFilterProxyModel().hiddenNodeIDs = hidden
        self.ui.loadSampleButton.visible = len(hidden) == len(volumes)

    def onLoadSampleButton(self):
        with slicer.util.tryWithErrorDisplay(_("Could not load the sample CT."), waitCursor=True):
            self._parameterNode.inputVolume = self.logic.loadSampleCT()

    def onSettingsCollapsed(self, collapsed):
        """Ask which GPU torch sees when the user first looks at the device setting (a child process)."""
        if collapsed or self._gpuQuery is not None:
            return
        if dependencies.TORCH_REQUIREMENT in dependencies.missing_packages():
            self.ui.gpuLabel.text = _("GPU: not known yet; PyTorch is installed on first use (the PyTorch "
                                      "extension picks a CUDA build when it finds an NVIDIA driver).")
            return
        self.ui.gpuLabel.text = _("GPU: checking...")
        try:
            query = runner.GpuQuery(pythonExecutable())
        except UserError as exc:
            self.ui.gpuLabel.text = _("GPU: not known ({reason})").format(reason=exc)
            return
        self._gpuQuery = query
        self._pollGpuQuery(query)

    def _pollGpuQuery(self, query):
        if not query.done:
            qt.QTimer.singleShot(POLL_INTERVAL_MS, lambda: self._pollGpuQuery(query))
            return
        self.ui.gpuLabel.text = _("GPU: {answer}").format(answer=query.answer())

    def onApplyButton(self):
        if self.logic.importing:
            return
        if self.logic.running:
            self.logic.cancel()
            return
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed.")):
            self.logic.installDependencies(askConfirmation=True)  # its dialogs without a wait cursor
        if dependencies.missing_packages():
            return
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            self.showResultLine("", warning=False)
            self.logic.segmentPancreas(
                parameters.inputVolume, parameters.outputSegmentation,
                device=DEVICE_CHOICES[parameters.device], quality=parameters.quality,
                attentionMap=parameters.attentionMap, weights=self.chosenWeights(), waitForCompletion=False,
                progressCallback=self.onProgress, completionCallback=self.onCompleted,
            )
        self.updateApplyButton()

    def onProgress(self, fraction, text):
        self.ui.progressBar.value = round(100 * fraction)
        self.ui.statusLabel.text = text
        self.updateApplyButton()

    def showResultLine(self, text, warning):
        self.ui.resultLabel.text = text
        self.ui.resultLabel.styleSheet = WARNING_STYLE if warning else ""

    def onCompleted(self, result, error):
        self.updateApplyButton()
        if isinstance(error, Cancelled):
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled; the scene is as it was.")
        elif error is not None:
            self.ui.statusLabel.text = _("Failed: {error}").format(error=error)
            if not isinstance(error, UserError):
                logger.error("Segmentation failed", exc_info=error)
            slicer.util.errorDisplay(_("Segmentation failed: {error}").format(error=error))
        elif not result.found:
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s on {device}; nothing was added.").format(
                seconds=result.seconds, device=result.device)
            self.showResultLine(result.summary(), warning=True)
        else:
            self.ui.statusLabel.text = _("Done in {seconds:.0f} s on {device} with the {model} model.").format(
                seconds=result.seconds, device=result.device, model=self.ui.modelComboBox.currentText)
            self.showResultLine(result.summary(), warning=result.needs_checking)
            self.ui.show3DButton.setSegmentationNode(result.outputs.segmentation_node)
            self.ui.show3DButton.enabled = True
            self.logic.getParameterNode().outputSegmentation = result.outputs.segmentation_node
            if self._parameterNode:
                self.onParameterChanged()
        self._gpuQuery = None  # torch may have been installed just now: ask again
        self.onSettingsCollapsed(self.ui.settingsCollapsibleButton.collapsed)


    # --- learning from the user's corrections ----------------------------------------------------------

    def updateLearning(self):
        """The saved cases, the fine-tune button and the model choice, as they are on disk."""
        names = self.logic.caseNames()
        self.ui.casesListWidget.clear()
        for name in names:
            self.ui.casesListWidget.addItem(name)
        self.ui.casesLabel.text = _("{count} corrected cases saved in {folder}").format(
            count=len(names), folder=self.logic.caseLibrary().cases_dir)
        self.ui.removeCaseButton.enabled = bool(names)
        chosen = self.chosenWeights()
        self.ui.modelComboBox.clear()
        self.ui.modelComboBox.addItem(_("bundled"), "")
        for model in self.logic.fineTunedModels():
            self.ui.modelComboBox.addItem(model.describe(), str(model.weights))
        if chosen is not None and self.ui.modelComboBox.findData(str(chosen)) < 0:
            self.ui.modelComboBox.addItem(chosen.name, str(chosen))
        self.ui.modelComboBox.addItem(_("Weights file..."), None)
        self.ui.modelComboBox.currentIndex = max(self.ui.modelComboBox.findData(str(chosen) if chosen else ""), 0)
        self.updateApplyButton()

    def chosenWeights(self):
        """The weights Segment Pancreas uses: None for the bundled model."""
        data = self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex)
        return Path(data) if data else None

    def onModelChosen(self, index):
        if self.ui.modelComboBox.itemData(index) is not None:
            return
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Weights file"), "", "safetensors (*.safetensors)")
        self.ui.modelComboBox.currentIndex = 0
        if path:
            self.ui.modelComboBox.insertItem(1, Path(path).name, path)
            self.ui.modelComboBox.currentIndex = 1

    def onAddCase(self):
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Could not add the case."), waitCursor=True):
            if parameters.inputVolume is None or parameters.outputSegmentation is None:
                raise UserError("no corrected segmentation to add", "a case is a CT and its Pancreas segment",
                                "segment the pancreas, correct it in the Segment Editor, then add it")
            name = self.logic.addCase(parameters.inputVolume, parameters.outputSegmentation)
            self.ui.finetuneStatusLabel.text = _("Saved as {name}.").format(name=name)
        self.updateLearning()

    def onRemoveCase(self):
        item = self.ui.casesListWidget.currentItem()
        if item is None or not slicer.util.confirmOkCancelDisplay(
                _("Remove the case {name} from your saved cases?").format(name=item.text())):
            return
        with slicer.util.tryWithErrorDisplay(_("Could not remove the case.")):
            self.logic.removeCase(item.text())
        self.updateLearning()

    def onFinetuneButton(self):
        if self.logic.running == "finetune":
            self.logic.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("Fine-tuning failed."), waitCursor=True):
            self.ui.progressBar.value = 0
            self.ui.finetuneStatusLabel.text = _("Starting...")
            self.logic.fineTune(minutes=self.ui.finetuneMinutesSpinBox.value,
                                device=DEVICE_CHOICES[self._parameterNode.device], weights=self.chosenWeights(),
                                waitForCompletion=False, progressCallback=self.onFinetuneProgress,
                                completionCallback=self.onFinetuned)
        self.updateApplyButton()

    def onFinetuneProgress(self, fraction, text):
        self.ui.progressBar.value = round(100 * fraction)
        self.ui.finetuneStatusLabel.text = text
        self.updateApplyButton()

    def onFinetuned(self, model, error):
        if isinstance(error, Cancelled):
            self.ui.progressBar.value = 0
            self.ui.finetuneStatusLabel.text = _("Cancelled; the best weights so far are kept and Fine-tune "
                                                 "resumes from them only in a new run.")
        elif error is not None:
            self.ui.finetuneStatusLabel.text = _("Failed: {error}").format(error=error)
            slicer.util.errorDisplay(_("Fine-tuning failed: {error}").format(error=error))
        self.updateLearning()
        if model is not None:
            self.ui.modelComboBox.currentIndex = self.ui.modelComboBox.findData(str(model.weights))
            self.ui.finetuneStatusLabel.text = _("Done: {model}. Segment Pancreas now uses it (Settings > "
                                                 "Model); its verdict is never ok until calibrated.").format(
                model=model.describe())


class AttentionUNetSegLogic(ScriptedLoadableModuleLogic):
    """Segmentation without the GUI, for the panel, scripts and tests (see :meth:`segmentPancreas`)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastResult = None  # runner.RunResult of the last finished run
        self._run = None  # the run from start until its completion callback has run
        self.importing = False
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._poll)

    def getParameterNode(self):
        return AttentionUNetSegParameterNode(super().getParameterNode())

    @property
    def running(self):
        """What runs: "segmentation", "finetune", or None."""
        if self._run is None:
            return None
        return "finetune" if isinstance(self._run, runner.FinetuneRun) else "segmentation"

    @property
    def busy(self):
        return self.running or self.importing

    def hasResult(self):
        """Whether the last result's nodes are all still in the scene (the user may have deleted some)."""
        if self.lastResult is None or self.lastResult.outputs is None:
            return False
        outputs = self.lastResult.outputs
        nodes = [outputs.segmentation_node, *outputs.attention_nodes.values()]
        return all(slicer.mrmlScene.IsNodePresent(node) for node in nodes)

    def discardResult(self):
        """Forget the last result and remove the files of its maps not imported yet (scene close, reload)."""
        if self.lastResult is not None:
            self.lastResult.discard_files()
        self.lastResult = None

    def installDependencies(self, askConfirmation=True):
        """Install what the segmentation needs and Slicer's Python lacks (torch through the PyTorch extension,
        then safetensors), each after asking when ``askConfirmation``; raises ``UserError`` if one is declined
        or fails."""
        dependencies.install_missing(ask=askConfirmation)

    def segmentPancreas(self, volumeNode, segmentationNode=None, device="auto", quality="full",
                        attentionMap="combined", weights=None, waitForCompletion=True, progressCallback=None,
                        completionCallback=None):
        """Segment the pancreas in ``volumeNode`` into ``segmentationNode`` (None: a new or the previous one).

        :param device: "auto", "cpu", "cuda" or "cuda:N".
        :param quality: "full" or "fast".
        :param attentionMap: the map imported at once; the run keeps the other gates' maps, which
            :meth:`showAttention` imports when first shown.
        :param weights: a model file (a fine-tuned model's, :meth:`fineTunedModels`); None: the bundled model.
        :param progressCallback: ``progressCallback(fraction, text)`` as the child process reports.
        :param completionCallback: without waiting, called with ``(runner.RunResult, None)`` or
            ``(None, exception)`` (``Cancelled`` after :meth:`cancel`).
        :return: with ``waitForCompletion`` the ``runner.RunResult`` (raises ``UserError`` on bad input or a
            failed run, the scene unchanged); without, None at once. When no pancreas was found
            (``result.found`` False) nothing is added to the scene.
        """
        if self.busy:
            raise UserError("a segmentation is already running", "", "wait for it to finish or cancel it")
        missing = dependencies.missing_packages()
        if missing:
            raise UserError(f"Python packages missing: {', '.join(missing)}", "they are installed on first use",
                            "click Segment Pancreas in the module panel, or call logic.installDependencies()")
        run = runner.SegmentationRun(slicer.mrmlScene, volumeNode, segmentationNode, device=device,
                                     quality=quality, shown_map=attentionMap, weights=weights,
                                     python=pythonExecutable(), work_root=slicer.app.temporaryPath)
        self.discardResult()
        return self._launch(run, waitForCompletion, progressCallback, completionCallback)

    def caseLibrary(self):
        """The user's saved cases and fine-tuned models (in Slicer's settings folder)."""
        return user_cases.CaseLibrary(Path(slicer.app.slicerUserSettingsFilePath).parent / USER_FOLDER)

    def caseNames(self):
        return self.caseLibrary().case_names()

    def addCase(self, volumeNode, segmentationNode):
        """Save the CT and the segmentation's Pancreas segment, as corrected, as a case to learn from;
        returns its name (raises ``UserError`` for an empty or missing segment)."""
        return self.caseLibrary().add_case(volumeNode, segmentationNode)

    def removeCase(self, name):
        self.caseLibrary().remove_case(name)

    def fineTunedModels(self):
        """The models fine-tuned on the saved cases (``user_cases.FinetunedModel``), newest first."""
        return self.caseLibrary().models()

    def fineTune(self, minutes=10.0, device="auto", weights=None, steps=None, waitForCompletion=True,
                 progressCallback=None, completionCallback=None):
        """Fine-tune the model (``weights``; None: the bundled one) on the saved cases for at most ``minutes``
        in a child process, into a new model folder; arguments as for :meth:`segmentPancreas`. Returns (or
        passes to ``completionCallback``) the new ``user_cases.FinetunedModel``. Cancel ends the process tree."""
        if self.busy:
            raise UserError("a segmentation or fine-tune is already running", "", "wait for it or cancel it")
        library = self.caseLibrary()
        if not library.case_names():
            raise UserError("there are no saved cases to learn from", "",
                            "correct a segmentation, then click Add this case")
        missing = dependencies.missing_packages()
        if missing:
            raise UserError(f"Python packages missing: {', '.join(missing)}", "they are installed on first use",
                            "click Segment Pancreas once, or call logic.installDependencies()")
        run = runner.FinetuneRun(library.cases_dir, library.new_model_dir(), minutes=minutes, device=device,
                                 weights=weights, steps=steps, python=pythonExecutable())
        return self._launch(run, waitForCompletion, progressCallback, completionCallback)

    def _launch(self, run, waitForCompletion, progressCallback, completionCallback):
        run.start()
        logger.info("Running %s", " ".join(run.command))
        if waitForCompletion:
            def report(progress):
                if progressCallback:
                    progressCallback(progress.fraction, progress.text)

            return self._finished(run, run.wait(report, idle=slicer.app.processEvents))
        run.on_progress = progressCallback
        run.on_complete = completionCallback
        self._run = run
        self._timer.start()
        return None

    def cancel(self):
        """End the running segmentation's or fine-tune's whole process tree; the scene stays as it was (a
        fine-tune keeps its best weights so far)."""
        if self._run is None or self.importing:
            return
        self._timer.stop()
        run = self._run
        run.cancel()
        self._complete(run, None, Cancelled(f"{self.running} cancelled"))

    def showAttention(self, mapName="combined", visible=True, opacity=0.5, colorMap="Heat"):
        """Show one attention map of the last result over its CT in the slice views (or hide them all).

        A gate not shown before is imported from the run's files (no network runs); returns its node.
        """
        shown = self.lastResult.attention_node(mapName) if visible else None
        for node in self.lastResult.outputs.attention_nodes.values():
            if node is not shown:
                mrml_bridge.show_attention(slicer.mrmlScene, node, visible=False)
        if shown is not None:
            mrml_bridge.show_attention(slicer.mrmlScene, shown, opacity, colour_map=colorMap)
        return shown

    def loadSampleCT(self):
        """Slicer's sample abdominal CT angiography, downloaded once and cached by SampleData."""
        import SampleData

        try:
            loaded = SampleData.SampleDataLogic().downloadSample(SAMPLE_CT)
        except Exception as exc:  # noqa: BLE001 -- any download failure: say so in one line
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise UserError(f"could not download the sample CT {SAMPLE_CT}", reason,
                            "check the network connection, or load a CT of your own") from None
        nodes = loaded if isinstance(loaded, (list, tuple)) else [loaded]
        volume = next((node for node in nodes if node is not None and node.IsA("vtkMRMLScalarVolumeNode")), None)
        if volume is None:
            raise UserError(f"could not download the sample CT {SAMPLE_CT}", "Sample Data returned no volume",
                            "check the network connection, or load a CT of your own")
        return volume

    # --- internals ------------------------------------------------------------------------------------

    def _poll(self):
        run = self._run
        for progress in run.poll():
            if run.on_progress:
                run.on_progress(progress.fraction, progress.text)
        if run.running:
            return
        self._timer.stop()
        self.importing = True  # the run stays current until its completion callback has run
        if run.on_progress:
            run.on_progress(1.0, _("Importing the result into the scene"))
        slicer.app.processEvents()
        try:
            result = self._finished(run, run.finish())
        except Exception as exc:  # noqa: BLE001 -- every failure goes to the caller's completion callback
            self._complete(run, None, exc)
            return
        self._complete(run, result, None)

    def _finished(self, run, result):
        if isinstance(run, runner.FinetuneRun):
            logger.info("Fine-tuned into %s", run.output_dir)
            return user_cases.FinetunedModel(run.output_dir.name, run.output_dir / protocol.FINETUNE_MODEL_FILE,
                                             result)
        self.lastResult = result
        logger.info("%s; %.1f s on %s", result.summary(), result.seconds, result.device)
        return result

    def _complete(self, run, result, error):
        self._run = None
        self.importing = False
        if run.on_complete:
            run.on_complete(result, error)
        elif error is not None and not isinstance(error, Cancelled):
            logger.error("Segmentation failed: %s", error)


def firstCT():
    """The first volume that can be an input CT (no label map, vector, tensor or attention map; None if none)."""
    return next((node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                 if runner.is_ct_candidate(node)), None)


def outputOfAnotherInput(segmentationNode, volumeNode):
    """Whether a segmentation this module made belongs to another CT than ``volumeNode``."""
    if segmentationNode is None:
        return False
    madeFor = segmentationNode.GetNodeReferenceID(mrml_bridge.INPUT_ROLE)
    return madeFor is not None and (volumeNode is None or madeFor != volumeNode.GetID())


def pythonExecutable():
    """Slicer's own Python launcher, PythonSlicer (Slicer puts its folder on PATH): the child sees Slicer's
    packages, torch included. ``sys.executable`` is no fallback: Slicer sets it by the same search."""
    python = shutil.which("PythonSlicer")
    if python is None:
        raise UserError("PythonSlicer was not found", "Slicer runs the segmentation in its own Python launcher",
                        "reinstall Slicer (PythonSlicer belongs in its bin folder)")
    return python


class AttentionUNetSegTest(ScriptedLoadableModuleTest):
    """Real inference on the CPU on Slicer's sample abdominal CT; nothing is mocked.

    It checks what every correct run satisfies -- the result on the input grid and shown, the segment's
    terminology, a verdict, another gate without another run, node reuse, and a Cancel that ends the whole
    process tree at once and changes nothing -- never a volume range nobody measured on this sample. Testing
    mode installs nothing: without PyTorch or safetensors (the Extensions Index's build machines never install
    torch) the test is skipped, saying what is missing; ctest counts a skip as a pass.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentPancreasOnSampleCT()

    def test_SegmentPancreasOnSampleCT(self):
        missing = dependencies.missing_packages()
        if missing:
            self.skipTest(f"needs {', '.join(missing)} in Slicer's Python (install PyTorch with the PyTorch "
                          "Utils module, the rest with slicer.util.pip_install; testing installs nothing)")
        logic = AttentionUNetSegLogic()
        self.delayDisplay(f"Loading {SAMPLE_CT}")
        try:
            volume = logic.loadSampleCT()
        except UserError as exc:
            self.fail(f"the self-test needs the sample CT and could not get it: {exc}")

        self.delayDisplay("Segmenting on the CPU")
        first = logic.segmentPancreas(volume, device="cpu")
        self.assertIn(first.report.qc, ("ok", "check", "not found"))
        self.assertTrue(0.0 <= first.report.confidence <= 1.0)
        if not first.found:
            self.assertIsNone(first.outputs, "no pancreas found, yet something was added to the scene")
            self.delayDisplay(f"The model found no pancreas on {SAMPLE_CT}: only Cancel is left to check")
            self.assertCancelEndsTheRun(logic, volume, None)
            return
        logic.showAttention("combined")
        self.assertResultOnTheInputGrid(volume, first, "combined")

        self.delayDisplay("Another gate at once, from the same run's files")
        self.assertIs(logic.showAttention("level3"), first.attention_node("level3"))
        self.assertFalse(logic.busy, "a gate switch started a run")
        self.assertResultOnTheInputGrid(volume, first, "level3")
        self.assertIs(logic.lastResult.outputs.segmentation_node, first.outputs.segmentation_node)

        self.delayDisplay("Second run into the same segmentation reuses the nodes")
        nodeIDs = sceneNodeIDs()
        second = logic.segmentPancreas(volume, device="cpu", quality="fast")
        self.assertEqual(sceneNodeIDs(), nodeIDs)
        self.assertIs(second.outputs.segmentation_node, first.outputs.segmentation_node)
        self.assertEqual(second.outputs.segmentation_node.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertEqual(second.outputs.attention_nodes["combined"].GetID(),
                         first.outputs.attention_nodes["combined"].GetID())
        logic.showAttention("combined")
        self.assertResultOnTheInputGrid(volume, second, "combined")

        self.delayDisplay("Cancel ends the process tree at once and leaves the scene unchanged")
        self.assertCancelEndsTheRun(logic, volume, second)
        self.delayDisplay("Test passed")

    def assertResultOnTheInputGrid(self, volume, result, mapName):
        segmentation = result.outputs.segmentation_node
        segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pancreas")
        self.assertTrue(segmentId, "the segmentation has no Pancreas segment")
        terminology = vtk.reference("")  # vtkSegment.GetTerminology() arrived only in Slicer 5.10
        segment = segmentation.GetSegmentation().GetSegment(segmentId)
        self.assertTrue(segment.GetTag(segment.GetTerminologyEntryTagName(), terminology))
        self.assertIn("SCT^15776009^Pancreas", str(terminology))
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
        self.assertEqual(mask.shape, slicer.util.arrayFromVolume(volume).shape)
        volumeMl = np.count_nonzero(mask) * np.prod(volume.GetSpacing()) / 1000.0
        self.assertAlmostEqual(volumeMl, result.volume_ml, delta=max(0.01 * result.volume_ml, 0.1))

        heatmap = result.attention_node(mapName)
        values = slicer.util.arrayFromVolume(heatmap)
        self.assertEqual(values.dtype, np.uint8)
        self.assertGreater(int(values.max()), 0)
        self.assertEqual(heatmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(ijkToRas(heatmap)),
                                   slicer.util.arrayFromVTKMatrix(ijkToRas(volume)), atol=1e-3)
        composites = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
        self.assertTrue(composites, "no slice view to show the map in")
        for composite in composites:
            self.assertEqual(composite.GetForegroundVolumeID(), heatmap.GetID(), "the map is not shown")

    def assertCancelEndsTheRun(self, logic, volume, previous):
        before = sceneState(previous)
        outcome = []
        progressed = []
        logic.segmentPancreas(volume, device="cpu", waitForCompletion=False,
                              progressCallback=lambda fraction, text: progressed.append(fraction),
                              completionCallback=lambda result, error: outcome.append(error))
        run = logic._run
        while logic.running and not progressed:  # cancel once the child is working
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertTrue(logic.running, "the run ended before it could be cancelled")
        started = time.monotonic()
        logic.cancel()
        self.assertLess(time.monotonic() - started, CANCEL_LIMIT_SECONDS)
        self.assertFalse(run.child.tree_alive(CANCEL_LIMIT_SECONDS), "a process of the child's tree still runs")
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0], Cancelled)
        self.assertEqual(sceneState(previous), before)


def sceneNodeIDs():
    scene = slicer.mrmlScene
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def sceneState(result):
    """Node IDs plus the voxels of a result (if any), to tell whether a run changed the scene (read without
    adding nodes: arrayFromSegmentBinaryLabelmap would leave a display node behind)."""
    if result is None:
        return sceneNodeIDs()
    segmentation = result.outputs.segmentation_node
    segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("Pancreas")
    mask = slicer.util.arrayFromSegmentInternalBinaryLabelmap(segmentation, segmentId)
    heatmap = slicer.util.arrayFromVolume(result.outputs.attention_nodes["combined"])
    return sceneNodeIDs(), int(np.count_nonzero(mask)), int(heatmap.sum(dtype=np.int64))


def ijkToRas(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix
