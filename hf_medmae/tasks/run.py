"""The run sequence all three tasks share, around transformers' `Trainer`.

parse (`--config` + flags) -> check the output folder -> one of three modes:

* **train**: seed -> the task builds data and model (`Task.setup`) -> the arguments settled (`settle`: the
  precision, the epochs, the selection metric, in one copy made by `MedTrainingArguments.settle`) -> `Trainer` (the
  image processor as `processing_class`, so every `checkpoint-N` carries its normalisation) -> train,
  resuming from the last complete checkpoint -> the task reports (`Task.report`: reload of the best
  checkpoint, test metrics, plots, the saved model);
* **probe** (`TaskSetup.mode == "probe"`, e.g. classification's `mode: frozen_features`): seed -> `Task.setup`
  -> the task fits and saves the model without the Trainer and reports (`Task.probe`);
* **predict** (`--predict_only`): a trained model classifies new data (`Task.predict`), nothing is trained;

then, for train and probe, all_results.json, run_info.json and the Hub push, once, on the main process.
A new task is a `Task` subclass with `setup` and `report`; its setup declares what the Trainer's arguments must
allow (`TaskSetup.keep_columns`, `loss_only_eval`, `select_on`), it never assigns to them.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedModel, Trainer, ViTImageProcessorPil, default_data_collator, set_seed

from ..arguments import MedTrainingArguments
from ..cli import parse_config, spatial_dims
from ..encoder import encoder_normalisation
from ..errors import ConfigError, MedMAEError
from ..hub import push_checkpoint
from ..loading import load_checkpoint
from ..performance import apply_fast_defaults, choose_precision
from ..training import (
    CHOICES_FILE,
    ChoicesCallback,
    MedTrainer,
    NonFiniteStepGuard,
    ProcessSeedCallback,
    SelectionEarlyStopping,
    check_writable,
    hardware_description,
    resolve_resume,
    write_run_info,
)

logger = logging.getLogger(__name__)

StateT = TypeVar("StateT")


@dataclass
class TaskSetup(Generic[StateT]):
    """What a task hands the shared sequence: model, data, processor and the Trainer's task-specific pieces.

    Args:
        select_on: for transfer tasks, the validation metric that picks the checkpoint by default
            (`metric_for_best_model` overrides it); None for pre-training (the last model is kept).
        selection_metrics: the metrics `metric_for_best_model` may name (None: any).
        keep_columns: the model reads inputs beyond what its `forward` names first (sample ids, labels), so the
            Trainer keeps every column (`remove_unused_columns: false`).
        loss_only_eval: evaluation needs the loss only, not every prediction (`prediction_loss_only: true`).
        dispatch_batches: accelerate's `dispatch_batches` unless the config sets it (a stream read per process).
        extras: the task's own values that `report` / `probe` need again, as the task's dataclass
            (e.g. `ClassifyState`).
        mode: "train" (the Trainer trains `model`, `Task.report` reports) or "probe" (`Task.probe` fits `model`
            without the Trainer, saves it and reports).
    """

    model: PreTrainedModel
    train_dataset: Dataset
    eval_dataset: Dataset | None
    processor: ViTImageProcessorPil
    dataset_name: str
    callbacks: list = field(default_factory=list)
    trainer_kwargs: dict = field(default_factory=dict)
    select_on: str | None = None
    selection_metrics: tuple[str, ...] | None = None
    keep_columns: bool = False
    loss_only_eval: bool = False
    dispatch_batches: bool | None = None
    extras: StateT | None = None
    mode: str = "train"  # "train" (the Trainer) | "probe" (`Task.probe` fits the model without the Trainer)


class Task:
    """One task: its argument dataclasses, how it builds a run, and what it reports after training."""

    arguments: tuple = ()

    def arguments_for(self, spatial_dims: int) -> tuple:
        """The argument dataclasses for 2D images or 3D volumes; a task that takes both overrides this."""
        return self.arguments

    def setup(self, model_args, data_args, args: MedTrainingArguments) -> TaskSetup:
        raise NotImplementedError

    def report(self, trainer: Trainer, setup: TaskSetup, model_args, data_args, is_main: bool) -> dict:
        raise NotImplementedError

    def probe(self, setup: TaskSetup, model_args, data_args, args: MedTrainingArguments, is_main: bool) -> dict:
        """Mode probe: fit `setup.model` without the Trainer, save it and report, for tasks that have that mode."""
        raise ConfigError(f"{type(self).__name__} has no probe mode.", "train the model instead.")

    def weights_from(self, model_args) -> str | None:
        """The checkpoint the model's weights start from (an MAE to fine-tune or continue), for the data lineage
        `run_info.json` and the model card record; None from scratch."""
        return None

    def summary(self, metrics: dict, output_dir: str) -> str:
        """A few lines for the person at the terminal: how it went, where the outputs are, what to try next."""
        return f"outputs in {output_dir}"

    def predict(self, model_args, data_args, args: MedTrainingArguments) -> dict:
        """No training: use a trained model (`--predict_only`), for tasks that have that mode."""
        raise ConfigError(f"{type(self).__name__} has no predict_only mode.", "drop --predict_only.")

    def main(self, argv: list[str] | None = None) -> dict:
        model_args, data_args, args = parse_config(self.arguments_for(spatial_dims(argv)), argv)
        self.output_dir = args.output_dir
        logging.basicConfig(level=logging.INFO if args.process_index == 0 else logging.WARNING)
        check_writable(args.output_dir)
        if getattr(model_args, "predict_only", False):
            return self.predict(model_args, data_args, args)
        set_seed(args.seed)
        setup = self.setup(model_args, data_args, args)
        return run(self, setup, model_args, data_args, args)


def load_best_checkpoint(trainer: Trainer) -> None:
    """Put the best-on-validation weights into `trainer.model`, every key checked (`loading.load_checkpoint`)."""
    best = trainer.state.best_model_checkpoint
    if best is None:
        raise ConfigError(
            "no checkpoint was saved during training, so none can be selected.",
            "train for at least one eval/save step.",
        )
    logger.info(
        "selected %s on validation (%s = %.4f)", best, trainer.args.metric_for_best_model, trainer.state.best_metric
    )
    loaded = load_checkpoint(type(trainer.model), best)
    trainer.model.load_state_dict(loaded.state_dict(), strict=True)


def settle_precision(args: MedTrainingArguments, setup: TaskSetup, resume: str | None = None) -> dict:
    """`precision: auto` on a CPU with native bf16: measure fp32 vs bf16 on the real model and batch, then decide.

    A resumed run takes the choices its checkpoint recorded (precision and attention kernel) instead of
    measuring again: a busy machine could otherwise switch them halfway through a run. `args` is only read:
    `settle` passes the decision to `MedTrainingArguments.settle`.

    Returns:
        "precision" ("bf16" or "fp32") and where it came from ("precision_from") or what was measured
        ("precision_step_runtime").
    """
    saved = Path(resume, CHOICES_FILE) if resume else None
    if saved is not None and saved.is_file():
        choices = json.loads(saved.read_text())
        bf16 = choices.get("precision") == "bf16" if args.precision == "auto" else args.bf16
        if choices.get("attn_implementation") and hasattr(setup.model, "set_attn_implementation"):
            setup.model.set_attn_implementation(choices["attn_implementation"])
        return {"precision": "bf16" if bf16 else "fp32", "precision_from": str(saved)}
    if not args.measure_precision:
        return {"precision": "bf16" if args.bf16 else "fp32"}
    if hasattr(setup.train_dataset, "__len__"):
        items = [
            setup.train_dataset[i] for i in range(min(args.per_device_train_batch_size, len(setup.train_dataset)))
        ]
    else:  # a stream: its first items
        items = list(itertools.islice(iter(setup.train_dataset), args.per_device_train_batch_size))
    batch = default_data_collator(items)
    use, seconds = choose_precision(setup.model.to(args.device), batch)
    return {"precision": "bf16" if use else "fp32", "precision_step_runtime": seconds}


def settle(
    args: MedTrainingArguments, setup: TaskSetup, resume: str | None = None
) -> tuple[MedTrainingArguments, dict]:
    """The one step between the parsed arguments and the Trainer: what the task declared and the machine decided.

    Args:
        args: the parsed arguments.
        setup: the task's setup: its training set, selection metric and needs (`keep_columns`, ...).
        resume: the checkpoint the run resumes from, whose recorded precision is kept (None: a new run).

    Returns:
        The settled copy of `args` (`MedTrainingArguments.settle`; `args` itself is unchanged) and the
        precision facts for `all_results.json` (`settle_precision`).
    """
    precision = settle_precision(args, setup, resume)
    settled = args.settle(
        num_train_samples=len(setup.train_dataset) if hasattr(setup.train_dataset, "__len__") else None,
        select_on=setup.select_on,
        selection_metrics=setup.selection_metrics,
        keep_columns=setup.keep_columns,
        loss_only_eval=setup.loss_only_eval,
        bf16=precision["precision"] == "bf16",
        dispatch_batches=setup.dispatch_batches,
    )
    apply_fast_defaults(settled)
    return settled, precision


def run(task: Task, setup: TaskSetup, model_args, data_args, args: MedTrainingArguments) -> dict:
    """Fit `setup` (train with the Trainer, or the task's probe), then save metrics and run info and push."""
    if setup.mode == "probe":
        is_main = args.process_index == 0
        metrics = {
            **task.probe(setup, model_args, data_args, args, is_main),
            "hardware": hardware_description(),
            "global_step": 0,
            "epoch": 0.0,
        }
    elif setup.mode == "train":
        metrics, is_main, args = train(task, setup, model_args, data_args, args)
    else:
        raise ConfigError(f"TaskSetup.mode {setup.mode!r} is unknown.", "use 'train' or 'probe'.")
    if is_main:
        finish(args, setup, metrics, task.weights_from(model_args))
    return metrics


def train(
    task: Task, setup: TaskSetup, model_args, data_args, args: MedTrainingArguments
) -> tuple[dict, bool, MedTrainingArguments]:
    """Mode train: the Trainer trains `setup.model`, the best checkpoint is reloaded, the task reports.

    Returns:
        The metrics, whether this is the main process, and the settled arguments the Trainer ran with.
    """
    resume = resolve_resume(args)
    args, precision = settle(args, setup, resume)
    # a transfer task selects on validation; without evaluation the last model is kept (`settle` warned)
    selecting = setup.select_on is not None and args.eval_strategy != "no"
    guard = NonFiniteStepGuard()
    callbacks = [ProcessSeedCallback(), guard, *setup.callbacks]
    if selecting and args.early_stopping_patience:
        callbacks.append(SelectionEarlyStopping(early_stopping_patience=args.early_stopping_patience))
    callbacks.append(
        ChoicesCallback(
            {
                "precision": precision["precision"],
                "attn_implementation": getattr(setup.model.config, "_attn_implementation", None),
            }
        )
    )
    trainer = MedTrainer(
        model=setup.model,
        args=args,
        train_dataset=setup.train_dataset,
        eval_dataset=setup.eval_dataset,
        processing_class=setup.processor,
        callbacks=callbacks,
        **setup.trainer_kwargs,
    )
    # callbacks that add to the logged values must run before the printing ones (stable: the rest keep their order)
    trainer.callback_handler.callbacks.sort(key=lambda cb: not getattr(cb, "logs_first", False))
    train_result = trainer.train(resume_from_checkpoint=resume)
    if selecting:
        load_best_checkpoint(trainer)
    is_main = trainer.is_world_process_zero()
    metrics = {
        **train_result.metrics,
        **task.report(trainer, setup, model_args, data_args, is_main),
        **precision,
        "hardware": hardware_description(),
        "global_step": trainer.state.global_step,
        "skipped_nonfinite_steps": guard.skipped,
    }
    return metrics, is_main, args


def finish(args: MedTrainingArguments, setup: TaskSetup, metrics: dict, parent: str | None = None) -> None:
    """The end of every run that made a model: all_results.json, run_info.json (with `parent`'s data lineage), and
    the Hub push when asked."""
    Path(args.output_dir, "all_results.json").write_text(json.dumps(metrics, indent=4, sort_keys=True, default=str))
    sized = hasattr(setup.train_dataset, "__len__")
    write_run_info(args, setup.dataset_name, len(setup.train_dataset) if sized else None, metrics, parent)
    if args.push_at_end:
        repo_id = args.hub_model_id or args.output_dir.rstrip("/").split("/")[-1]
        push_checkpoint(
            args.output_dir,
            repo_id,
            private=bool(args.hub_private_repo),
            revision=args.hub_revision,
            token=args.hub_token,
            commit_message="hf_medmae: end of training",
        )


def console(task: Task) -> None:
    """Run a task from the command line: its metrics as JSON, or our error's problem and fix without a traceback.

    `ConfigError` / `DataError` / `CheckpointError` are the user's to fix, so they print as two lines and
    exit with status 2; `HF_MEDMAE_TRACEBACK=1` shows the full traceback as well. Other exceptions are
    bugs or crashes and keep their traceback.
    """
    try:
        metrics = task.main()
    except MedMAEError as err:
        if os.environ.get("HF_MEDMAE_TRACEBACK", "").strip() not in ("", "0"):
            raise
        print(
            f"error: {err.problem}\n  fix: {err.fix}\n  (HF_MEDMAE_TRACEBACK=1 shows where it was raised)",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    finally:
        # a process group left to interpreter teardown can abort a rank on exit (gloo's threads still running)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    print(json.dumps(metrics, indent=2, default=str))
    if getattr(task, "output_dir", None) and int(os.environ.get("RANK", "0")) == 0:
        print("\n" + task.summary(metrics, task.output_dir))


__all__ = [
    "Task",
    "TaskSetup",
    "console",
    "encoder_normalisation",
    "finish",
    "load_best_checkpoint",
    "run",
    "settle",
    "settle_precision",
    "train",
]
