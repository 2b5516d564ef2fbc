"""Fine-tuning on the user's own labelled cases, within a time budget: the one use case of every front end.

``attention-unet-seg finetune`` (the tools add case layouts and synthetic patches) and the Slicer panel's child
(``python -m AttentionUNetSegLib.protocol finetune``) both call::

    finetune(cases, output_dir, FinetuneOptions(minutes=10), progress=None, cancel=None, extra_sources=())

It starts from the bundled weights (or ``options.weights``), holds the last case out when there are
:data:`HOLD_OUT_FROM` or more (its Dice before and after, through the engine as users run it, one pass),
and trains on patches of the other cases, of their slabs far from the pancreas (so that the model keeps
finding nothing where there is nothing) and of ``extra_sources``. The steps are sized to the cases
(:data:`STEPS_PER_CASE`) and cut to what the speed measured on the first steps allows in the budget. Into
``output_dir`` it writes

- ``model.safetensors`` and its ``.sha256``: the best weights by the held-out Dice (the latest without a
  held-out case), rewritten as they improve, so that a stop at any moment leaves the best so far;
- ``finetune.json`` (the card as data, readable without torch) and ``MODEL_CARD.md`` (the same for people);
- ``finetune.checkpoint.pt``: where the run is; the same call again resumes there.

The weights carry no verdict threshold, so none of their results is called ok until :func:`record_verdict_thresholds`
stores one calibrated for them (``verdict.py``). ``progress(fraction, text)`` follows the run; ``cancel()``
returning True stops it after the current step with :class:`Cancelled`, as Ctrl-C does with KeyboardInterrupt,
the best weights and a checkpoint kept. Bad input raises :class:`UserError` before anything is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .engine import SegmentationOptions, Segmenter, _dice, autocast_dtype, normalise_hu, resolve_device
from .errors import Cancelled, UserError
from .finetune_data import (
    RULE,
    FinetuneCase,
    HeldOut,
    Volume,
    VolumeDraw,
    augment,
    on_model_grid,
    pancreas_free_slabs,
    read_case,
    sample_patch,
)
from .imageio import replacing
from .locations import models_dir
from .outputs import check_output_folder, json_writer, write_outputs
from .protocol import FINETUNE_CARD_FILE, FINETUNE_MODEL_FILE
from .verdict import THRESHOLDS_KEY
from .weights import LoadedModel, load_model, save_model

MODEL_FILE, CARD_FILE = FINETUNE_MODEL_FILE, FINETUNE_CARD_FILE  # named in protocol, for the panel's parent
CARD_TEXT_FILE = "MODEL_CARD.md"
CHECKPOINT_FILE = "finetune.checkpoint.pt"
STAGING = ".publishing"  # new weights and their checksum wait here until both are whole
HOLD_OUT_FROM = 3  # cases; with fewer, every case is needed for training and no Dice is measured
STEPS_PER_CASE, MIN_STEPS, MAX_STEPS = 100, 100, 2000
BATCH_SIZE = {"cpu": 2, "cuda": 4}
LEARNING_RATE = 2e-4  # a third of the bundled recipe's peak: adapt the weights, do not retrain them
WARMUP_STEPS, FINAL_LEARNING_RATE = 10, 0.02  # the latter relative to the peak, reached by cosine decay
WEIGHT_DECAY, GRADIENT_CLIP = 1e-4, 12.0
NEGATIVE_SHARE = 0.15  # of the patches, from the no-pancreas slabs of the user's cases (when they have any)
SPEED_STEPS = 3  # steps timed before the plan is cut to the budget (the first also allocates)
REPLAN_STEPS = 10  # the plan follows the speed of the last steps this often: a machine that gets busy slows a
# run down midway, and a plan kept from its first steps ran out of time with the learning rate still high
VALIDATIONS = 4  # on the held-out case, evenly over the planned steps
CHECKPOINT_SECONDS = 60.0
SAVE_SECONDS = 3.0  # kept back from the budget for the last writes and the process's exit


@dataclass(frozen=True)
class FinetuneOptions:
    minutes: float = 10.0  # the whole call's budget: reading, scoring, training, writing
    device: str = "auto"
    weights: Path | None = None  # start from these; None: the bundled model
    max_steps: int | None = None  # at most this many steps; None: sized to the cases and the time
    threads: int | None = None  # CPU threads; None: all cores
    seed: int = 0
    started: float | None = None  # time.monotonic() the budget counts from (a command: its start); None: the call


@dataclass(frozen=True)
class PatchSource:
    """Volumes to draw patches from beside the user's cases (the tools pass synthetic CT): ``draw(rng)``
    returns anything with ``ct`` (HU), ``pancreas`` and ``foreground`` on the model grid, like :class:`Volume`."""

    draw: Callable[[np.random.Generator], Volume]
    share: float  # of all patches
    description: str


@dataclass(frozen=True)
class FinetuneResult:
    model: Path
    card: dict

    def summary(self) -> str:
        card = self.card
        held_out = (f"held out {card['held_out']}: Dice {card['dice_before']:.2f} -> {card['dice_after']:.2f}; "
                    if card["held_out"] else "no case held out (fewer than 3); ")
        ended = "the time ran out" if card["status"] == "time" else card["status"]
        return (f"Fine-tuned on {len(card['cases'])} case(s); {held_out}{card['steps_done']} of "
                f"{card['planned_steps']} planned steps ({card['steps_wanted']} for the cases; {ended}) in "
                f"{card['minutes']:.1f} min on {card['device']}; {self.model} (its verdict is not calibrated: "
                "never ok)")


@dataclass
class _State:
    """What a checkpoint keeps besides the tensors."""

    fingerprint: str  # of the cases and the starting weights: a resume must have the same
    wanted: int  # steps sized to the cases
    step: int = 0
    planned: int = 0  # the steps the budget allows; 0 until the first steps were timed
    seconds: float = 0.0  # spent by earlier calls
    validation_seconds: float = 0.0
    dice_before: float | None = None
    best_dice: float | None = None
    kept_step: int = 0  # the step of the weights in model.safetensors; 0: none written yet
    validated_step: int = 0
    runs: list = field(default_factory=list)  # each call: from_step, to_step, minutes, stopped


def finetune(cases: Sequence[FinetuneCase], output_dir: Path, options: FinetuneOptions | None = None,
             progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None,
             extra_sources: Sequence[PatchSource] = ()) -> FinetuneResult:
    """Fine-tune on ``cases`` into ``output_dir`` (see the module's description)."""
    options = options or FinetuneOptions()
    began = time.monotonic() if options.started is None else options.started
    report = progress or (lambda fraction, text: None)
    output_dir = _checked_output_dir(Path(output_dir), cases, options.weights)
    device = resolve_device(options.device)
    start = load_model(options.weights)
    fingerprint = _fingerprint(start, cases)
    saved = _checkpoint_to_resume(output_dir, fingerprint)
    training, held_out = _read_cases(cases, start.spec.spacing_mm, report)
    job = _Job(start, training, held_out, output_dir, options, device, extra_sources)
    job.begin(fingerprint, saved)
    return job.run(began, report, cancel or (lambda: False))


def process_start() -> float:
    """When this process started, on the ``time.monotonic()`` clock: a command's budget includes the seconds
    Python and torch took to start (several on a busy 2-core machine). The call's time where /proc cannot tell."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.monotonic() - max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.monotonic()


def _checked_output_dir(output_dir: Path, cases: Sequence[FinetuneCase], weights: Path | None) -> Path:
    """Never an input's folder, the bundled models' folder, or a folder whose model.safetensors is not a
    fine-tune's own (which this one would replace)."""
    check_output_folder(output_dir)
    resolved = output_dir.resolve()
    inputs = [Path(p).resolve() for case in cases for p in (case.ct, case.label)]
    if any(resolved == p or resolved in p.parents for p in inputs):
        raise UserError(f"output folder {output_dir} holds the cases", "the fine-tune's files would mix with them",
                        "choose another --output-dir")
    if resolved == models_dir().resolve() or (weights and Path(weights).resolve() == resolved / MODEL_FILE):
        raise UserError(f"output folder {output_dir} holds the starting weights", "they would be replaced",
                        "choose another --output-dir")
    if (output_dir / MODEL_FILE).exists() and not (output_dir / CHECKPOINT_FILE).is_file():
        raise UserError(f"{output_dir} already holds a {MODEL_FILE}", "a fine-tune would replace it",
                        "choose another --output-dir")
    return output_dir


def _fingerprint(start: LoadedModel, cases: Sequence[FinetuneCase]) -> str:
    listed = [[c.name, str(Path(c.ct).resolve()), str(Path(c.label).resolve()), list(c.label_values)] for c in cases]
    return hashlib.sha256(json.dumps([start.sha256, listed]).encode()).hexdigest()


def _checkpoint_to_resume(output_dir: Path, fingerprint: str) -> dict | None:
    path = output_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = _State(**saved["state"])
    if state.fingerprint != fingerprint:
        raise UserError(f"{output_dir} holds a fine-tune of other cases or other starting weights",
                        "a stopped fine-tune resumes only with the same ones",
                        "choose another --output-dir, or empty this one to start over")
    place_published(output_dir)  # what a run killed while publishing left half moved
    if state.planned and state.step >= state.planned:
        raise UserError(f"{output_dir} already holds a finished fine-tune of these cases",
                        f"all {state.planned} planned steps are done",
                        f"to go on, fine-tune from --weights {output_dir / MODEL_FILE} into another --output-dir")
    return saved


def place_published(output_dir: Path) -> None:
    """Move staged weights and their checksum into place, the weights first. A stop before the checksum was
    staged leaves weights that never were whole: dropped. A stop between the moves is finished here."""
    staging = output_dir / STAGING
    weights, checksum = staging / MODEL_FILE, staging / f"{MODEL_FILE}.sha256"
    if checksum.is_file():
        if weights.is_file():
            os.replace(weights, output_dir / MODEL_FILE)
        os.replace(checksum, output_dir / checksum.name)
    weights.unlink(missing_ok=True)
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()


def _read_cases(cases: Sequence[FinetuneCase], spacing_mm, report) -> tuple[list[Volume], HeldOut | None]:
    """Every case checked before anything is written; the last held out (at its own resolution) from
    :data:`HOLD_OUT_FROM` cases on, the others on the model grid."""
    if not cases:
        raise UserError("no cases to fine-tune on", "no (CT, label) pair was given or found", RULE)
    volumes, held_out = [], None
    for index, case in enumerate(cases):
        report(0.05 * index / len(cases), f"Reading case {index + 1} of {len(cases)} ({case.name})")
        image, mask = read_case(case)
        if index == len(cases) - 1 and len(cases) >= HOLD_OUT_FROM:
            held_out = HeldOut(case.name, image, mask)
        else:
            volumes.append(on_model_grid(image, mask, spacing_mm, case.name))
    return volumes, held_out


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus soft Dice over the whole batch with the background, as the bundled recipe trains
    (MONAI's DiceCELoss with batch=True, include_background=True)."""
    probabilities = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(labels, logits.shape[1]).permute(0, 4, 1, 2, 3).to(probabilities.dtype)
    axes = (0, 2, 3, 4)
    overlap = (probabilities * one_hot).sum(axes)
    total = probabilities.sum(axes) + one_hot.sum(axes)
    dice = (2 * overlap + 1e-5) / (total + 1e-5)
    return F.cross_entropy(logits, labels) + (1 - dice.mean())


def _grad_scaler(enabled: bool):
    """Loss scaling for fp16 on GPUs without bf16: torch.amp's from torch 2.3, torch.cuda.amp's before (Slicer's
    PyTorch extension may install either)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def learning_rate(step: int, total: int) -> float:
    """Linear warm-up, then cosine decay over the planned steps, so that a run ends cooled down."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = min((step - WARMUP_STEPS) / max(total - WARMUP_STEPS, 1), 1.0)
    return LEARNING_RATE * (FINAL_LEARNING_RATE + (1 - FINAL_LEARNING_RATE) * 0.5 * (1 + math.cos(math.pi * progress)))


class _Job:
    """One fine-tune: the network, its optimiser, its patch sources and the state a checkpoint keeps."""

    def __init__(self, start: LoadedModel, training: list[Volume], held_out: HeldOut | None, output_dir: Path,
                 options: FinetuneOptions, device: torch.device, extra_sources: Sequence[PatchSource]):
        self.start, self.training, self.held_out, self.output_dir = start, training, held_out, output_dir
        self.options, self.device = options, device
        torch.set_num_threads(options.threads or os.cpu_count() or 1)
        self.network = start.network.to(device).to(memory_format=torch.channels_last_3d)
        self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.precision = autocast_dtype(device)
        self.scaler = _grad_scaler(enabled=device.type == "cuda" and self.precision == torch.float16)
        self.batch_size = BATCH_SIZE.get(device.type, BATCH_SIZE["cpu"])
        self.patch = tuple(reversed(start.spec.roi_size))  # spec is (x, y, z)
        self.sources = self._patch_sources(extra_sources)
        model = LoadedModel(start.spec, self.network, Path(MODEL_FILE), sha256="")
        self.segmenter = Segmenter(model, SegmentationOptions(device=str(device), tta=False, threads=options.threads))

    def begin(self, fingerprint: str, saved: dict | None) -> None:
        """A new run, or the one a checkpoint saved."""
        if saved:
            self.state = _State(**saved["state"])
            self.network.load_state_dict(saved["network"])
            self.optimizer.load_state_dict(saved["optimizer"])
        else:
            wanted = min(max(MIN_STEPS, STEPS_PER_CASE * len(self.training)), MAX_STEPS,
                         self.options.max_steps or MAX_STEPS)
            self.state = _State(fingerprint, wanted)
        self.first_step, self.last_checkpoint = self.state.step, time.monotonic()

    def _patch_sources(self, extra_sources: Sequence[PatchSource]) -> list[PatchSource]:
        slabs = [s for volume in self.training for s in pancreas_free_slabs(volume, self.start.spec.spacing_mm[2])]
        sources = list(extra_sources)
        if slabs:
            sources.append(PatchSource(VolumeDraw(slabs).draw, NEGATIVE_SHARE,
                                       f"no-pancreas slabs of your cases ({len(slabs)})"))
        share = 1.0 - sum(s.share for s in sources)
        if share <= 0:
            raise ValueError("the other patch sources leave no share for the user's cases")
        return [PatchSource(VolumeDraw(self.training).draw, share, f"your {len(self.training)} case(s)"), *sources]

    # --- the run -----------------------------------------------------------------------------------------

    def run(self, began: float, report, cancelled: Callable[[], bool]) -> FinetuneResult:
        self.began, self.report, self.cancelled = began, report, cancelled
        state = self.state
        try:
            if self.held_out and state.dice_before is None:
                report(0.05, f"Scoring {self.held_out.name} with the starting weights")
                clock = time.monotonic()
                state.dice_before = self._held_out_dice()
                state.validation_seconds = time.monotonic() - clock
            stopped = self._train()
            if state.step == state.kept_step == 0:
                raise UserError(f"the {self.options.minutes:g} minutes ran out before the first training step",
                                f"reading the cases and scoring took {time.monotonic() - began:.0f} s",
                                "give more --minutes")
            self._finish(stopped)
            report(1.0, "Done")
        except (KeyboardInterrupt, Cancelled):
            place_published(self.output_dir)  # stopped between the two moves of a publish: finish them
            if state.step > self.first_step:
                self._finish("interrupted", validate=False)
            raise
        return FinetuneResult(self.output_dir / MODEL_FILE, self._card(stopped))

    def _train(self) -> str:
        """Steps until the plan is done (``done``) or one more would overrun the budget (``time``)."""
        state, durations = self.state, []
        while state.step < self._total():
            if self.cancelled():
                raise Cancelled("fine-tune cancelled")
            if not self._time_for_a_step(durations):
                return "time"
            clock = time.monotonic()
            loss = self._step()
            durations.append(time.monotonic() - clock)
            state.step += 1
            if not state.planned and len(durations) == SPEED_STEPS:
                state.planned = self._plan(durations[1:])
            elif state.planned and len(durations) > SPEED_STEPS and state.step % REPLAN_STEPS == 0:
                state.planned = self._plan(durations[-REPLAN_STEPS:])
            self._between_steps(loss)
        state.planned = state.planned or state.step  # fewer steps than it takes to time them: all were done
        return "done"

    def _between_steps(self, loss: float) -> None:
        state = self.state
        if self._validation_due(state.step):
            self._validate()
        if time.monotonic() - self.last_checkpoint > CHECKPOINT_SECONDS:
            if self.held_out:
                self._checkpoint()
            else:  # the latest weights are the best known: kept as they come
                state.kept_step = state.step
                self._publish("in progress")
        self.report(0.1 + 0.85 * state.step / self._total(), f"Step {state.step} of {self._total()}, loss {loss:.3f}")

    def _total(self) -> int:
        return self.state.planned or self.state.wanted

    def _plan(self, durations: list[float]) -> int:
        """The steps that fit the budget at the speed of these steps (never the first, which also allocates),
        keeping time for the validations and the last writes."""
        per_step = float(np.mean(durations))
        validations = VALIDATIONS * self.state.validation_seconds if self.held_out else 0.0
        left = self._seconds_left() - validations - SAVE_SECONDS
        return max(self.state.step, min(self.state.wanted, self.state.step + int(left / per_step)))

    def _seconds_left(self) -> float:
        return self.options.minutes * 60 - (time.monotonic() - self.began)

    def _time_for_a_step(self, durations: list[float]) -> bool:
        """Room for one more step (as long as the last ones), a validation if it is due, and the finish."""
        step = float(np.mean(durations[-3:])) if durations else 0.0
        validations = (1 + self._validation_due(self.state.step + 1)) * self.state.validation_seconds
        return step + validations + SAVE_SECONDS <= self._seconds_left()

    def _validation_due(self, step: int) -> bool:
        planned = self.state.planned
        return bool(self.held_out and planned) and (step % max(planned // VALIDATIONS, 1) == 0 or step == planned)

    def _step(self) -> float:
        rng = np.random.default_rng([self.options.seed, self.state.step])  # resumes draw as an unbroken run would
        images, labels = self._batch(rng)
        self._train_mode()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.state.step, self._total())
        with torch.autocast(self.device.type, dtype=self.precision, enabled=self.precision is not None):
            logits = self.network(images)
        loss = dice_ce_loss(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), GRADIENT_CLIP)
        if bool(torch.isfinite(loss)) and (self.scaler.is_enabled() or bool(torch.isfinite(norm))):
            self.scaler.step(self.optimizer)  # a non-finite update would turn every weight into NaN: skipped
        self.scaler.update()
        return loss.item()

    def _train_mode(self) -> None:
        """Training mode with the batch-norm statistics frozen: batches of two patches would pull them
        around, and the engine runs on them as they are."""
        self.network.train()
        for module in self.network.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()

    def _batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        shares = np.array([source.share for source in self.sources])
        images, labels = [], []
        for _ in range(self.batch_size):
            source = self.sources[rng.choice(len(self.sources), p=shares / shares.sum())]
            ct, label = sample_patch(source.draw(rng), self.patch, rng)
            image = torch.from_numpy(normalise_hu(ct, self.start.spec.hu_range)[None]).to(self.device)
            image, label = augment(image, torch.from_numpy(label[None].astype(np.int64)).to(self.device), rng)
            images.append(image)
            labels.append(label[0])
        return torch.stack(images).contiguous(memory_format=torch.channels_last_3d), torch.stack(labels)

    def _held_out_dice(self) -> float:
        self.network.eval()
        result = self.segmenter.segment(self.held_out.image, cancel=self.cancelled, maps=())
        return round(_dice(sitk.GetArrayViewFromImage(result.mask) > 0, self.held_out.pancreas), 4)

    def _validate(self) -> None:
        state = self.state
        self.report(0.1 + 0.85 * state.step / self._total(), f"Scoring {self.held_out.name} at step {state.step}")
        dice = self._held_out_dice()
        state.validated_step = state.step
        if state.best_dice is None or dice > state.best_dice:
            state.best_dice, state.kept_step = dice, state.step
            self._publish("in progress")

    # --- writing -----------------------------------------------------------------------------------------

    def _finish(self, stopped: str, validate: bool = True) -> None:
        """The last score, this call in the record, the weights kept and their card, a checkpoint."""
        state = self.state
        if validate and self.held_out and state.validated_step != state.step:
            self._validate()
        state.runs.append({"from_step": self.first_step, "to_step": state.step, "stopped": stopped,
                           "minutes": round((time.monotonic() - self.began) / 60, 2)})
        state.seconds += time.monotonic() - self.began
        self.began = time.monotonic()  # this call's time is in state.seconds now
        if not self.held_out and state.step > state.kept_step:
            state.kept_step = state.step  # no held-out case to choose by: the latest weights are kept
            self._publish(stopped)
            return
        if state.kept_step:
            self._write_card(self._card(stopped))
        self._checkpoint()

    def _publish(self, status: str) -> None:
        card = self._card(status)
        training = {"fine_tune": card, "real_cases": card["cases"]}  # no verdict thresholds: not calibrated
        spec = dataclasses.replace(self.start.spec, version=f"fine-tuned-{self.state.kept_step}-steps",
                                   training=training)
        save_model(self.network, spec, self.output_dir / STAGING / MODEL_FILE)
        self._checkpoint()  # before the weights move in: a folder with weights always has the run's checkpoint
        place_published(self.output_dir)
        self._write_card(card)

    def _write_card(self, card: dict) -> None:
        write_card(self.output_dir, card, thresholds={})

    def _checkpoint(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        saved = {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "state": asdict(self.state)}
        with replacing(self.output_dir / CHECKPOINT_FILE) as temporary:
            torch.save(saved, temporary)
        self.last_checkpoint = time.monotonic()

    def _card(self, status: str) -> dict:
        state = self.state
        minutes = (state.seconds + time.monotonic() - self.began) / 60
        return {
            "model": MODEL_FILE, "status": status,
            "started_from": {"model": self.start.path.name, "version": self.start.spec.version,
                             "sha256": self.start.sha256},
            "cases": [volume.name for volume in self.training],
            "held_out": self.held_out.name if self.held_out else None,
            "dice_before": state.dice_before, "dice_after": state.best_dice,
            "steps": state.kept_step, "steps_done": state.step, "planned_steps": self._total(),
            "steps_wanted": state.wanted, "minutes": round(minutes, 2), "device": str(self.device),
            "runs": state.runs, "batch_size": self.batch_size, "patch_size": list(self.start.spec.roi_size),
            "learning_rate": LEARNING_RATE,
            "patches": {source.description: round(source.share, 3) for source in self.sources},
        }


# --- the card and the verdict's thresholds -------------------------------------------------------------


def write_card(output_dir: Path, card: dict, thresholds: dict) -> None:
    """``finetune.json`` (the card, and the thresholds calibrated for the weights) and ``MODEL_CARD.md``."""
    write_outputs({output_dir / CARD_FILE: json_writer({**card, THRESHOLDS_KEY: thresholds or None}),
                   output_dir / CARD_TEXT_FILE: lambda path: path.write_text(card_text(card, thresholds),
                                                                              encoding="utf-8")})


def card_text(card: dict, thresholds: dict) -> str:
    """The card in Markdown: its first paragraph and its Limitations are what front ends show of a card."""
    if card["held_out"]:
        score = (f"On the held-out case {card['held_out']}: Dice {card['dice_before']:.3f} before, "
                 f"{card['dice_after']:.3f} after (one pass, no TTA).")
    else:
        score = "No case was held out (fewer than 3), so no Dice was measured: the latest weights are kept."
    summary = (f"Fine-tuned from {card['started_from']['model']} ({card['started_from']['version']}) on "
               f"{len(card['cases'])} case(s) of your own: these weights are from step {card['steps']}; the run "
               f"did {card['steps_done']} of {card['planned_steps']} planned steps ({card['steps_wanted']} sized "
               f"to the cases) in {card['minutes']:.1f} minutes on {card['device']} ({card['status']}). {score}")
    if thresholds:
        verdict = ("Calibrated for these weights: ok from confidence "
                   + ", ".join(f"{value:.2f} ({mode.replace('_', ' ')})" for mode, value in sorted(thresholds.items()))
                   + "; a mode without a threshold is never called ok.")
    else:
        verdict = ("Not calibrated for these weights: no result is called ok (\"check: not calibrated for these "
                   "weights\") until `attention-unet-seg finetune --calibrate model.safetensors` has run.")
    runs = [f"  - steps {r['from_step']}-{r['to_step']}: {r['minutes']:.1f} min, {r['stopped']}" for r in card["runs"]]
    patches = [f"  - {name}: {share:.0%}" for name, share in card["patches"].items()]
    training = (f"- batch {card['batch_size']} patches of {card['patch_size']} voxels, learning rate "
                f"{card['learning_rate']:g}, batch-norm statistics frozen")
    limits = (f"- Learnt from {len(card['cases'])} case(s); the Dice above is on at most one case that training did "
              "not see, and says nothing about other scanners or protocols.\n"
              "- Without synthetic patches (the Slicer panel, or no label maps here) only the no-pancreas slabs of "
              "your own cases remind the model of other anatomy: it may forget more of what it knew.\n"
              "- Research use only; not for clinical decisions.")
    lines = ["# Fine-tuned pancreas model", "", summary, "", "## Cases", "",
             f"- trained on: {', '.join(card['cases'])}", f"- held out: {card['held_out'] or 'none'}", "",
             "## Training", "", training, "- patches drawn from:", *patches, *(["- runs:", *runs] if runs else []),
             "", "## Verdict", "", verdict, "", "## Limitations", "", limits]
    return "\n".join(lines) + "\n"


def record_verdict_thresholds(path: Path, thresholds: dict[str, float]) -> None:
    """Store ok thresholds calibrated for these weights (per mode: ``tta``, ``no_tta``) in their metadata, and
    in their card beside them when there is one. Never the bundled model: verdict.py holds its thresholds."""
    path = Path(path)
    refuse_bundled(path)
    loaded = load_model(path)
    training = dict(loaded.spec.training)
    training[THRESHOLDS_KEY] = {**(training.get(THRESHOLDS_KEY) or {}), **thresholds}
    save_model(loaded.network, dataclasses.replace(loaded.spec, training=training), path)
    card_path = path.parent / CARD_FILE
    if path.name == MODEL_FILE and card_path.is_file():
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card.pop(THRESHOLDS_KEY, None)
        write_card(path.parent, card, training[THRESHOLDS_KEY])


def refuse_bundled(path: Path) -> None:
    """The bundled models are never rewritten; their thresholds are verdict.py's."""
    if Path(path).resolve().parent == models_dir().resolve():
        raise UserError(f"{path} is a bundled model", "its verdict thresholds are verdict.py's",
                        "calibrate it with 'attention-unet-seg calibrate' and update verdict.py")
