"""The ``attention-unet-seg`` console script: the runtime's ``segment`` and ``info`` plus the tools."""

from __future__ import annotations

import signal
import sys

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
    "finetune": "AttentionUNetSegTools.finetune_command",
    "site-experiment": "AttentionUNetSegTools.site_experiment",
}


# Outputs the tools add to ``segment``: modules with add_segment_arguments(parser) and segment_outputs(args).
SEGMENT_EXTRAS = ("AttentionUNetSegTools.dicom_seg",)


def main(argv: list[str] | None = None) -> int:
    try:
        from AttentionUNetSegLib import cli  # SimpleITK and numpy: the first 0.2 s of every command
    except KeyboardInterrupt:  # Ctrl-C before the runtime's own handling is loaded: nothing started, no traceback
        return 128 + signal.SIGINT  # the shell's status for Ctrl-C, as the runtime's cli.EXIT_INTERRUPTED
    return cli.main(argv, COMMAND_MODULES, SEGMENT_EXTRAS)


if __name__ == "__main__":
    sys.exit(main())
