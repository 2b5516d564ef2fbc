"""The Slicer module file and its panel outside Slicer: widgets, parameters, the Slicer 5.8 GUI-tag workaround,
the help text and the self-test's rules.

No Slicer application runs here and the module file imports qt, so it is read as source: a widget renamed in
the .ui but not in the code, a parameter bound to a widget of the wrong class, or a self-test that installs
packages is caught before a user's Slicer does. Where Slicer behaves differently from plain Python (5.8's
``connectGui``), that behaviour is imitated from Slicer's own source.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from AttentionUNetSegLib import model_card, mrml_bridge, protocol

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "AttentionUNetSeg"
MODULE_FILE = MODULE_DIR / "AttentionUNetSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AttentionUNetSeg.ui"
MODULE_TREE = ast.parse(MODULE_FILE.read_text())


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {widget.get("name"): widget for widget in root.iter("widget")}


def slicer_parameter_name(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


def widget_property(widget: ET.Element, name: str) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return next(iter(prop)).text
    return None


# Widgets the module code drives directly, and the class each must have for that code to work.
EXPECTED_WIDGET_CLASSES = {
    "applyButton": "QPushButton",
    "loadSampleButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "resultLabel": "QLabel",
    "gpuLabel": "QLabel",
    "settingsCollapsibleButton": "ctkCollapsibleButton",
    "attentionMapComboBox": "QComboBox",
    "attentionOpacitySlider": "ctkSliderWidget",
    "attentionColorMapComboBox": "QComboBox",
    "inputVolumeSelector": "qMRMLNodeComboBox",
    "show3DButton": "qMRMLSegmentationShow3DButton",  # Slicer's standard Show 3D button
    "modelComboBox": "QComboBox",
    "casesLabel": "QLabel",
    "casesListWidget": "QListWidget",
    "addCaseButton": "QPushButton",
    "removeCaseButton": "QPushButton",
    "finetuneMinutesSpinBox": "QSpinBox",
    "finetuneButton": "QPushButton",
    "finetuneStatusLabel": "QLabel",
}


def test_every_widget_the_module_uses_exists_in_the_ui_with_the_expected_class():
    widgets = ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text()))
    assert used, "the module uses no widget?"
    missing = sorted(used - set(widgets))
    assert not missing, f"the module uses widgets the .ui lacks: {missing}"
    assert used <= set(EXPECTED_WIDGET_CLASSES), f"add the new widgets to EXPECTED_WIDGET_CLASSES: {used}"
    for name in used:
        assert widgets[name].get("class") == EXPECTED_WIDGET_CLASSES[name], name


def parameter_annotations() -> dict[str, str]:
    """Parameter name -> its annotation's source text, from the module's parameterNodeWrapper class."""
    tree = ast.parse(MODULE_FILE.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "AttentionUNetSegParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)
    return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}


def widget_class_for(annotation: str) -> set[str]:
    """The widget classes Slicer's parameterNodeWrapper connects to a parameter of this type."""
    if annotation.startswith("vtkMRML"):
        return {"qMRMLNodeComboBox"}
    if annotation == "bool":
        return {"QCheckBox", "QPushButton"}
    if annotation.startswith("Annotated[float") and "WithinRange" in annotation:
        return {"ctkSliderWidget", "QDoubleSpinBox"}
    if annotation.startswith("Annotated[str") and "Choice(" in annotation:
        return {"QComboBox"}
    raise AssertionError(f"no known widget for a parameter of type {annotation}")


def test_every_parameter_is_bound_to_one_widget_of_a_class_that_can_show_it():
    parameters = parameter_annotations()
    bound = {}
    for widget in ui_widgets().values():
        parameter = slicer_parameter_name(widget)
        if parameter:
            assert parameter not in bound, f"{parameter} is bound to two widgets"
            bound[parameter] = widget
    assert set(bound) == set(parameters)
    for parameter, widget in bound.items():
        assert widget.get("class") in widget_class_for(parameters[parameter]), (parameter, widget.get("class"))
        if widget.get("class") == "QPushButton":
            assert widget_property(widget, "checkable") == "true", f"{parameter}: a bool needs a checkable button"


def test_node_selectors_offer_the_node_types_of_their_parameters():
    parameters = parameter_annotations()
    for widget in ui_widgets().values():
        parameter = slicer_parameter_name(widget)
        if widget.get("class") == "qMRMLNodeComboBox":
            types = [s.text for s in widget.find("property[@name='nodeTypes']/stringlist")]
            assert types == [parameters[parameter]]


def test_output_selector_offers_one_create_new_segmentation_entry():
    """The 'none' entry creates a new segmentation; the selector's own 'Create new Segmentation' is off."""
    selector = ui_widgets()["outputSegmentationSelector"]
    assert widget_property(selector, "noneEnabled") == "true"
    assert widget_property(selector, "noneDisplay") == "Create new segmentation"
    assert widget_property(selector, "addEnabled") == "false"




def test_module_title_category_and_self_test():
    text = MODULE_FILE.read_text()
    assert 'self.parent.title = _("Pancreas Attention U-Net")' in text
    # Slicer's own category name, translated in Slicer's context, so the module stays in the same menu
    assert 'self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]' in text
    assert "Oktay" in text and "Research use only" in text
    test = class_def("AttentionUNetSegTest")
    assert [ast.unparse(b) for b in test.bases] == ["ScriptedLoadableModuleTest"]
    assert "CTAAbdomenPanoramix" in text


def test_the_self_test_installs_nothing_and_asserts_no_unmeasured_volume_range():
    """In testing mode nothing is pip-installed (Slicer's own rule for tests); the volume is checked against the
    child's own report and the segment, not against a range nobody measured on the sample; the only way out
    of the real inference is a skip when a package is missing (the Extensions Index's build machines)."""
    test = class_def("AttentionUNetSegTest")
    called = {ast.unparse(n.func) for n in ast.walk(test) if isinstance(n, ast.Call)}
    assert not [c for c in called if re.search(r"install|pip", c, re.IGNORECASE)], called
    bounds = [ast.unparse(n) for n in ast.walk(test) if isinstance(n, ast.Compare)
              and any(isinstance(side, ast.Constant) and isinstance(side.value, (int, float)) and side.value > 1
                      for side in (n.left, *n.comparators))]
    assert not bounds, f"a hard-coded bound in the self-test: {bounds}"
    names = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(test) if isinstance(n, ast.Attribute)}
    assert not [name for name in names if re.search(r"environ|getenv", name, re.IGNORECASE)]
    skips = [n for n in ast.walk(test) if isinstance(n, ast.If) and "skipTest" in ast.unparse(n)
             and not any(isinstance(inner, ast.If) and "skipTest" in ast.unparse(inner) for inner in n.body)]
    assert [ast.unparse(n.test) for n in skips] == ["missing"]
    assert "missing = dependencies.missing_packages()" in ast.unparse(test)
    assert {"assertCancelEndsTheRun", "tree_alive", "CANCEL_LIMIT_SECONDS"} <= names


USER_TEXT_ATTRIBUTES = {"text", "toolTip", "title", "acknowledgementText"}
USER_TEXT_CALLS = {"tryWithErrorDisplay", "errorDisplay", "confirmOkCancelDisplay", "on_progress"}


def untranslated_user_texts(tree: ast.AST) -> list[str]:
    """Literal texts the panel shows that do not go through Slicer's ``_()``, and ``_()`` of a non-literal
    (Qt's translation tools extract only literals, so an f-string inside ``_()`` is never translated)."""
    def is_literal(node):
        return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)
                                                   and node.value.strip())

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr in USER_TEXT_ATTRIBUTES
                                                for t in node.targets):
            found += [ast.unparse(part) for part in _direct_parts(node.value) if is_literal(part)]
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in USER_TEXT_CALLS:
                found += [ast.unparse(arg) for arg in node.args if is_literal(arg)]
            if name == "_" and not (len(node.args) == 1 and isinstance(node.args[0], ast.Constant)):
                found.append(ast.unparse(node))
    return found


def _direct_parts(value: ast.AST) -> list[ast.AST]:
    """The pieces of a shown value that are shown as they are: the value itself, both arms of ``a if c else b``,
    both sides of ``a + b`` (not the arguments of a call such as ``_()``)."""
    if isinstance(value, ast.IfExp):
        return _direct_parts(value.body) + _direct_parts(value.orelse)
    if isinstance(value, ast.BinOp):
        return _direct_parts(value.left) + _direct_parts(value.right)
    return [value]


def test_every_text_the_panel_shows_goes_through_slicers_translation():
    widget_and_logic = [class_def(name) for name in ("AttentionUNetSeg", "AttentionUNetSegWidget",
                                                      "AttentionUNetSegLogic")]
    help_text = next(n for n in MODULE_TREE.body if isinstance(n, ast.FunctionDef) and n.name == "helpText")
    untranslated = [text for tree in (*widget_and_logic, help_text) for text in untranslated_user_texts(tree)]
    assert not untranslated, f"wrap these in _(): {untranslated}"
    returned = next(n.value for n in ast.walk(help_text) if isinstance(n, ast.Return))
    assert all(not isinstance(part, (ast.Constant, ast.JoinedStr)) for part in _direct_parts(returned))


def test_the_control_catches_an_untranslated_text():
    tree = ast.parse('self.ui.statusLabel.text = f"Failed: {error}"\nself.ui.x.toolTip = _("a") if r else "b"\n'
                     'slicer.util.errorDisplay("Oops")\nself.ui.y.text = _(f"{n} done")\nself.ui.z.text = _("ok")')
    assert untranslated_user_texts(tree) == ["f'Failed: {error}'", "'b'", "'Oops'", "_(f'{n} done')"]


def test_reload_forgets_the_lib_so_that_its_edits_take_effect():
    """Slicer's Reload re-executes the module file only; a Lib module still in ``sys.modules`` would be the old one."""
    import sys

    import AttentionUNetSegLib.runner

    seen_at_reload = []

    class ScriptedLoadableModuleWidget:  # Slicer's: re-executes the module file, which imports the Lib again
        @staticmethod
        def onReload(widget):
            seen_at_reload.extend(name for name in sys.modules if name.startswith("AttentionUNetSegLib"))

    namespace = {"sys": sys, "ScriptedLoadableModuleWidget": ScriptedLoadableModuleWidget,
                 "LIB_PACKAGE": "AttentionUNetSegLib"}
    on_reload = module_function("onReload", namespace)
    kept = dict(sys.modules)
    try:
        on_reload(object())
    finally:
        sys.modules.update(kept)  # the other tests keep the modules they imported
    assert "AttentionUNetSegLib.runner" in kept and not seen_at_reload
    assert sys.modules["AttentionUNetSegLib.runner"] is AttentionUNetSegLib.runner


def test_only_the_module_file_touches_qt_ctk_or_the_slicer_application():
    offenders = []
    for path in (MODULE_DIR / "AttentionUNetSegLib").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"^\s*(import|from)\s+(qt|ctk)\b|\bslicer\.app\b", text, re.MULTILINE):
            offenders.append(path.relative_to(REPO).as_posix())
    assert not offenders


def test_the_panel_offers_the_engines_maps_and_the_bridges_colours():
    from AttentionUNetSegLib import engine

    parameters = parameter_annotations()
    assert protocol.ATTENTION_MAP_NAMES == engine.ATTENTION_MAP_NAMES
    assert mrml_bridge.ATTENTION_SCALE == engine.ATTENTION_SCALE
    assert parameters["attentionMap"] == "Annotated[str, Choice(list(protocol.ATTENTION_MAP_NAMES))]"
    assert parameters["attentionColorMap"] == "Annotated[str, Choice(list(mrml_bridge.ATTENTION_COLOUR_MAPS))]"


def test_help_text_shows_the_model_card_summary_escaped_without_markdown():
    card = ("# Pancreas model\n\nA 3D Attention U-Net trained on 3 CTs <small>, **not accurate yet**, see `info`."
            "\n\n## Training\n\nDetails.\n\n## Limitations\n\n- adults only\n- contrast-enhanced CT\n")
    html = model_card.model_card_summary_html(card)
    assert "trained on 3 CTs &lt;small&gt;, <b>not accurate yet</b>, see <code>info</code>." in html
    assert "<b>Limitations:</b><br>- adults only<br>- contrast-enhanced CT" in html
    assert "Details" not in html and "*" not in html


def test_the_bundled_card_summary_has_no_literal_markdown():
    html = model_card.model_card_summary_html(model_card.model_card_text())
    assert html and "**" not in html and "`" not in html


# --- Slicer 5.8: connectGui returns None ---------------------------------------------------------------


class ComboBox:
    """A QComboBox as the parameterNodeWrapper's connectors see it: ``clear()`` emits index -1, the first
    ``addItem`` index 0 (Qt's QComboBoxPrivate::_q_modelReset and insertItem)."""

    def __init__(self):
        self.items: list[str] = []
        self.currentIndex = -1
        self.listeners: list = []

    def clear(self):
        self.items = []
        self._set(-1)

    def addItem(self, text):
        self.items.append(text)
        if self.currentIndex == -1:
            self._set(0)

    def _set(self, index):
        self.currentIndex = index
        for listener in list(self.listeners):
            listener()


class ComboBoxConnector:
    """Slicer 5.8.1 guiConnectors.QComboBoxToStringableConnector: rebuilds the items when made (:377),
    reads choices[currentIndex] (:391)."""

    def __init__(self, widget, choices):
        self.widget, self.choices, self.callback = widget, choices, None
        widget.listeners.append(self._changed)
        widget.clear()
        for choice in choices:
            widget.addItem(choice)

    def _changed(self):
        if self.callback is not None:
            self.callback()

    def onChanged(self, callback):
        self.callback = callback

    def read(self):
        return self.choices[self.widget.currentIndex]

    def write(self, value):
        self.widget.currentIndex = self.choices.index(value)


class ParameterNode58:
    """The parameterNodeWrapper of Slicer 5.8.1 (wrapper.py): ``_connectParametersToGui`` keeps the new
    connectors under ``_nextParameterGUIsTag`` and returns it, but ``_connectGui`` drops that return (:253)."""

    returns_tag = False

    def __init__(self, device="CPU"):
        self._parameterGUIs = {}
        self._nextParameterGUIsTag = 0
        self.values = {"device": device}
        self.choices = {"device": ["Auto", "GPU", "CPU"]}

    def _connectParametersToGui(self, widgets):
        connectors = {name: ComboBoxConnector(widget, self.choices[name]) for name, widget in widgets.items()}
        tag = self._nextParameterGUIsTag
        self._nextParameterGUIsTag += 1
        self._parameterGUIs[tag] = connectors
        for name, connector in connectors.items():
            connector.write(self.values[name])
            connector.onChanged(self._writer(name, connector))
        return tag

    def _writer(self, name, connector):
        def write():
            self.values[name] = connector.read()
        return write

    def connectGui(self, ui):
        tag = self._connectParametersToGui({"device": ui.deviceComboBox})
        return tag if self.returns_tag else None

    def disconnectGui(self, tag):
        if tag in self._parameterGUIs:
            for connector in self._parameterGUIs.pop(tag).values():
                connector.onChanged(None)


class ParameterNode510(ParameterNode58):
    """Slicer 5.10 and newer: ``connectGui`` returns the tag (commit b5a65a49a0)."""

    returns_tag = True


class PanelUi:
    def __init__(self):
        self.deviceComboBox = ComboBox()


class Widget:
    """The module widget's state that ``setParameterNode`` touches, with VTK observers left out."""

    def __init__(self):
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.ui = PanelUi()

    def addObserver(self, *args):
        pass

    removeObserver = addObserver

    def onParameterChanged(self, *args):
        pass


def class_def(name: str) -> ast.ClassDef:
    return next(n for n in MODULE_TREE.body if isinstance(n, ast.ClassDef) and n.name == name)


def module_function(name: str, namespace: dict):
    """A function of the module file, compiled from its source (the file itself imports qt and slicer)."""
    nodes = [n for n in ast.walk(MODULE_TREE) if isinstance(n, ast.FunctionDef) and n.name == name]
    code = compile(ast.Module(body=nodes[:1], type_ignores=[]), str(MODULE_FILE), "exec")
    exec(code, namespace)  # noqa: S102 -- this repository's own module source
    return namespace[name]


@pytest.fixture()
def set_parameter_node():
    vtk = type("vtk", (), {"vtkCommand": type("vtkCommand", (), {"ModifiedEvent": "ModifiedEvent"})})
    namespace = {"vtk": vtk}
    module_function("connectGuiWithTag", namespace)
    return module_function("setParameterNode", namespace)


@pytest.mark.parametrize("node_class", [ParameterNode58, ParameterNode510], ids=["Slicer 5.8", "Slicer 5.10+"])
def test_module_reentry_keeps_the_chosen_device_and_one_connection(set_parameter_node, node_class):
    """What Slicer does on every module enter/exit and scene close: connect, disconnect, connect again."""
    widget, node = Widget(), node_class(device="CPU")
    for _ in range(4):  # enter, exit, enter, ...
        set_parameter_node(widget, node)
        set_parameter_node(widget, None)
    set_parameter_node(widget, node)

    assert node.values["device"] == "CPU"
    assert len(node._parameterGUIs) == 1, "old connections were never removed"
    assert widget.ui.deviceComboBox.items == ["Auto", "GPU", "CPU"]
    assert widget.ui.deviceComboBox.currentIndex == 2


def test_the_imitation_shows_the_58_bug_without_the_workaround():
    """Without the recorded tag, Slicer 5.8 resets the device on re-entry: the imitation must show it, or the
    test above proves nothing."""
    ui, node = PanelUi(), ParameterNode58(device="CPU")
    tag = node.connectGui(ui)
    node.disconnectGui(tag)  # tag is None: nothing is disconnected
    node.connectGui(ui)
    assert node.values["device"] == "Auto" and len(node._parameterGUIs) == 2


def test_a_new_input_resets_only_an_output_made_for_another_ct():
    """M5: an output the user picked stays; only choosing another input CT resets it."""
    source = ast.unparse(next(n for n in ast.walk(class_def("AttentionUNetSegWidget"))
                              if isinstance(n, ast.FunctionDef) and n.name == "onParameterChanged"))
    reset = source.index("parameters.outputSegmentation = None")
    assert source.index("if inputID != self._shownInputID") < reset


def method_source(class_name: str, method: str) -> str:
    return ast.unparse(next(n for n in ast.walk(class_def(class_name))
                            if isinstance(n, ast.FunctionDef) and n.name == method))


def test_a_click_during_the_import_cannot_start_a_second_run():
    """M3: the run stays current (and the button disabled) until its completion callback ran; the callbacks
    travel with the run, not with the logic."""
    poll = method_source("AttentionUNetSegLogic", "_poll")
    assert poll.index("self.importing = True") < poll.index("slicer.app.processEvents()") < poll.index("finish()")
    assert "self._run = None" not in poll
    complete = method_source("AttentionUNetSegLogic", "_complete")
    assert complete.index("self._run = None") < complete.index("run.on_complete(result, error)")
    apply = method_source("AttentionUNetSegWidget", "onApplyButton")
    assert apply.index("if self.logic.importing:") < apply.index("self.logic.cancel()")
    button = method_source("AttentionUNetSegWidget", "updateApplyButton")
    assert button.index("if self.logic.importing or fineTuning:") < button.index("self.ui.applyButton.enabled = False")
    assert "_completionCallback" not in MODULE_FILE.read_text()


def test_dependencies_are_installed_outside_the_wait_cursor():
    """L10: confirmation dialogs never appear under a wait cursor."""
    apply = method_source("AttentionUNetSegWidget", "onApplyButton")
    install = apply.index("installDependencies")
    assert "waitCursor=True" not in apply[:install] and apply.index("waitCursor=True") > install
