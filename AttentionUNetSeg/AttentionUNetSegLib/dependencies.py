"""What the panel's child process imports from Slicer's Python, and installing what is missing there.

Slicer-side: installing uses the PyTorch extension, ``slicer.packaging`` (Slicer 5.12+) or
``slicer.util.pip_install`` (5.8, 5.10), imported only when called, so this module imports in a plain venv.
torch comes through the PyTorch extension, which picks a CUDA build for the machine's driver; Slicer bundles
numpy and SimpleITK, so a first run installs only safetensors. Never slicer-core or vtk.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess

from .errors import UserError

REQUESTER = "Pancreas Attention U-Net"  # how Slicer's install dialog names who asks
TORCH_REQUIREMENT = "torch>=2.1,<3"
PIP_REQUIREMENTS = (
    "numpy>=1.24",
    "SimpleITK>=2.3",
    "safetensors>=0.4",
)
DECLINED = "User declined package installation"  # pip_ensure's RuntimeError (v5.12.0 packaging.py:444)


def import_name(requirement: str) -> str:
    """``"SimpleITK>=2.3"`` -> ``"SimpleITK"`` (for these packages the import name is the distribution name)."""
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]


def missing_packages() -> list[str]:
    """The requirements Slicer's Python cannot import, torch first; nothing is imported to find out."""
    return [requirement for requirement in (TORCH_REQUIREMENT, *PIP_REQUIREMENTS)
            if importlib.util.find_spec(import_name(requirement)) is None]


def install_missing(ask: bool = True) -> None:
    """Install what :func:`missing_packages` lists, asking first when ``ask``: torch through the PyTorch
    extension, the rest with pip. Raises ``UserError`` when an installation is declined or fails."""
    missing = missing_packages()
    if missing and missing[0] == TORCH_REQUIREMENT:
        _install_torch(ask)
        missing = missing[1:]
    if missing:
        _pip_install(missing, ask)


def _install_torch(ask: bool) -> None:
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        raise UserError("PyTorch is not installed and the PyTorch extension is missing",
                        "this module installs PyTorch through that extension",
                        "install 'PyTorch' from the Extensions Manager, restart Slicer, try again") from None
    try:  # SlicerPyTorch PyTorchUtils.py:194: installTorch(askConfirmation, ..., torchVersionRequirement)
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=ask, torchVersionRequirement=TORCH_REQUIREMENT[len("torch"):])
    except subprocess.CalledProcessError as exc:
        raise UserError("installing PyTorch failed", f"the installer exited with status {exc.returncode}",
                        "check the network connection; the Python console shows the installer's log") from None
    if torch is None:
        raise UserError("PyTorch was not installed", "the installation was declined",
                        "click Segment Pancreas again and accept, or install it in the PyTorch Utils module")


def _pip_install(requirements: list[str], ask: bool) -> None:
    import slicer

    names = ", ".join(requirements)
    declined = UserError(f"Python packages not installed: {names}", "the installation was declined",
                         "click Segment Pancreas again and accept")
    try:
        try:
            from slicer.packaging import pip_ensure  # Slicer 5.12 and newer: checks, asks, installs
        except ImportError:  # 5.8 and 5.10
            if ask and not slicer.util.confirmOkCancelDisplay(
                    f"Segmenting the pancreas needs these Python packages, which will be installed now:\n{names}",
                    REQUESTER):
                raise declined from None
            slicer.util.pip_install(requirements)
        else:
            pip_ensure(requirements, prompt_install=ask, requester=REQUESTER)
    except RuntimeError as exc:
        if str(exc) == DECLINED:
            raise declined from None
        raise UserError(f"installing {names} failed", str(exc),
                        "try again once any other installation has ended") from None
    except subprocess.CalledProcessError as exc:
        raise UserError(f"installing {names} failed", f"pip exited with status {exc.returncode}",
                        "check the network connection; the Python console shows pip's log") from None
