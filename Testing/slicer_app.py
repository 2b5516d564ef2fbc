"""3D Slicer's Python environment outside the application, faithful where our code touches it.

The real ``slicer`` of the application is not slicer-core's. slicer-core flattens every library it wraps
into one ``slicer`` package (vtkTeem, vtkITK, vtkRemoteIO and slicer.util's functions included); the
application fills ``slicer`` from a fixed list of kits and leaves the rest as top-level modules
(``import vtkTeem``). :func:`install` builds the application's namespace from slicer-core's compiled
classes, kit by kit, with what Slicer adds at start-up, and makes it *the* ``slicer`` of this process:

- the kits, from each class's module of origin against Slicer's kit list (v5.8.1-v5.12.0
  ``Base/Python/CMakeLists.txt``, ``Slicer_PYTHON_MODULES_CONFIG``: mrml = MRMLCLI, MRMLCore,
  MRMLDisplayableManager, MRMLLogic; vtkAddon; vtkSegmentationCore; logic = vtkSlicerBaseLogic), plus the
  loadable modules' libraries (``Base/QTCore/qSlicerScriptedUtils.cxx``, ``importModulePythonExtensions``:
  ``vtkSlicer*Module{Logic,MRML,MRMLDisplayableManager,VTKWidgets}Python``);
- vtkTeem, vtkITK, mrml, vtkAddon, vtkSegmentationCore as top-level modules (``Base/Python/*.py``);
- Slicer's own ``slicer.util`` (slicer-core ships the application's file);
- ``slicer.mrmlScene`` as the application sets it up: the colour nodes of the Colors module, the
  segmentation converter rules of the Segmentations module and three slice views' composite nodes,
  singletons that survive ``mrmlScene.Clear()``;
- small stand-ins for what needs the Qt application, each with a control test in ``test_slicer_app.py``:
  ``slicer.app`` (``processEvents`` runs due ``qt.QTimer`` callbacks, ``temporaryPath``, no layout),
  ``qt.QTimer``, ``slicer.i18n``, ``slicer.parameterNodeWrapper`` (the decorator only),
  ``slicer.ScriptedLoadableModule`` and ``slicer.testing`` (as at v5.12.0), ``SampleData`` (a local CT
  instead of a download: no network here), and ``PythonSlicer`` on PATH (a launcher that runs the real
  Python as its child, like CTK's AppLauncher).

Slicer's pure-Python files are read at the tags for their behaviour; none is copied here.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.machinery
import importlib.util
import os
import pkgutil
import re
import shutil
import sys
import tempfile
import time
import types
import unittest
from pathlib import Path
from typing import ClassVar

# Slicer_PYTHON_MODULES_CONFIG (v5.8.1 Base/Python/CMakeLists.txt:28, v5.12.0 :30), as slicer-core names
# the Python modules of those libraries; the PythonQt kits have no classes outside the application.
APPLICATION_KITS = frozenset({
    "MRMLCLI", "MRMLCore", "MRMLDisplayableManager", "MRMLLogic",  # mrml.py
    "vtkAddonPython",  # vtkAddon.py
    "vtkSegmentationCore",  # vtkSegmentationCore.py
    "vtkSlicerBaseLogic",  # slicer/logic.py
})
LOADABLE_MODULE_KIT = re.compile(r"vtkSlicer\w+Module(Logic|MRML|MRMLDisplayableManager|VTKWidgets)")
# Base/Python/{mrml,vtkAddon,vtkSegmentationCore,vtkITK,vtkTeem}.py: importable on their own in Slicer.
TOP_LEVEL_MODULES = {
    "mrml": ("MRMLCLI", "MRMLCore", "MRMLDisplayableManager", "MRMLLogic"),
    "vtkAddon": ("vtkAddonPython",),
    "vtkSegmentationCore": ("vtkSegmentationCore",),
    "vtkITK": ("vtkITK",),
    "vtkTeem": ("vtkTeem",),
}
SLICE_VIEWS = ("Red", "Yellow", "Green")  # the conventional layout's slice views
SAMPLE_DATA: dict[str, Path] = {}  # sample name -> local file that SampleData "downloads"


def slicer_core_kits() -> list[str]:
    """The Python modules of the libraries slicer-core wraps (its package's extension modules)."""
    import slicer_core

    return sorted({info.name for info in pkgutil.iter_modules(slicer_core.__path__)
                   if not info.name.startswith("lib")})  # libX.so: the C++ libraries behind them


def in_application_namespace(kit: str) -> bool:
    return kit in APPLICATION_KITS or LOADABLE_MODULE_KIT.fullmatch(kit) is not None


def kit_module(kit: str) -> types.ModuleType:
    return importlib.import_module(f"slicer_core.{kit}")


def public_names(module: types.ModuleType) -> dict:
    """What ``from module import *`` brings (how Slicer fills its namespace from a kit)."""
    return {name: value for name, value in vars(module).items() if not name.startswith("_")}


def slicer_core_version() -> str:
    from importlib import metadata

    return metadata.version("slicer-core")


# --- qt: timers that run when the application processes its events -----------------------------------


class QTimer:
    """``qt.QTimer`` as our code uses it; its timeouts run in :meth:`Application.processEvents`."""

    _active: ClassVar[list[QTimer]] = []  # the application's running timers

    def __init__(self):
        self.interval = 0
        self.singleShot_ = False
        self._slots: list = []
        self._due = None

    def setInterval(self, msec):
        self.interval = msec

    def setSingleShot(self, single):
        self.singleShot_ = single

    def connect(self, signal, slot):
        if signal != "timeout()":
            raise ValueError(f"QTimer has no signal {signal}")
        self._slots.append(slot)

    def start(self, msec=None):
        if msec is not None:
            self.interval = msec
        self._due = time.monotonic() + self.interval / 1000.0
        if self not in QTimer._active:
            QTimer._active.append(self)

    def stop(self):
        self._due = None
        if self in QTimer._active:
            QTimer._active.remove(self)

    def isActive(self):
        return self._due is not None

    @staticmethod
    def singleShot(msec, slot):
        timer = QTimer()
        timer.setSingleShot(True)
        timer.connect("timeout()", slot)
        timer.start(msec)

    def _fire_if_due(self, now):
        if self._due is None or now < self._due:
            return
        if self.singleShot_:
            self.stop()
        else:
            self._due = now + self.interval / 1000.0
        for slot in list(self._slots):
            slot()


class Application:
    """``slicer.app`` as a module without a GUI meets it: events, a temporary folder, the settings file's path (a
    folder of this run's, as a fresh Slicer's), testing mode."""

    def __init__(self, temporary_path: str, testing: bool):
        self.temporaryPath = temporary_path
        self.slicerUserSettingsFilePath = str(Path(temporary_path) / "settings" / "Slicer.ini")
        self._testing = testing

    def processEvents(self):
        now = time.monotonic()
        for timer in list(QTimer._active):
            timer._fire_if_due(now)

    def testingEnabled(self):
        return self._testing

    def layoutManager(self):
        return None  # no views are rendered here; the slice views' MRML nodes are in the scene


# --- slicer.* pure-Python pieces ---------------------------------------------------------------------


class ScriptedLoadableModule:
    """v5.12.0 ScriptedLoadableModule.py:17-56: the module registers its self-test by its class name."""

    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""
        sys.modules["slicer"].selfTests[self.moduleName] = self.runTest

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

    def runTest(self, msec=100, **kwargs):
        """v5.12.0 :72-85: the ``<ModuleName>Test`` class of the module, its ``runTest``."""
        module = importlib.import_module(self.__module__)
        test_case = getattr(module, self.moduleName + "Test")()
        test_case.messageDelay = msec
        test_case.runTest(**kwargs)


class ScriptedLoadableModuleWidget:
    """The panel needs Qt: only what a class definition and a logic-only test need of it."""

    def __init__(self, parent=None):
        self.parent = parent


class ScriptedLoadableModuleLogic:
    """v5.12.0 :296-365: a singleton ``vtkMRMLScriptedModuleNode`` per module as its parameter node."""

    def __init__(self, parent=None):
        self.moduleName = self.__class__.__name__.removesuffix("Logic")
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        scene = sys.modules["slicer"].mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = sys.modules["slicer"].vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    """v5.12.0 :367-507: a TestCase whose ``runTest`` runs every method with "test" in its name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.moduleTestNames = [name for name in dir(self) if "test" in name and callable(getattr(self, name))]

    def delayDisplay(self, message, requestedDelay=None, msec=None):
        msec = getattr(self, "messageDelay", None) or msec or requestedDelay or 100
        sys.modules["slicer"].util.delayDisplay(message, msec)

    def runTest(self):
        self.setUpClass()
        for name in self.moduleTestNames:
            self.setUp()
            getattr(self, name)()
            self.tearDown()
        self.tearDownClass()


def run_unit_test(path, testname):
    """v5.12.0 slicer/testing.py ``runUnitTest``: what the ``py_<Module>`` ctest runs (unittest's loader and
    runner; a failure raises, a skip passes)."""
    sys.path.extend([path] if isinstance(path, str) else path)
    suite = unittest.TestLoader().loadTestsFromName(testname)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    if not result.wasSuccessful():
        raise Exception("")  # noqa: TRY002 -- what slicer.testing.exitFailure raises


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


def parameter_node_wrapper(cls):
    """The decorator at class definition; the GUI binding needs Qt and is not stood in for."""
    return cls


class SampleDataLogic:
    """``SampleData.SampleDataLogic().downloadSample(name)``: a local file instead of a download."""

    def downloadSample(self, name):
        if name not in SAMPLE_DATA:
            raise ValueError(f"unknown sample data set: {name}")
        slicer = sys.modules["slicer"]
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(SAMPLE_DATA[name]))
        if not storage.ReadData(node):
            raise RuntimeError(f"could not read {SAMPLE_DATA[name]}")
        node.SetAndObserveStorageNodeID(storage.GetID())
        node.CreateDefaultDisplayNodes()
        return node


# --- PythonSlicer --------------------------------------------------------------------------------------

LAUNCHER = """\
#!{python}
# Like CTK's AppLauncher installed as PythonSlicer: runs the real interpreter as its own child with stdio
# passed straight through (QProcess::ForwardedChannels), and exits with the child's status. It ignores SIGTERM
# too, which the real launcher does not: Cancel must end the tree whatever the launcher does with it.
import os, signal, subprocess, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([{python!r}, *sys.argv[1:]])
if {pid_file!r}:
    with open({pid_file!r}, "w") as f:
        f.write(str(child.pid))
sys.exit(child.wait())
"""


def write_launcher(folder: Path, pid_file: Path | None = None, python: str = sys.executable) -> Path:
    """A ``PythonSlicer`` in ``folder`` running ``python``; it writes the real Python's PID to ``pid_file``."""
    script = Path(folder) / "PythonSlicer"
    script.write_text(LAUNCHER.format(python=python, pid_file=str(pid_file or "")))
    script.chmod(0o755)
    return script


# --- the namespace -----------------------------------------------------------------------------------


def application_scene():
    """A scene as the application holds it after start-up (Colors and Segmentations module logic, three
    slice views); its slice composite nodes are singletons, so ``Clear()`` keeps them, as in Slicer."""
    import slicer_core

    scene = slicer_core.vtkMRMLScene()
    colors = slicer_core.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)  # adds the default colour nodes, as the Colors module does
    segmentations = slicer_core.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)  # registers the converter rules, as the Segmentations module does
    for view in SLICE_VIEWS:
        composite = slicer_core.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(view)
        composite.SetSingletonTag(view)
        scene.AddNode(composite)
    return scene, {"colors": colors, "segmentations": segmentations}


def _module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    vars(module).update(attributes)
    sys.modules[name] = module
    return module


def _load_slicer_util() -> types.ModuleType:
    """slicer-core's ``slicer/util.py``, the application's own file, as ``slicer.util`` of this namespace."""
    package = importlib.machinery.PathFinder.find_spec("slicer")  # slicer-core's flat package, never imported
    path = Path(package.submodule_search_locations[0]) / "util.py"
    spec = importlib.util.spec_from_file_location("slicer.util", path)
    util = importlib.util.module_from_spec(spec)
    sys.modules["slicer.util"] = util
    spec.loader.exec_module(util)
    return util


def application_namespace(temporary_path: str, testing: bool = True) -> types.ModuleType:
    """The ``slicer`` module of the application (see the module docstring); not installed."""
    namespace = types.ModuleType("slicer")
    namespace.__path__ = []  # a package: slicer.util and the stand-ins are its submodules
    for kit in slicer_core_kits():
        if in_application_namespace(kit):
            vars(namespace).update(public_names(kit_module(kit)))
    namespace.app = Application(temporary_path, testing)
    namespace.mrmlScene, logics = application_scene()
    namespace.modules = types.SimpleNamespace(**{
        name: types.SimpleNamespace(logic=lambda logic=logic: logic) for name, logic in logics.items()})
    namespace.selfTests = {}
    return namespace


def install(temporary_path: str | None = None, testing: bool = True, bin_dir: Path | None = None,
            python: str = sys.executable) -> types.ModuleType:
    """Make this process's ``slicer`` (and ``qt``, ``ctk``, ``vtkTeem``, ``SampleData``, ...) the application's.

    Call it before anything imports ``slicer``. With ``bin_dir``, a ``PythonSlicer`` running ``python`` is
    written there and put first on PATH, as Slicer puts its own bin folder.
    """
    if "slicer" in sys.modules and getattr(sys.modules["slicer"], "_application_stand_in", False):
        return sys.modules["slicer"]
    if temporary_path is None:
        temporary_path = tempfile.mkdtemp(prefix="slicer-app-")
        atexit.register(shutil.rmtree, temporary_path, ignore_errors=True)
    namespace = application_namespace(temporary_path, testing)
    namespace._application_stand_in = True
    sys.modules["slicer"] = namespace
    for name, kits in TOP_LEVEL_MODULES.items():
        _module(name, **{k: v for kit in kits for k, v in public_names(kit_module(kit)).items()})
    _module("qt", QTimer=QTimer)
    _module("ctk")
    namespace.util = _load_slicer_util()
    namespace.i18n = _module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
    namespace.parameterNodeWrapper = _module("slicer.parameterNodeWrapper", parameterNodeWrapper=parameter_node_wrapper,
                                             Choice=Choice, WithinRange=WithinRange)
    namespace.ScriptedLoadableModule = _module(
        "slicer.ScriptedLoadableModule", ScriptedLoadableModule=ScriptedLoadableModule,
        ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest=ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget)
    namespace.testing = _module("slicer.testing", runUnitTest=run_unit_test)
    _module("SampleData", SampleDataLogic=SampleDataLogic)
    if bin_dir is not None:
        write_launcher(bin_dir, python=python)
        os.environ["PATH"] = os.pathsep.join((str(bin_dir), os.environ.get("PATH", "")))
    return namespace
