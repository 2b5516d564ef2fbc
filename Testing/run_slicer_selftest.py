"""Run the module's self-test as the ``py_AttentionUNetSeg`` ctest runs it in Slicer, outside the application.

Slicer runs ``Slicer --testing --python-code "import slicer.testing; slicer.testing.runUnitTest([...],
'AttentionUNetSeg')"`` (v5.12.0 CMake/SlicerMacroPythonTesting.cmake:93). Here the application's namespace
comes from :mod:`slicer_app`, the module is instantiated as Slicer's module factory does at start-up, and the
same ``runUnitTest`` runs its test case. Exit status 0 when the test passed or skipped.

    python Testing/run_slicer_selftest.py --sample-ct CT [--module-dir DIR] [--without torch,safetensors]

``--without`` makes packages unimportable, as in the Python of the Extensions Index's build machines, which
never install torch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE_NAME = "AttentionUNetSeg"
SAMPLE_CT = "CTAAbdomenPanoramix"  # what the self-test downloads in Slicer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-ct", type=Path, required=True, help=f"the local file standing for {SAMPLE_CT}")
    parser.add_argument("--module-dir", type=Path, default=HERE.parent / MODULE_NAME)
    parser.add_argument("--without", default="", help="comma-separated packages to make unimportable")
    args = parser.parse_args(argv)
    for package in filter(None, args.without.split(",")):
        sys.modules[package] = None  # import fails; importlib.util.find_spec returns None
    sys.path.insert(0, str(HERE))
    import slicer_app

    work = Path(tempfile.mkdtemp(prefix="slicer-selftest-"))
    (work / "bin").mkdir()
    slicer = slicer_app.install(str(work), testing=True, bin_dir=work / "bin")
    slicer_app.SAMPLE_DATA[SAMPLE_CT] = args.sample_ct
    sys.path.insert(0, str(args.module_dir))
    module = __import__(MODULE_NAME)
    parent = types.SimpleNamespace(path=str(args.module_dir / f"{MODULE_NAME}.py"))
    getattr(module, MODULE_NAME)(parent)  # Slicer instantiates every module at start-up
    print(f"slicer-core {slicer_app.slicer_core_version()}; module {MODULE_NAME}: {parent.title}", flush=True)
    try:
        slicer.testing.runUnitTest([str(args.module_dir)], MODULE_NAME)
    except Exception:  # noqa: BLE001 -- runUnitTest's failure: unittest printed what failed
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
