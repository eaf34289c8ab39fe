"""Pieces every run shares around transformers' `Trainer`: resume from checkpoints, run info, callbacks."""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .data.io import progress
from .errors import ConfigError

logger = logging.getLogger(__name__)
CHECKPOINT_FILES = ("trainer_state.json", "model.safetensors", "optimizer.pt", "scheduler.pt")


def is_complete_checkpoint(path: str | Path) -> bool:
    """A checkpoint is usable only if every file a resume needs is there (a killed save leaves some out)."""
    path = Path(path)
    if not all((path / name).is_file() and (path / name).stat().st_size > 0 for name in CHECKPOINT_FILES):
        return False
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return True


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """Newest `checkpoint-N` under `output_dir` that is complete; half-written ones are skipped."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    candidates = [p for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()]
    for path in sorted(candidates, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        if is_complete_checkpoint(path):
            return str(path)
    return None


def resolve_resume(args: TrainingArguments) -> str | None:
    """`resume_from_checkpoint`: a path, or "true"/"last" for the newest complete checkpoint in output_dir."""
    value = args.resume_from_checkpoint
    if value in (None, "", False, "false", "False"):
        return None
    if str(value).lower() in {"true", "last"}:
        return last_complete_checkpoint(args.output_dir)
    if not is_complete_checkpoint(value):
        raise ConfigError(
            f"resume_from_checkpoint={value} is not a complete checkpoint (needs {', '.join(CHECKPOINT_FILES)}).",
            "pass --resume_from_checkpoint true to pick the newest complete checkpoint automatically.",
        )
    return str(value)


def check_writable(output_dir: str | Path) -> None:
    """Fail before training, not after hours of it, when the outputs cannot be written."""
    path = Path(output_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"  # per process: ranks probe the same dir at once
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"output_dir {path} is not writable ({err.strerror}).", "choose another output_dir or fix its permissions."
        ) from None


def hardware_description() -> str:
    """One line naming the device the run used, for metrics files and model cards."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it (Linux), else the architecture: speed depends on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_run_info(
    args: TrainingArguments, dataset: str, num_images: int | None, metrics: dict, parent: str | None = None
) -> None:
    """`run_info.json` beside the checkpoint: what the model card reports about how it was trained.

    `datasets` is the data lineage: the data of `parent` (the checkpoint the weights started from, as its own
    `run_info.json` lists it) and then this run's, so a model continued on a new site's images records both sites.
    """
    import sys

    info = dict(
        hardware=hardware_description(),
        epochs=float(metrics.get("epoch", args.num_train_epochs)),
        steps=int(metrics.get("global_step", args.max_steps if args.max_steps > 0 else 0)),
        dataset=dataset,
        datasets=[*parent_datasets(parent), dataset],
        seed=int(args.seed),
        command=" ".join(["python", *sys.argv]),
    )
    if num_images is not None:  # a stream has no count
        info["num_images"] = int(num_images)
    (Path(args.output_dir) / "run_info.json").write_text(json.dumps(info, indent=2))


def parent_datasets(parent: str | None) -> list[str]:
    """The data lineage of a local checkpoint (its `run_info.json`), or its name when it has none (e.g. a Hub id)."""
    if not parent:
        return []
    info = Path(parent) / "run_info.json"
    if info.is_file():
        previous = json.loads(info.read_text())
        return list(previous.get("datasets") or [previous.get("dataset", parent)])
    return [f"the checkpoint {parent}"]


class MedTrainer(Trainer):
    """transformers' Trainer, plus the device half of the light data path: a training batch that arrives with
    `pending_views` (`PretrainingDataset(defer_views=True)`) is normalised, flipped and turned where the step runs,
    batched (`finish_batch`), so the loader's CPU cores only decode and crop."""

    def _prepare_inputs(self, inputs: dict) -> dict:
        inputs = super()._prepare_inputs(inputs)
        if "pending_views" in inputs:
            inputs = self.train_dataset.finish_batch(inputs)
        return inputs


class FrozenEncoderWarmup(TrainerCallback):
    """Train everything but `encoder` for the first `steps` optimizer steps, then everything (a frozen-encoder
    warm-up, LP-FT; RETFound's linear-probe warm-up): a decoder trained from scratch first learns to read the
    pre-trained features before its large early gradients reach them. Frozen parameters take no gradient, so AdamW
    leaves them and their state alone; the switch follows the global step, so a resumed run freezes exactly as the
    uninterrupted one did."""

    def __init__(self, encoder: torch.nn.Module, steps: int):
        self.encoder, self.steps = encoder, steps

    def _set(self, state) -> None:
        trainable = state.global_step >= self.steps
        for p in self.encoder.parameters():
            p.requires_grad_(trainable)

    def on_train_begin(self, args, state, control, **kwargs):
        self._set(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._set(state)


class SelectionEarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping that never stops before `min_train_steps`, and without its warning that the
    best model will not be reloaded (the transfer tasks reload the best checkpoint strictly themselves).

    On a small validation set the metric is noisy, and a patience counted in evaluations can end a run
    long before it converged (measured on WBC: one seed stopped at 392 steps with 0.83 test accuracy).
    """

    def on_train_begin(self, args, state, control, **kwargs):
        pass  # `MedTrainingArguments.settle` has already required metric_for_best_model and an evaluation schedule

    def on_evaluate(self, args, state, control, metrics, **kwargs):
        super().on_evaluate(args, state, control, metrics, **kwargs)
        if state.global_step < getattr(args, "min_train_steps", 0):
            control.should_training_stop = False


class ProcessSeedCallback(TrainerCallback):
    """Gives each process its own torch random stream when training starts.

    `set_seed` seeds every process alike, so without this each process would draw the same masks (and
    dropout) for its slice of the global batch. The model is already built by then, identically on every
    process; a resume later restores each process's own saved RNG state.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            torch.manual_seed(args.seed + 7919 * args.process_index)


class EpochCallback(TrainerCallback):
    """Tells datasets with `set_epoch` which epoch starts (accelerate does so only for some samplers)."""

    def __init__(self, *datasets):
        self.datasets = datasets

    def on_epoch_begin(self, args, state, control, **kwargs):
        for dataset in self.datasets:
            dataset.set_epoch(int(state.epoch or 0))


class AttentionRefreshCallback(TrainerCallback):
    """Recomputes the CLS attention map of every training image every `every_epochs` epochs (MSMAE).

    Works for any model with `attention_map(pixel_values) -> [B, L]` and an `attention_bank` dict: the
    MAEs, whose `attention` mask generator masks the most attended patches, and the classifier, which
    drops the least attended tokens in training (`throw_ratio`). `dataset` yields `pixel_values` and
    `sample_ids` without augmentation (the views the bank is keyed by). Until the first refresh (after
    `warmup_epochs`) both draw at random, as MSMAE's warm-up does.
    """

    def __init__(self, dataset, every_epochs: float = 5, warmup_epochs: float = 1, batch_size: int = 64):
        self.dataset, self.every, self.warmup, self.batch_size = dataset, every_epochs, warmup_epochs, batch_size
        self.last_refresh: float | None = None

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        epoch = state.epoch or 0.0
        due = epoch >= self.warmup and (self.last_refresh is None or epoch - self.last_refresh >= self.every)
        if model is None or not due:
            return
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False)
        for batch in progress(loader, desc="attention maps", unit="batch"):
            maps = model.attention_map(batch["pixel_values"].to(device)).float().cpu()
            model.attention_bank.update({int(i): m for i, m in zip(batch["sample_ids"], maps)})
        model.train(was_training)
        self.last_refresh = epoch


class LossTermsCallback(TrainerCallback):
    """Logs the terms of a loss that adds several, next to the Trainer's `loss`: for the supervised MAE (MSMAE),
    `reconstruction_loss` and `supervised_loss`, so one can see which of them still falls (the head's
    cross-entropy on a few labelled images can fall long after the reconstruction has stopped).

    A forward hook keeps the detached terms of every training forward; at each log they are averaged (this
    process's forwards since the last log) and added to the logged values and to `trainer_state.json`'s
    `log_history`. `tasks.run` puts it first among the callbacks so that the printed line shows them too.
    """

    logs_first = True

    def __init__(self, terms: tuple[str, ...] = ("reconstruction_loss", "supervised_loss")):
        self.terms = terms
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.handle = model.register_forward_hook(self._hook)

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()

    def _hook(self, module, args, output):
        values = {t: getattr(output, t, None) for t in self.terms}
        if module.training and all(v is not None for v in values.values()):
            for t, v in values.items():  # summed on the device: one sync per log, not per step
                self.sums[t] = self.sums.get(t, 0) + v.detach().float()
            self.count += 1

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self.count:
            return
        means = {t: round(float(s) / self.count, 4) for t, s in self.sums.items()}
        logs.update(means)
        if state.log_history and "loss" in state.log_history[-1]:
            state.log_history[-1].update(means)
        self.sums, self.count = {}, 0


CHOICES_FILE = "measured_choices.json"


class ChoicesCallback(TrainerCallback):
    """Writes the run's measured choices (precision, attention kernel) into every checkpoint, so a resumed run
    trains exactly as it started instead of measuring again (see `tasks.run.settle_precision`)."""

    def __init__(self, choices: dict):
        self.choices = choices

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero and folder.is_dir():
            (folder / CHOICES_FILE).write_text(json.dumps(self.choices))


class NonFiniteStepGuard(TrainerCallback):
    """Skips an optimizer step whose gradients are not finite, and counts it, instead of writing NaN into every weight.

    Mixed precision can overflow a gradient (the 3D U-Net in bf16 did, once in a run). With gradient clipping
    an infinite norm turns every gradient into NaN, the step writes NaN into all weights, and the run trains
    nothing from then on. Here such a step leaves the weights as they were (the gradients are dropped before
    `optimizer.step`), the schedule goes on, and `skipped_nonfinite_steps` in `all_results.json` says how often.
    The check reads one number per step, so on a GPU it waits for the step to finish (the Trainer's own
    gradient-norm logging does too).
    """

    def __init__(self):
        self.skipped = 0
        self._handle = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        if inner is not None and self._handle is None:
            self._handle = inner.register_step_pre_hook(self._check)

    def _check(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).float()).all()):
            return
        for group in optimizer.param_groups:  # parameters without a gradient are left alone by every torch optimizer
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        logger.warning("skipped an optimizer step with non-finite gradients (%d so far)", self.skipped)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class SampleIdRecorder(TrainerCallback):
    """Records the dataset indices this process trains on, to verify sharding across processes.

    From the start of training (so no start-up measurement counts), a forward pre-hook on the model reads
    the `sample_ids` of each training batch; at the end they are written to
    `output_dir/sample_ids_rank<process index>.json`.
    """

    def __init__(self):
        self.seen: list[int] = []
        self.handle = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()
        Path(args.output_dir, f"sample_ids_rank{args.process_index}.json").write_text(json.dumps(self.seen))

    def _hook(self, module, args, kwargs):
        if module.training and kwargs.get("sample_ids") is not None:
            self.seen.extend(int(i) for i in kwargs["sample_ids"])
