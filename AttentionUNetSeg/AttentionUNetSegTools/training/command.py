"""Train a model as a YAML or JSON config says (the bundled model's config is in Resources/Models)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (YAML or JSON); see Resources/Models/*.train.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--output-dir", help="override where checkpoints, logs and curves go")
    parser.add_argument("--init-weights", help="warm start from this model file")


def run(args: argparse.Namespace) -> int:
    from .config import TrainingConfig
    from .loop import train

    config = TrainingConfig.load(args.config)
    for name in ("steps", "output_dir", "init_weights"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    model = train(config, resume=args.resume)
    print(f"trained model: {model}")
    print(f"best by validation Dice: {model.with_name('best.safetensors')}")
    return 0
