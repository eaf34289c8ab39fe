#!/usr/bin/env python
"""Fine-tune (or linearly probe) an MAE encoder, or the same ViT from scratch, on labelled images.

    python run_classification.py --config configs/wbc_classification.yaml
    python run_classification.py --config configs/wbc_classification.yaml --init scratch   # one flag apart

The checkpoint is selected on the validation split (`metric_for_best_model`, default macro_f1);
the test split is used once, at the end, for `test_metrics.json` and the plots.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit, softmax
from sklearn.metrics import precision_recall_fscore_support
from transformers import Trainer, TrainingArguments, ViTConfig, ViTImageProcessorPil, ViTModel, set_seed

from hf_medmae.classification import MULTI, SINGLE, MedClsForImageClassification, freeze
from hf_medmae.cli import parse_config
from hf_medmae.data.classification import ClassificationDataset, LabelledImages, class_counts, label_subset, load_class_folders, load_csv_labels, stratified_split
from hf_medmae.data.pretraining import Augment, channel_stats
from hf_medmae.encoder import load_encoder
from hf_medmae.errors import CheckpointError, ConfigError, DataError
from hf_medmae.metrics import classification_metrics, compute_metrics_fn
from hf_medmae.optim import param_groups_layer_decay
from hf_medmae.hub import push_run, take_over_push
from hf_medmae.performance import apply_fast_defaults
from hf_medmae.training import ProcessSeedCallback, check_writable, hardware_description, resolve_precision, resolve_resume, write_run_info

logger = logging.getLogger("run_classification")


@dataclass
class DataArguments:
    data_dir: str = field(metadata={"help": "image folder: one sub-folder per class, or the images a labels_csv names"})
    labels_csv: str | None = field(default=None, metadata={"help": "CSV of id,label; without it data_dir has class sub-folders"})
    id_column: str = field(default="filename", metadata={"help": "CSV column with the file name or id"})
    label_column: str = field(default="label", metadata={"help": "CSV column with the class (name or integer)"})
    label_columns: list[str] | None = field(default=None, metadata={"help": "multi-label: the 0/1 columns, one per label"})
    filename_template: str | None = field(default=None, metadata={"help": "id -> file name, e.g. '{id:03d}.bmp'"})
    class_names: list[str] | None = field(default=None, metadata={"help": "class order; default: sorted labels / folder names"})
    label_offset: int = field(default=0, metadata={"help": "subtracted from integer labels (1 for classes 1..K)"})
    label_map: dict | None = field(default=None, metadata={"help": "{raw CSV value: class name or integer}"})
    multi_label: bool = field(default=False, metadata={"help": "several 0/1 labels per image (sigmoid + BCE)"})
    validation_fraction: float = 0.15
    test_fraction: float = 0.2
    split_seed: int | None = field(default=None, metadata={"help": "seed of the split and label subset; default: seed"})
    train_fraction: float = field(default=1.0, metadata={"help": "share of the TRAIN split's labels used (stratified, >= 1 per class)"})
    strict_fraction: bool = field(default=False, metadata={"help": "error instead of keeping one example of a class the fraction empties"})
    on_bad_file: str = field(default="error", metadata={"help": "error | skip"})
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0], metadata={"help": "random resized crop area range"})
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True


@dataclass
class ModelArguments:
    init: str = field(default="mae", metadata={"help": "mae (encoder weights of the checkpoint) | scratch (same architecture, random)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "MAE/ViT checkpoint dir or Hub id"})
    image_size: int = 64
    patch_size: int | None = field(default=None, metadata={"help": "scratch without checkpoint (default 8); else must match the checkpoint"})
    hidden_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    intermediate_size: int = 768
    pooling: str = field(default="mean", metadata={"help": "mean | cls"})
    mode: str = field(default="full", metadata={"help": "full | linear_probe | last_k:<k>"})
    layer_decay: float = 0.75
    drop_path_rate: float = 0.1
    head_dropout: float = 0.0
    label_smoothing: float = 0.0
    class_weighting: str = field(default="none", metadata={"help": "none | balanced (inverse class frequency in the training subset)"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp32"})


def load_data(args: DataArguments) -> LabelledImages:
    """The labelled images of either layout."""
    if args.labels_csv is None:
        if args.multi_label:
            raise DataError("multi-label config with single-label data: class sub-folders give one label per image.",
                            "give a labels_csv with one 0/1 column per label, or set multi_label: false.")
        return load_class_folders(args.data_dir, args.class_names, args.on_bad_file)
    return load_csv_labels(args.data_dir, args.labels_csv, args.id_column, args.label_columns or [args.label_column],
                           args.filename_template, args.class_names, args.label_offset, args.label_map,
                           args.multi_label, args.on_bad_file)  # fmt: skip


def check_channels(data: LabelledImages) -> int:
    counts = sorted({im.shape[0] for im in data.images})
    if len(counts) > 1:
        raise DataError(f"the images mix {counts} channels.", "convert all images to one channel count (e.g. RGB).")
    return counts[0]


def build_encoder(args: ModelArguments, channels: int) -> ViTModel:
    """The encoder: the checkpoint's weights (mae), or its architecture randomly initialised (scratch)."""
    if args.init not in {"mae", "scratch"}:
        raise ConfigError(f"init={args.init!r} is unknown.", "use init: mae or init: scratch.")
    if args.model_name_or_path is None:
        if args.init == "mae":
            raise ConfigError("init: mae needs model_name_or_path.", "point model_name_or_path at an MAE checkpoint, or use init: scratch.")
        config = ViTConfig(image_size=args.image_size, patch_size=args.patch_size or 8, num_channels=channels, hidden_size=args.hidden_size,
                           num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
                           intermediate_size=args.intermediate_size)  # fmt: skip
        return ViTModel(config, add_pooling_layer=False)
    encoder = load_encoder(args.model_name_or_path, image_size=args.image_size)
    found = encoder.config
    if args.patch_size is not None and args.patch_size != found.patch_size:
        raise CheckpointError(f"the checkpoint has patch size {found.patch_size}, the config asks for {args.patch_size}.",
                              f"set patch_size: {found.patch_size} (or remove it), or use a checkpoint pre-trained with patch {args.patch_size}.")
    if found.num_channels != channels:
        raise DataError(f"the checkpoint expects {found.num_channels}-channel images, the data has {channels} channels.",
                        f"use images with {found.num_channels} channels, or pre-train an MAE on {channels}-channel images.")
    if args.init == "scratch":  # same architecture, fresh weights: the comparison is one flag apart
        encoder = ViTModel(encoder.config, add_pooling_layer=False)
        encoder.image_mean = encoder.image_std = None
    return encoder


def normalisation(encoder: ViTModel, train_images: list[np.ndarray], init: str) -> tuple[list[float], list[float]]:
    """Checkpoint statistics for init=mae (the encoder learned on them), else the train split's."""
    mean, std = getattr(encoder, "image_mean", None), getattr(encoder, "image_std", None)
    if init == "mae" and mean is not None and std is not None:
        return list(mean), list(std)
    if init == "mae":
        logger.warning("the checkpoint stores no image_mean/std: normalising with the train split's statistics")
    return channel_stats(train_images)


def class_weights(labels: np.ndarray, num_labels: int, how: str) -> list[float] | None:
    """'balanced': n / (classes present x count), 1.0 for classes absent from training; 'none': None."""
    if how == "none":
        return None
    if how != "balanced":
        raise ConfigError(f"class_weighting={how!r} is unknown.", "use none or balanced.")
    if labels.ndim == 2:
        raise ConfigError("class_weighting: balanced is for single-label data.", "use class_weighting: none with multi_label.")
    counts = np.bincount(labels, minlength=num_labels)
    present = counts > 0
    weights = np.ones(num_labels)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.tolist()


def build_datasets(data: LabelledImages, data_args: DataArguments, image_size: int, seed: int, mean_std) -> dict:
    """Split, label subset and the three datasets, with per-class counts for the report."""
    split = stratified_split(data.labels, data.class_names, data_args.validation_fraction, data_args.test_fraction, seed)
    subset = split.train[label_subset(data.labels[split.train], data.class_names, data_args.train_fraction, seed, data_args.strict_fraction)]
    if len(split.val) == 0:
        raise DataError("the validation split is empty, so no checkpoint can be selected.", "set validation_fraction > 0 (e.g. 0.15).")
    augment = Augment(image_size, tuple(data_args.crop_scale), hflip=data_args.hflip, vflip=data_args.vflip, rot90=data_args.rot90)
    mean, std = mean_std(split.train)

    def make(idx, aug=None):
        return ClassificationDataset([data.images[i] for i in idx], data.labels[idx], mean, std, image_size, aug)

    counts = {name: class_counts(data.labels[idx], data.class_names) for name, idx in (("train", subset), ("val", split.val), ("test", split.test))}
    files = {name: [data.files[i] for i in idx] for name, idx in (("train", subset), ("val", split.val), ("test", split.test))}
    return {"train": make(subset, augment), "val": make(split.val), "test": make(split.test) if len(split.test) else None,
            "train_labels": data.labels[subset], "counts": counts, "files": files, "mean": mean, "std": std,
            "train_only_classes": split.train_only_classes}  # fmt: skip


def build_model(encoder: ViTModel, data: LabelledImages, args: ModelArguments, weights, mean, std) -> MedClsForImageClassification:
    encoder.config.image_mean, encoder.config.image_std = mean, std  # travel in the classifier's config
    drop_path = 0.0 if args.mode == "linear_probe" else args.drop_path_rate  # a frozen encoder gets no stochastic depth
    model = MedClsForImageClassification.from_encoder(
        encoder, len(data.class_names), id2label=dict(enumerate(data.class_names)), pooling=args.pooling,
        drop_path_rate=drop_path, head_dropout=args.head_dropout, label_smoothing=args.label_smoothing,
        class_weights=weights, problem_type=MULTI if data.multi_label else SINGLE,
    )  # fmt: skip
    trainable = freeze(model, args.mode)
    logger.info("init %s, mode %s: %d trainable parameters of %d", args.init, args.mode, trainable, model.num_parameters())
    return model


SELECTION_METRICS = ("loss", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_precision", "macro_recall", "roc_auc", "micro_f1", "subset_accuracy")


def check_selection(args: TrainingArguments) -> None:
    """Checkpoints are chosen on validation: evaluation and saving must run on the same schedule.

    The Trainer records the best checkpoint (`metric_for_best_model`, default macro_f1) and keeps it
    through `save_total_limit`; we reload it ourselves (`load_best_checkpoint`), so
    `load_best_model_at_end` is switched off (see there why).
    """
    if args.eval_strategy == "no":
        raise ConfigError("eval_strategy is 'no', so no checkpoint can be selected on validation.", "set eval_strategy: epoch (and save_strategy: epoch).")
    if args.save_strategy != args.eval_strategy:
        raise ConfigError(f"save_strategy {args.save_strategy} differs from eval_strategy {args.eval_strategy}.", "use the same value for both (e.g. epoch).")
    if args.metric_for_best_model is None or (args.load_best_model_at_end and args.metric_for_best_model == "loss" and args.greater_is_better is False):
        args.metric_for_best_model, args.greater_is_better = "macro_f1", True  # "loss" here is only TrainingArguments' default
    if args.metric_for_best_model.removeprefix("eval_") not in SELECTION_METRICS:
        raise ConfigError(f"metric_for_best_model={args.metric_for_best_model!r} is not a validation metric.", f"use one of {', '.join(SELECTION_METRICS)}.")
    if args.greater_is_better is None:
        args.greater_is_better = not args.metric_for_best_model.endswith("loss")
    args.load_best_model_at_end = False


def load_best_checkpoint(trainer: Trainer) -> None:
    """Put the best-on-validation weights into `trainer.model`.

    The Trainer's own `load_best_model_at_end` reloads with a non-strict `load_state_dict`, which
    ignores any key it does not find. Our models save current key names (`CurrentKeyNamesMixin`), so
    that works today; this strict reload turns any future key mismatch into an error, not stale weights.
    """
    best = trainer.state.best_model_checkpoint
    if best is None:
        raise ConfigError("no checkpoint was saved during training, so none can be selected.", "train for at least one eval/save step.")
    logger.info("selected %s on validation (%s = %.4f)", best, trainer.args.metric_for_best_model, trainer.state.best_metric)
    loaded = type(trainer.model).from_pretrained(best, use_safetensors=True)
    trainer.model.load_state_dict(loaded.state_dict(), strict=True)


def present_class_scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Macro precision/recall/F1 over the classes present in `labels` (train-only classes left out of the mean)."""
    present = np.unique(labels)
    p, r, f, _ = precision_recall_fscore_support(labels, probs.argmax(1), labels=present, average="macro", zero_division=0)
    return {"macro_precision_present": float(p), "macro_recall_present": float(r), "macro_f1_present": float(f)}


def evaluate_test(trainer: Trainer, sets: dict, class_names: list[str], multi_label: bool, output_dir: str) -> dict:
    """Metrics of the selected model on the test split, plus the three plots (single-label)."""
    from hf_medmae.plots import plot_confidence, plot_confusion_matrix, plot_reliability

    logits = trainer.predict(sets["test"]).predictions
    logits = (logits[0] if isinstance(logits, tuple) else logits).astype(np.float64)
    probs = expit(logits) if multi_label else softmax(logits, axis=-1)  # [N, K]
    labels = sets["test"].labels.numpy()
    metrics = classification_metrics(probs, labels, class_names, multi_label)
    if not multi_label:
        metrics.update(present_class_scores(probs, labels))
        plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), class_names, f"{output_dir}/confusion_matrix.png")
        if 0 < int((probs.argmax(1) == labels).sum()) < len(labels):
            plot_confidence(probs, labels, class_names, f"{output_dir}/confidence.png")
        else:  # hf_medmae.plots.plot_confidence cannot draw an empty correct (or wrong) group
            logger.warning("confidence.png not drawn: every test prediction is %s", "right" if metrics["accuracy"] == 1 else "wrong")
        plot_reliability(probs, labels, f"{output_dir}/reliability.png")
    return metrics


def save_outputs(trainer: Trainer, sets: dict, image_size: int, report: dict, output_dir: str) -> None:
    trainer.save_model()  # the selected (best-on-validation) model, as safetensors
    processor = ViTImageProcessorPil(do_resize=True, size={"height": image_size, "width": image_size}, do_rescale=False,
                                     image_mean=sets["mean"], image_std=sets["std"])  # fmt: skip
    processor.save_pretrained(output_dir)
    Path(output_dir, "splits.json").write_text(json.dumps(sets["files"], indent=1))
    Path(output_dir, "test_metrics.json").write_text(json.dumps(report, indent=2, default=str))


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_config((ModelArguments, DataArguments, TrainingArguments), argv)
    logging.basicConfig(level=logging.INFO if training_args.process_index == 0 else logging.WARNING)
    check_writable(training_args.output_dir)
    check_selection(training_args)
    set_seed(training_args.seed)
    seed = training_args.seed if data_args.split_seed is None else data_args.split_seed
    data = load_data(data_args)
    encoder = build_encoder(model_args, check_channels(data))
    sets = build_datasets(data, data_args, model_args.image_size, seed,
                          lambda idx: normalisation(encoder, [data.images[i] for i in idx], model_args.init))  # fmt: skip
    weights = class_weights(sets["train_labels"], len(data.class_names), model_args.class_weighting)
    model = build_model(encoder, data, model_args, weights, sets["mean"], sets["std"])
    resolve_precision(training_args, model_args.precision)
    apply_fast_defaults(training_args)
    push = take_over_push(training_args)  # we push once at the end, with our model card
    training_args.remove_unused_columns = False
    groups = param_groups_layer_decay(model, training_args.learning_rate, training_args.weight_decay, model_args.layer_decay)
    trainer = Trainer(model=model, args=training_args, train_dataset=sets["train"], eval_dataset=sets["val"],
                      callbacks=[ProcessSeedCallback()],
                      compute_metrics=compute_metrics_fn(data.class_names, data.multi_label),
                      optimizer_cls_and_kwargs=(torch.optim.AdamW, {"params": groups, "betas": (0.9, 0.999)}))  # fmt: skip
    logger.info("per-class counts %s; train-only classes %s", sets["counts"], sets["train_only_classes"])
    train_result = trainer.train(resume_from_checkpoint=resolve_resume(training_args))
    load_best_checkpoint(trainer)
    selection = {"selected_on": "validation", "metric_for_best_model": training_args.metric_for_best_model,
                 "best_metric": trainer.state.best_metric, "best_model_checkpoint": trainer.state.best_model_checkpoint}  # fmt: skip
    report = {**selection, "train_class_counts": sets["counts"]["train"], "class_counts": sets["counts"], "train_only_classes": sets["train_only_classes"],
              "init": model_args.init, "mode": model_args.mode, "train_fraction": data_args.train_fraction,
              "image_mean": sets["mean"], "image_std": sets["std"], "hardware": hardware_description()}  # fmt: skip
    test = evaluate_test(trainer, sets, data.class_names, data.multi_label, training_args.output_dir) if sets["test"] is not None else {}
    report = {**test, **report}
    metrics = {**train_result.metrics, **trainer.evaluate(metric_key_prefix="eval"), **selection, "hardware": report["hardware"]}
    metrics.update({f"test_{k}": v for k, v in test.items() if isinstance(v, (int, float))})
    if trainer.is_world_process_zero():
        save_outputs(trainer, sets, model_args.image_size, report, training_args.output_dir)
        trainer.save_metrics("all", metrics)
        write_run_info(training_args, str(data_args.data_dir), len(sets["train"]), {**metrics, "global_step": trainer.state.global_step})
        push_run(training_args, push)
    return metrics


if __name__ == "__main__":
    print(json.dumps(main(), indent=2, default=str))
