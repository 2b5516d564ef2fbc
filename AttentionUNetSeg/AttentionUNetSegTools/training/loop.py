"""The training loop: patches from the configured sources, Dice + cross-entropy, validation on real CT."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from tqdm import tqdm

from AttentionUNetSegLib import imageio
from AttentionUNetSegLib.engine import SegmentationOptions, Segmenter, autocast_dtype, normalise_hu, resolve_device
from AttentionUNetSegLib.errors import UserError
from AttentionUNetSegLib.finetune_data import sample_patch
from AttentionUNetSegLib.network import AttentionUNet3D
from AttentionUNetSegLib.weights import LoadedModel, ModelSpec, load_model, save_model

from ..evaluation import file_case, synthetic_cases
from ..metrics import dice
from .config import TrainingConfig, resolve_path
from .data import build_sources
from .widen import can_widen, widen

LOG_FIELDS = ["step", "loss", "learning_rate", "seconds", "validation"]
GRADIENT_CLIP = 12.0
MAX_SKIPPED_IN_A_ROW = 5  # then the run has diverged: stop rather than log NaN for hours
BATCHNORM_BATCHES = 24
NEGATIVE_HALF_SCORE_ML = 5.0  # validation score of a negative: 1 / (1 + found mL / this)


def train(config: TrainingConfig, resume: bool = False, show_progress: bool = True) -> Path:
    """Train as configured; returns the path of the final model file (:func:`final_weights`; the best by
    validation is kept as ``best``)."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    device = resolve_device(config.device)
    network = _initial_network(config).to(device).to(memory_format=torch.channels_last_3d)  # refused: no output
    out = resolve_path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    train_entries, validation_entries = _label_map_split(config)
    optimizer = _optimizer(config, network)
    clock = TrainingClock(config.time_limit_minutes * 60)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _learning_rate_factor(config, step, clock.fraction()))
    average = _weight_average(network, config.weight_average_decay)
    step = _resume(out, network, optimizer, schedule, clock, average) if resume else 0
    kept = average.module if average else network  # the weights validated and saved
    sources, probabilities = build_sources(config, train_entries)
    validation = _validation_cases(config, validation_entries)
    loss_function = _loss(config.batch_dice, config.dice_background)
    low_precision = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and low_precision == torch.float16)
    best = _best_dice(out)
    patch = tuple(reversed(config.patch_size))
    skipped_in_a_row = 0
    try:
        bar = tqdm(range(step, config.steps), initial=step, total=config.steps, disable=not show_progress)
        for step in bar:
            images, labels = _batch(sources, probabilities, patch, rng, config, device)
            network.train()
            with torch.autocast(device.type, dtype=low_precision, enabled=low_precision is not None):
                logits = network(images)
            loss = loss_function(logits.float(), labels)
            if _update(network, optimizer, scaler, loss):
                skipped_in_a_row = 0
                if average:
                    average.update_parameters(network)
            else:
                skipped_in_a_row += 1
                bar.write(f"step {step + 1}: loss {loss.item():.3g}; the loss or gradient is not finite, update skipped")
                if skipped_in_a_row == MAX_SKIPPED_IN_A_ROW:
                    raise UserError(f"training diverged at step {step + 1}",
                                    f"{MAX_SKIPPED_IN_A_ROW} updates in a row had a non-finite loss or gradient",
                                    "lower learning_rate, or resume from an earlier checkpoint")
            schedule.step()
            row = {"step": step + 1, "loss": round(loss.item(), 5),
                   "learning_rate": optimizer.param_groups[0]["lr"], "seconds": round(clock.elapsed(), 1)}
            done = step + 1
            last = done == config.steps or clock.expired()
            if done % config.checkpoint_every == 0 or done % config.validate_every == 0 or last:
                batches = [_batch(sources, probabilities, patch, rng, config, device)[0]
                           for _ in range(BATCHNORM_BATCHES)]
                recalibrate_batchnorm(kept, batches, low_precision)
            if done % config.validate_every == 0 or last:
                scores = _validate(kept, config, validation)
                row["validation"] = json.dumps(scores)
                if scores["mean"] > best:
                    best = scores["mean"]
                    save_model(kept, _spec(config, done, scores), out / "best.safetensors")
                bar.write(f"step {done}: loss {loss.item():.3f}, validation Dice {scores}")
            if done % config.checkpoint_every == 0 or last:
                _checkpoint(out, network, optimizer, schedule, config, done, clock, average)
            _log(out, row)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if clock.expired():
                bar.write(f"time limit of {config.time_limit_minutes:g} minutes reached at step {done}")
                break
    finally:
        for source in sources:
            getattr(source, "close", lambda: None)()
    plot_curves(out)
    return final_weights(out)


def final_weights(out: Path) -> Path:
    """The weights a run ends with: their average where the run keeps one, else the latest."""
    averaged = out / "last.average.safetensors"
    return averaged if averaged.is_file() else out / "last.safetensors"


def _update(network, optimizer, scaler, loss) -> bool:
    """One optimiser step; none when the loss or the gradient is not finite (one inf gradient, clipped, would
    turn every weight into NaN), and then the weights stay as they were.

    With fp16 loss scaling an inf gradient is the scaler's business: it skips that step itself and lowers the
    scale (several in a row while it finds the scale), so only a non-finite loss counts as a failed update.
    """
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    gradient_norm = torch.nn.utils.clip_grad_norm_(network.parameters(), GRADIENT_CLIP)
    finite = bool(torch.isfinite(loss)) and (scaler.is_enabled() or bool(torch.isfinite(gradient_norm)))
    if finite:
        scaler.step(optimizer)
    scaler.update()
    return finite


def recalibrate_batchnorm(network, batches, low_precision=None) -> None:
    """Set batch-norm running statistics to the plain average over fresh batches, with the current weights.

    During training they are a moving average over weights that keep changing; at a high learning rate
    they lag so far behind that the network in eval mode predicted no pancreas at all (measured: Dice 0
    before, 0.36 after recalibrating at step 200).
    """
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    network.train()
    device = next(network.parameters()).device
    with torch.no_grad(), torch.autocast(device.type, dtype=low_precision, enabled=low_precision is not None):
        for batch in batches:
            network(batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def _label_map_split(config: TrainingConfig):
    from ..synthesis.catalog import labelmap_catalog, split_by_patient

    synthetic = [s for s in config.sources if s.kind == "synthetic"]
    if not synthetic:
        return [], []
    entries = [e for s in synthetic for e in labelmap_catalog(resolve_path(s.path))]
    return split_by_patient(entries, config.validation_fraction, config.seed)


def _initial_network(config: TrainingConfig) -> AttentionUNet3D:
    if config.init_weights:
        loaded = load_model(resolve_path(config.init_weights))
        if loaded.spec.network == config.network:
            return loaded.network
        if can_widen(loaded.spec.network, config.network):
            return widen(loaded.network, config.network)
        raise UserError(f"init_weights {config.init_weights} do not fit the configured network",
                        "they were trained with another network configuration, not a narrower one",
                        "set 'network' to theirs (or wider), or start without init_weights")
    return AttentionUNet3D(config.network)


def _weight_average(network, decay: float):
    """An exponential moving average of the parameters (batch-norm statistics are recalibrated for it before
    every validation and save), or None."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


def _optimizer(config: TrainingConfig, network) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(network.parameters(), lr=config.learning_rate, momentum=0.99, nesterov=True,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)


class TrainingClock:
    """Training wall time, carried over resumes; with a limit, what share of it is spent."""

    def __init__(self, limit_seconds: float, spent: float = 0.0):
        self.limit = limit_seconds
        self.start = time.time() - spent

    def elapsed(self) -> float:
        return time.time() - self.start

    def fraction(self) -> float:
        return min(self.elapsed() / self.limit, 1.0) if self.limit else 0.0

    def expired(self) -> bool:
        return bool(self.limit) and self.elapsed() >= self.limit


def _learning_rate_factor(config: TrainingConfig, step: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 2% of the peak, over the steps or the time limit, whichever
    runs out first (so a run with a time limit ends cooled down however fast the machine is)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = max((step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1), time_fraction)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _loss(batch_dice: bool = False, dice_background: bool = True):
    from monai.losses import DiceCELoss

    return DiceCELoss(to_onehot_y=True, softmax=True, squared_pred=False, smooth_nr=1e-5, smooth_dr=1e-5,
                      batch=batch_dice, include_background=dice_background)


@functools.cache
def _augmentations(device: torch.device):
    """One pipeline per device, its affine grid made there too: made on the CPU (7 ms an 80^3 patch on one
    thread) and copied, it would cost a GPU run about 60 ms of one process a batch of 8."""
    from monai import transforms as mt

    keys = ["image", "label"]
    return mt.Compose([
        mt.RandAffined(keys, prob=0.3, rotate_range=(0.2, 0.2, 0.2), scale_range=(0.15, 0.15, 0.15),
                       mode=("bilinear", "nearest"), padding_mode="border", device=device),
        mt.RandScaleIntensityd("image", factors=0.1, prob=0.3),
        mt.RandShiftIntensityd("image", offsets=0.05, prob=0.3),
        mt.RandAdjustContrastd("image", gamma=(0.8, 1.25), prob=0.3),
        mt.RandGaussianSmoothd("image", sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0), sigma_z=(0.3, 1.0), prob=0.2),
        mt.RandGaussianNoised("image", std=0.03, prob=0.3),
    ])


def _batch(sources, probabilities, patch, rng, config: TrainingConfig, device=torch.device("cpu")):
    """Patches augmented where the network runs: on a GPU, augmenting on the CPU (0.4 s a batch of 8, mostly
    the affine resampling) would leave the GPU waiting for one process."""
    augment = _augmentations(device)
    augment.set_random_state(seed=int(rng.integers(2**31)))
    images, labels = [], []
    for _ in range(config.batch_size):
        case = sources[rng.choice(len(sources), p=probabilities)].draw(rng)
        ct, label = sample_patch(case, patch, rng, config.foreground_fraction)
        sample = augment({"image": torch.from_numpy(normalise_hu(ct, config.hu_range)[None]).to(device),
                           "label": torch.from_numpy(label[None].astype(np.float32)).to(device)})
        images.append(torch.as_tensor(sample["image"], dtype=torch.float32))
        labels.append(torch.as_tensor(sample["label"]).round().long())
    images = torch.stack(images).as_subclass(torch.Tensor)  # plain tensors, without MONAI's metadata
    return images.contiguous(memory_format=torch.channels_last_3d), torch.stack(labels).as_subclass(torch.Tensor)


def _validation_cases(config: TrainingConfig, validation_entries) -> list[tuple[str, sitk.Image, np.ndarray | None]]:
    """Real CT (named in the config) plus synthetic volumes from held-out patients' label maps, of every
    phase, and negatives (reference None) from them."""
    cases = [file_case(f"real:{Path(i).parent.name}", resolve_path(i), resolve_path(lbl), "silver")
             for i, lbl in config.validation_pairs]
    if validation_entries:
        cases += synthetic_cases(validation_entries, config.validation_synthetic, config.spacing_mm,
                                 seed=config.seed + 1)
        cases += synthetic_cases(validation_entries, config.validation_negatives, config.spacing_mm,
                                 seed=config.seed + 2, views=("above-pancreas", "below-pancreas"))
    return [(case.name if case.view == "abdomen" else f"negative:{case.name}", *case.load()) for case in cases]


def _validate(network, config: TrainingConfig, cases) -> dict[str, float]:
    """Dice of whole-volume inference through the engine on each case's own grid, as users will run it; on a
    negative, 1 / (1 + mL found / 5 mL). ``mean`` is over all cases, ``mean_dice`` over those with a pancreas."""
    network.eval()
    model = LoadedModel(spec=_spec(config, 0, {}), network=network, path=Path("training"), sha256="")
    segmenter = Segmenter(model, SegmentationOptions(device=config.device, tta=False))  # one pass: cheaper
    scores = {}
    for name, image, truth in cases:
        result = segmenter.segment(image, maps=())
        if truth is None:
            scores[name] = round(1.0 / (1.0 + result.volume_ml / NEGATIVE_HALF_SCORE_ML), 4)
        else:
            scores[name] = round(dice(sitk.GetArrayViewFromImage(result.mask), truth), 4)
    positives = [v for k, v in scores.items() if not k.startswith("negative:")]
    scores["mean_dice"] = round(float(np.mean(positives)), 4) if positives else 0.0
    scores["mean"] = round(float(np.mean([v for k, v in scores.items() if k != "mean_dice"])), 4) if cases else 0.0
    return scores


def _spec(config: TrainingConfig, steps: int, scores: dict) -> ModelSpec:
    return ModelSpec(
        network=config.network,
        spacing_mm=config.spacing_mm,
        hu_range=config.hu_range,
        roi_size=config.patch_size,
        version=f"trained-{steps}-steps",
        training={
            "steps": steps,
            "sources": [{"kind": s.kind, "weight": s.weight, "path": s.path or "pairs"} for s in config.sources],
            # Case folder names of the real CT trained on, so evaluations can say which cases were seen.
            "real_cases": sorted({Path(image).parent.name for s in config.sources for image, _ in s.pairs}),
            "validation_dice": scores,
            "patch_size": list(config.patch_size),
        },
    )


def _checkpoint(out: Path, network, optimizer, schedule, config: TrainingConfig, step: int, clock,
                average=None) -> None:
    """``last`` holds the latest weights (a resume goes on from them), ``last.average`` their average when one
    is kept; ``step-N`` what the run would ship: the average if there is one."""
    save_model(network, _spec(config, step, {}), out / "last.safetensors")
    if average:
        save_model(average.module, _spec(config, step, {}), out / "last.average.safetensors")
    if config.keep_checkpoints:
        save_model(average.module if average else network, _spec(config, step, {}), out / f"step-{step}.safetensors")
    # Optimizer state is plain tensors and numbers: torch.load(weights_only=True) reads it without pickle code.
    torch.save({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "step": step,
                "seconds": clock.elapsed()}, out / "last.optimizer.pt")


def _resume(out: Path, network, optimizer, schedule, clock: TrainingClock, average=None) -> int:
    weights, state_file = out / "last.safetensors", out / "last.optimizer.pt"
    if not weights.is_file() or not state_file.is_file():
        return 0
    network.load_state_dict(load_model(weights).network.state_dict())
    averaged = out / "last.average.safetensors"
    if average and averaged.is_file():
        average.module.load_state_dict(load_model(averaged).network.state_dict())
        average.n_averaged.fill_(1)  # an average under way: the next update blends into it, not replaces it
    state = torch.load(state_file, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    clock.start = time.time() - float(state.get("seconds", 0.0))
    _forget_log_after(out, int(state["step"]))
    return int(state["step"])


def _forget_log_after(out: Path, step: int) -> None:
    """A run stopped between checkpoints logged steps it will now do again: drop those rows, not duplicate them."""
    path = out / "log.csv"
    if not path.is_file():
        return
    with path.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
    with imageio.replacing(path) as temporary, temporary.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _best_dice(out: Path) -> float:
    best = out / "best.safetensors"
    if not best.is_file():
        return -1.0
    return float(load_model(best).spec.training.get("validation_dice", {}).get("mean", -1.0))


def _log(out: Path, row: dict) -> None:
    path = out / "log.csv"
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def plot_curves(out: Path) -> Path:
    """Loss and validation Dice against steps, as PNG beside the CSV log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader((out / "log.csv").open()))
    steps = [int(r["step"]) for r in rows]
    losses = np.array([float(r["loss"]) for r in rows])
    smooth = np.convolve(losses, np.ones(50) / 50, mode="valid") if len(losses) >= 50 else losses
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, losses, alpha=0.3, label="loss")
    left.plot(steps[len(steps) - len(smooth):], smooth, label="loss (50-step mean)")
    left.set_xlabel("step")
    left.legend()
    validated = [(int(r["step"]), json.loads(r["validation"])) for r in rows if r.get("validation")]
    for name in (validated[-1][1] if validated else {}):
        right.plot([s for s, v in validated], [v.get(name, np.nan) for s, v in validated], marker=".", label=name)
    right.set_xlabel("step")
    right.set_ylabel("Dice")
    right.set_ylim(0, 1)
    right.legend(fontsize=7)
    figure.tight_layout()
    path = out / "curves.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
