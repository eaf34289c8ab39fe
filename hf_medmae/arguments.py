"""`MedTrainingArguments`: transformers' `TrainingArguments` with our run-wide choices resolved in `__post_init__`.

As transformers' own examples do, the subclass settles everything the Trainer and its accelerator read
at construction before they exist: the precision (`bf16` decides the accelerator's mixed precision;
setting it afterwards silently trains in fp32), the MAE learning-rate rule, and Hub pushing (we push
once, at the end, with our model card, so the Trainer's own pushes and its pickled `training_args.bin`
upload are switched off and remembered in `push_at_end`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from .performance import cpu_has_native_bf16, usable_cores


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


@dataclass
class MedTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus `precision` and `base_learning_rate`.

    Example:
        >>> args = MedTrainingArguments(output_dir="out", precision="bf16", use_cpu=True)
        >>> args.bf16, args.mixed_precision
        (True, 'bf16')
    """

    precision: Literal["auto", "bf16", "fp32"] = field(
        default="auto",
        metadata={
            "help": "auto: bf16 on GPUs that support it; on CPUs with native bf16 (AVX512-BF16/AMX) bf16 when a "
            "start-up measurement shows it faster; else fp32 | bf16 | fp32"
        },
    )
    base_learning_rate: float | None = field(
        default=None, metadata={"help": "if set, lr = base_lr * effective batch / 256 (MAE rule)"}
    )
    min_train_steps: int = field(
        default=0,
        metadata={
            "help": "train at least this many optimizer steps: num_train_epochs is raised to reach it (a small data "
            "set needs many epochs; the step count, not the epoch count, is what converges). Ignored when max_steps "
            "is set"
        },
    )
    gpu_dataloader: bool = field(
        default=True,
        metadata={
            "help": "on GPU machines, when dataloader_num_workers is 0: min(8, CPU cores per process) workers, kept "
            "alive across epochs, 4 batches prefetched each, pinned memory, so reading and augmenting overlap the "
            "step; false keeps the Trainer's settings. CPU runs are never changed (workers would take the step's "
            "cores)"
        },
    )
    max_evaluations: int = field(
        default=50,
        metadata={
            "help": "when min_train_steps raises the epochs, evaluate (and save) every k epochs so that a run has at "
            "most this many evaluations: 5 images at batch 32 are one step per epoch, and 2,000 evaluations and "
            "checkpoints would cost more than the training. 0 keeps one per epoch"
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "transfer tasks: stop after this many evaluations without a better metric_for_best_model "
            "(transformers' EarlyStoppingCallback); the best checkpoint is then reloaded"
        },
    )

    def __post_init__(self):
        self.push_at_end = bool(self.push_to_hub)  # see the module docstring
        self.push_to_hub = False
        on_gpu = torch.cuda.is_available() and not self.use_cpu
        if self.bf16 and self.precision == "auto":
            self.precision = "bf16"  # transformers' own `bf16: true` is a request for bf16, not to be overridden
        if self.precision == "auto":
            self.bf16 = bool(on_gpu and torch.cuda.is_bf16_supported())
        else:
            self.bf16 = self.precision == "bf16"
        if self.bf16 and not _has_accelerator():
            self.use_cpu = True  # TrainingArguments refuses bf16 on a machine without GPU unless told it is a CPU run
        # On a CPU with native bf16, "auto" is settled by `performance.choose_precision` on the real model and batch.
        self.measure_precision = self.precision == "auto" and not on_gpu and cpu_has_native_bf16()
        super().__post_init__()
        if self.base_learning_rate is not None:
            self.learning_rate = self.base_learning_rate * self.effective_batch_size / 256
        if not on_gpu:
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        elif self.gpu_dataloader and self.dataloader_num_workers == 0:
            per_process = usable_cores() // max(1, torch.cuda.device_count())
            self.dataloader_num_workers = max(0, min(8, per_process - 1))  # one core stays with the training process
            if self.dataloader_num_workers:
                self.dataloader_persistent_workers, self.dataloader_prefetch_factor = True, 4

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * max(1, self.world_size)

    def ensure_min_steps(self, num_train_samples: int) -> None:
        """Raise `num_train_epochs` so that training runs at least `min_train_steps` optimizer steps (and thin out
        per-epoch evaluation to at most `max_evaluations`)."""
        if self.max_steps > 0 or not self.min_train_steps or not num_train_samples:
            return
        steps_per_epoch = math.ceil(num_train_samples / self.effective_batch_size)
        if self.num_train_epochs * steps_per_epoch >= self.min_train_steps:
            return
        self.num_train_epochs = math.ceil(self.min_train_steps / steps_per_epoch)
        every = math.ceil(self.num_train_epochs / self.max_evaluations) if self.max_evaluations else 1
        if every > 1 and self.eval_strategy == IntervalStrategy.EPOCH:
            # Same cadence in steps, on epoch boundaries; saving follows it (best-model selection needs both alike).
            self.eval_strategy, self.eval_steps = IntervalStrategy.STEPS, every * steps_per_epoch
            if self.save_strategy == SaveStrategy.EPOCH:
                self.save_strategy, self.save_steps = SaveStrategy.STEPS, every * steps_per_epoch

    def use_bf16(self, enabled: bool) -> None:
        """Switch bf16 autocast before the Trainer is built (its accelerator reads `mixed_precision` then)."""
        self.bf16 = enabled
        self.mixed_precision = "bf16" if enabled else "no"


__all__ = ["MedTrainingArguments"]
