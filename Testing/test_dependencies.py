"""What the child needs in Slicer's Python and installing it: one check, and each installer's answers as the
user meets them (the PyTorch extension and ``slicer.packaging`` stood in for as their source at the tags
behaves: SlicerPyTorch PyTorchUtils.py:194-225, Slicer v5.12.0 packaging.py:329-444)."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import slicer

from AttentionUNetSegLib import dependencies
from AttentionUNetSegLib.errors import UserError


@pytest.fixture()
def hidden(monkeypatch):
    """Make packages unimportable, as in a Slicer whose Python lacks them."""
    def hide(*names):
        for name in names:
            monkeypatch.setitem(sys.modules, name, None)
    return hide


@pytest.fixture()
def installers(monkeypatch):
    """The PyTorch extension and Slicer's pip helpers, recording what they are asked; ``answers`` sets what
    each does: "install", "decline", or an exception to raise."""
    calls, answers = [], {"torch": "install", "pip": "install"}

    def answer(kind, result):
        calls.append(kind)
        outcome = answers[kind]
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome == "decline":
            if kind == "torch":
                return None  # installTorch returns None when the user declines
            raise RuntimeError(dependencies.DECLINED)
        return result

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            calls.append(("torch", askConfirmation, torchVersionRequirement))
            return answer("torch", types.ModuleType("torch"))

    def pip_ensure(requirements, prompt_install, requester):
        calls.append(("pip_ensure", list(requirements), prompt_install, requester))
        return answer("pip", None)

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(pip_ensure=pip_ensure))
    return calls, answers


def test_missing_packages_lists_what_cannot_be_imported_torch_first(hidden):
    assert dependencies.missing_packages() == []
    hidden("safetensors", "torch")
    assert dependencies.missing_packages() == ["torch>=2.1,<3", "safetensors>=0.4"]


def test_torch_comes_from_the_pytorch_extension_and_the_rest_from_pip(hidden, installers):
    calls, _ = installers
    hidden("torch", "safetensors")
    dependencies.install_missing(ask=True)
    assert ("torch", True, ">=2.1,<3") in calls
    assert ("pip_ensure", ["safetensors>=0.4"], True, dependencies.REQUESTER) in calls


def test_nothing_is_asked_when_nothing_is_missing(installers):
    calls, _ = installers
    dependencies.install_missing(ask=True)
    assert calls == []


@pytest.mark.parametrize(("kind", "missing"), [("torch", "torch"), ("pip", "safetensors")])
def test_a_declined_installation_says_declined(hidden, installers, kind, missing):
    _, answers = installers
    answers[kind] = "decline"
    hidden(missing)
    with pytest.raises(UserError, match="declined"):
        dependencies.install_missing(ask=True)


def test_another_pip_error_is_not_called_declined(hidden, installers):
    """L5: Slicer 5.12 raises RuntimeError for a second non-blocking install too (packaging.py:635)."""
    _, answers = installers
    answers["pip"] = RuntimeError("A non-blocking pip_install is already in progress.")
    hidden("safetensors")
    with pytest.raises(UserError) as raised:
        dependencies.install_missing(ask=True)
    assert "declined" not in str(raised.value) and "already in progress" in str(raised.value)


def test_a_failed_installer_is_one_line_with_its_status(hidden, installers):
    _, answers = installers
    answers["torch"] = subprocess.CalledProcessError(1, "pip")
    hidden("torch")
    with pytest.raises(UserError, match="installing PyTorch failed; the installer exited with status 1"):
        dependencies.install_missing(ask=False)


def test_without_the_pytorch_extension_the_user_is_told_to_install_it(hidden, monkeypatch):
    hidden("torch", "PyTorchUtils")
    with pytest.raises(UserError, match="the PyTorch extension is missing"):
        dependencies.install_missing(ask=True)


def test_before_slicer_5_12_pip_install_runs_after_the_users_ok(hidden, monkeypatch):
    """Slicer 5.8 and 5.10 have no slicer.packaging: confirm, then slicer.util.pip_install."""
    hidden("safetensors", "slicer.packaging")
    asked, installed = [], []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, title: asked.append(text) or True,
                        raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", installed.append)
    dependencies.install_missing(ask=True)
    assert installed == [["safetensors>=0.4"]] and "safetensors>=0.4" in asked[0]
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, title: False, raising=False)
    with pytest.raises(UserError, match="declined"):
        dependencies.install_missing(ask=True)
