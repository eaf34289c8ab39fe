"""`MedTrainingArguments`: transformers' `TrainingArguments` with our run-wide choices resolved in `__post_init__`.

As transformers' own examples do, the subclass settles everything the Trainer and its accelerator read
at construction before they exist: the precision (`bf16` decides the accelerator's mixed precision;
setting it afterwards silently trains in fp32), the MAE learning-rate rule, and Hub pushing (we push
once, at the end, with our model card, so the Trainer's own pushes and its pickled `training_args.bin`
upload are switched off and remembered in `push_at_end`).

What only the task or the machine knows (the training set's length, the metric that selects a checkpoint, the
columns the model reads, the measured precision) is settled by one step, `MedTrainingArguments.settle`, which
returns a new object for the Trainer: the parsed arguments themselves never change.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from .errors import ConfigError
from .performance import cpu_has_native_bf16, usable_cores

logger = logging.getLogger(__name__)


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
    device_augment: Literal["auto", "true", "false"] = field(
        default="auto",
        metadata={
            "help": "pre-training: normalisation, flips and 90-degree turns of the training views run batched on the "
            "training device, the loader's CPU cores only decode and crop (same views and masks); auto: on a GPU"
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
        self.augment_on_device = self.device_augment == "true" or (self.device_augment == "auto" and on_gpu)
        if not on_gpu:
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        elif self.dataloader_pin_memory:
            self.accelerator_config.non_blocking = True  # pinned batches copy to the GPU while the step runs
        elif self.gpu_dataloader and self.dataloader_num_workers == 0:
            per_process = usable_cores() // max(1, torch.cuda.device_count())
            self.dataloader_num_workers = max(0, min(8, per_process - 1))  # one core stays with the training process
            if self.dataloader_num_workers:
                self.dataloader_persistent_workers, self.dataloader_prefetch_factor = True, 4

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * max(1, self.world_size)

    def settle(
        self,
        *,
        num_train_samples: int | None = None,
        select_on: str | None = None,
        selection_metrics: tuple[str, ...] | None = None,
        keep_columns: bool = False,
        loss_only_eval: bool = False,
        bf16: bool | None = None,
        dispatch_batches: bool | None = None,
    ) -> MedTrainingArguments:
        """The arguments the Trainer is built with: a copy of these with what the task and the machine decided.

        The copy is rebuilt through `__post_init__` (as `dataclasses.replace` does), so fields derived from the
        changed ones (the accelerator's `mixed_precision` from the precision, say) follow them; `self` is unchanged.

        Args:
            num_train_samples: the training set's length; `num_train_epochs` is raised so that training runs at
                least `min_train_steps` optimizer steps, and per-epoch evaluation is thinned out to at most
                `max_evaluations` (None: a stream, whose schedule is `max_steps`).
            select_on: the validation metric that picks the checkpoint when `metric_for_best_model` is not set
                (None: no selection, the last model is kept).
            selection_metrics: the metrics `metric_for_best_model` may name (None: any).
            keep_columns: the model reads inputs the Trainer would drop (`remove_unused_columns: false`).
            loss_only_eval: evaluation needs the loss, not every prediction (`prediction_loss_only: true`).
            bf16: the precision settled at start-up (measured, or read from the resumed checkpoint); None keeps it.
            dispatch_batches: accelerate's `dispatch_batches` when the config leaves it unset.

        Returns:
            A new `MedTrainingArguments`.

        Example:
            >>> args = MedTrainingArguments(output_dir="out", use_cpu=True, min_train_steps=100)
            >>> args.settle(num_train_samples=16).num_train_epochs, args.num_train_epochs
            (50, 3.0)
        """
        changes = {}
        if keep_columns:
            changes["remove_unused_columns"] = False
        if loss_only_eval:
            changes["prediction_loss_only"] = True
        if select_on is not None:
            changes.update(self._selection(select_on, selection_metrics))
        if num_train_samples is not None:
            changes.update(self._min_steps(num_train_samples))
        if bf16 is not None and bf16 != self.bf16:
            changes["precision"] = "bf16" if bf16 else "fp32"
        if dispatch_batches is not None and self.accelerator_config.dispatch_batches is None:
            changes["accelerator_config"] = dataclasses.replace(
                self.accelerator_config, dispatch_batches=dispatch_batches
            )
        # `__post_init__` turned the request to push into `push_at_end`; the copy is rebuilt from the request
        return dataclasses.replace(self, push_to_hub=self.push_at_end, **changes)

    def _selection(self, default_metric: str, allowed: tuple[str, ...] | None) -> dict:
        """One best-model policy for the transfer tasks: evaluate and save on one schedule, pick on validation.

        The Trainer records the best checkpoint (`metric_for_best_model`) and keeps it through `save_total_limit`;
        the run reloads it strictly after training, so the Trainer's own non-strict `load_best_model_at_end` is
        switched off, and a config that omits it still gets the best model. Without evaluation
        (`eval_strategy: no`) nothing can be selected: the last model is kept, and said so.
        """
        if self.eval_strategy == "no":
            logger.warning(
                "eval_strategy is 'no': the last model is kept, not the best on validation "
                "(set eval_strategy and save_strategy to epoch or steps to select one)"
            )
            return {"load_best_model_at_end": False}
        if self.save_strategy != self.eval_strategy:
            raise ConfigError(
                f"save_strategy {self.save_strategy} differs from eval_strategy {self.eval_strategy}.",
                "use the same value for both (e.g. epoch).",
            )
        metric, greater = self.metric_for_best_model, self.greater_is_better
        if metric is None or (metric == "loss" and greater is False):  # "loss" is only TrainingArguments' default
            metric, greater = default_metric, True
        if allowed is not None and metric.removeprefix("eval_") not in allowed:
            raise ConfigError(
                f"metric_for_best_model={metric!r} is not a validation metric.", f"use one of {', '.join(allowed)}."
            )
        if greater is None:
            greater = not metric.endswith("loss")
        return {"metric_for_best_model": metric, "greater_is_better": greater, "load_best_model_at_end": False}

    def _min_steps(self, num_train_samples: int) -> dict:
        """The epochs (and evaluation cadence) that give at least `min_train_steps` optimizer steps."""
        if self.max_steps > 0 or not self.min_train_steps or not num_train_samples:
            return {}
        steps_per_epoch = math.ceil(num_train_samples / self.effective_batch_size)
        if self.num_train_epochs * steps_per_epoch >= self.min_train_steps:
            return {}
        changes = {"num_train_epochs": math.ceil(self.min_train_steps / steps_per_epoch)}
        every = math.ceil(changes["num_train_epochs"] / self.max_evaluations) if self.max_evaluations else 1
        if every > 1 and self.eval_strategy == IntervalStrategy.EPOCH:
            # Same cadence in steps, on epoch boundaries; saving follows it (best-model selection needs both alike).
            changes.update(eval_strategy=IntervalStrategy.STEPS, eval_steps=every * steps_per_epoch)
            if self.save_strategy == SaveStrategy.EPOCH:
                changes.update(save_strategy=SaveStrategy.STEPS, save_steps=every * steps_per_epoch)
        return changes


__all__ = ["MedTrainingArguments"]
