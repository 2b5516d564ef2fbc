"""The ``attention-unet-seg`` console script: the runtime's ``segment`` and ``info`` plus the tools."""

from __future__ import annotations

import sys

from AttentionUNetSegLib import cli

# Each module has ``add_arguments(parser)`` and ``run(args) -> int``; only the one used is imported.
COMMAND_MODULES = {
    "demo": "AttentionUNetSegTools.demo",
    "train": "AttentionUNetSegTools.training.command",
    "evaluate": "AttentionUNetSegTools.evaluation",
    "serve": "AttentionUNetSegTools.webapp.command",
    "synth": "AttentionUNetSegTools.synthesis.command",
    "batch": "AttentionUNetSegTools.batch.command",
    "calibrate": "AttentionUNetSegTools.calibration",
    "ablate": "AttentionUNetSegTools.training.ablation",
}


# Outputs the tools add to ``segment``: modules with add_segment_arguments(parser) and segment_outputs(args).
SEGMENT_EXTRAS = ("AttentionUNetSegTools.dicom_seg",)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, COMMAND_MODULES, SEGMENT_EXTRAS)


if __name__ == "__main__":
    sys.exit(main())
