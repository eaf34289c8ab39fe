"""Fine-tune (or linearly probe) an MAE encoder, or the same ViT from scratch, on labelled images
(`run_classification.py`, `medmae-classify`).

    medmae-classify --config configs/wbc_classification.yaml
    medmae-classify --config configs/wbc_classification.yaml --init scratch   # one flag apart

The checkpoint is selected on the validation split (`metric_for_best_model`, default macro_f1);
the test split is used once, at the end, for `test_metrics.json` and the plots.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy.special import expit, softmax
from sklearn.metrics import f1_score, precision_recall_fscore_support
from transformers import AutoModelForImageClassification, ViTConfig, ViTImageProcessorPil, ViTModel, set_seed

from ..arguments import MedTrainingArguments
from ..classification import MULTI, SINGLE, MedClsForImageClassification, class_weights, freeze
from ..cli import parse_config
from ..cnn import MedCNNForImageClassification, build_cnn
from ..data.classification import ClassificationDataset, LabelledImages, load_class_folders, load_csv_labels, read_all
from ..data.io import list_image_files, progress
from ..data.splits import class_counts, label_subset, stratified_split
from ..data.transforms import Augment, channel_stats, check_channels
from ..encoder import load_encoder
from ..errors import CheckpointError, ConfigError, DataError
from ..loading import load_checkpoint, resolve_checkpoint
from ..metrics import classification_metrics, compute_metrics_fn
from ..optim import default_layer_decay, param_groups_layer_decay
from ..training import AttentionRefreshCallback, check_writable, hardware_description
from ..validation import as_pair
from .run import Task, TaskSetup, console, encoder_normalisation

logger = logging.getLogger(__name__)

SELECTION_METRICS = (
    "loss",
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "weighted_f1",
    "macro_precision",
    "macro_recall",
    "roc_auc",
    "micro_f1",
    "subset_accuracy",
)


@dataclass
class DataArguments:
    data_dir: str | None = field(
        default=None,
        metadata={"help": "image folder: one sub-folder per class, or the images a labels_csv names (training)"},
    )
    labels_csv: str | None = field(
        default=None, metadata={"help": "CSV of id,label; without it data_dir has class sub-folders"}
    )
    id_column: str = field(default="filename", metadata={"help": "CSV column with the file name or id"})
    label_column: str = field(default="label", metadata={"help": "CSV column with the class (name or integer)"})
    label_columns: list[str] | None = field(
        default=None, metadata={"help": "multi-label: the 0/1 columns, one per label"}
    )
    filename_template: str | None = field(default=None, metadata={"help": "id -> file name, e.g. '{id:03d}.bmp'"})
    class_names: list[str] | None = field(
        default=None, metadata={"help": "class order; default: sorted labels / folder names"}
    )
    label_offset: int = field(default=0, metadata={"help": "subtracted from integer labels (1 for classes 1..K)"})
    label_map: dict | None = field(default=None, metadata={"help": "{raw CSV value: class name or integer}"})
    multi_label: bool = field(default=False, metadata={"help": "several 0/1 labels per image (sigmoid + BCE)"})
    validation_fraction: float = 0.15
    test_fraction: float = 0.2
    split_seed: int | None = field(
        default=None, metadata={"help": "seed of the split and label subset; default: seed"}
    )
    train_fraction: float = field(
        default=1.0, metadata={"help": "share of the TRAIN split's labels used (stratified, >= 1 per class)"}
    )
    strict_fraction: bool = field(
        default=False, metadata={"help": "error instead of keeping one example of a class the fraction empties"}
    )
    on_bad_file: Literal["error", "skip"] = field(default="error", metadata={"help": "error | skip"})
    crop_scale: list[float] = field(
        default_factory=lambda: [0.5, 1.0], metadata={"help": "random resized crop area range"}
    )
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    predict_data: list[str] | None = field(
        default=None,
        metadata={
            "help": "predict_only: image folders or files to classify; "
            "a folder of class sub-folders, or one with a predict_labels_csv, is also scored"
        },
    )
    predict_labels_csv: list[str] | None = field(
        default=None, metadata={"help": "predict_only: one labels CSV per predict_data folder (columns as labels_csv)"}
    )
    predict_pattern: str = field(
        default="*", metadata={"help": "predict_only: which files of a folder are images, e.g. *.bmp"}
    )
    renormalise: bool = field(
        default=False,
        metadata={
            "help": "predict_only: normalise each set with its own per-channel statistics "
            "(another scanner or stain) instead of the checkpoint's; recorded in the outputs"
        },
    )


@dataclass
class ModelArguments:
    predict_only: bool = field(
        default=False,
        metadata={"help": "no training: classify predict_data with the classifier in model_name_or_path"},
    )
    architecture: Literal["vit", "resnet10", "resnet18", "resnet34", "resnet50", "densenet121"] = field(
        default="vit",
        metadata={
            "help": "vit (the MAE encoder, or the same ViT from scratch) | a MONAI CNN baseline trained from scratch "
            "(init and model_name_or_path are then unused)"
        },
    )
    init: Literal["mae", "scratch"] = field(
        default="mae",
        metadata={"help": "mae (encoder weights of the checkpoint) | scratch (same architecture, random)"},
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "MAE/ViT checkpoint dir or Hub id"})
    image_size: int = 64
    patch_size: int | None = field(
        default=None, metadata={"help": "scratch without checkpoint (default 8); else must match the checkpoint"}
    )
    hidden_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    intermediate_size: int = 768
    pooling: Literal["mean", "cls"] = field(default="mean", metadata={"help": "mean | cls"})
    mode: str = field(
        default="full",
        metadata={
            "help": "full | linear_probe | last_k:<k> | frozen_features (scikit-learn on the "
            "frozen encoder's mean-pooled features; no Trainer)"
        },
    )
    frozen_classifier: Literal["logistic", "knn"] = field(
        default="logistic", metadata={"help": "mode frozen_features: logistic regression or k-NN"}
    )
    frozen_blocks: int = field(
        default=1, metadata={"help": "mode frozen_features: concatenate the mean-pooled tokens of the last k blocks"}
    )
    layer_decay: float | None = field(
        default=None,
        metadata={
            "help": "encoder lr factor per block (MAE fine-tuning); default 0.75 for init mae, 1.0 for scratch, whose every "
            "layer learns from nothing (measured on WBC: 0.75 from scratch cost accuracy)"
        },
    )
    drop_path_rate: float = 0.1
    head_dropout: float = 0.0
    label_smoothing: float = 0.0
    class_weighting: Literal["none", "balanced"] = field(
        default="none", metadata={"help": "none | balanced (inverse class frequency in the training subset)"}
    )
    throw_ratio: float = field(
        default=0.0,
        metadata={
            "help": "ViT only (MSMAE): drop this share of each training image's least attended patch tokens before the encoder "
            "blocks (random before the first attention refresh); evaluation uses all tokens. Turns the random resized "
            "crop off (flips and rotations stay): the maps must line up with the training views"
        },
    )
    attention_refresh_epochs: float = field(
        default=5.0, metadata={"help": "throw_ratio > 0: epochs between refreshes of the attention maps"}
    )


def load_data(args: DataArguments) -> LabelledImages:
    """The labelled images of either layout."""
    if args.data_dir is None:
        raise ConfigError(
            "data_dir is not set, so there are no images to train on.",
            "set data_dir (a folder of class sub-folders, or the images labels_csv names), or use --predict_only.",
        )
    if args.labels_csv is None:
        if args.multi_label:
            raise DataError(
                "multi-label config with single-label data: class sub-folders give one label per image.",
                "give a labels_csv with one 0/1 column per label, or set multi_label: false.",
            )
        return load_class_folders(args.data_dir, args.class_names, args.on_bad_file)
    return load_csv_labels(
        args.data_dir,
        args.labels_csv,
        args.id_column,
        args.label_columns or [args.label_column],
        args.filename_template,
        args.class_names,
        args.label_offset,
        args.label_map,
        args.multi_label,
        args.on_bad_file,
    )


def build_encoder(args: ModelArguments, channels: int) -> ViTModel:
    """The encoder: the checkpoint's weights (mae), or its architecture randomly initialised (scratch)."""
    if args.model_name_or_path is None:
        if args.init == "mae":
            raise ConfigError(
                "init: mae needs model_name_or_path.",
                "point model_name_or_path at an MAE checkpoint, or use init: scratch.",
            )
        config = ViTConfig(
            image_size=args.image_size,
            patch_size=args.patch_size or 8,
            num_channels=channels,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_hidden_layers,
            num_attention_heads=args.num_attention_heads,
            intermediate_size=args.intermediate_size,
        )
        return ViTModel(config, add_pooling_layer=False)
    encoder = load_encoder(args.model_name_or_path, image_size=args.image_size)
    found = encoder.config
    if args.patch_size is not None and args.patch_size != found.patch_size:
        raise CheckpointError(
            f"the checkpoint has patch size {found.patch_size}, the config asks for {args.patch_size}.",
            f"set patch_size: {found.patch_size} (or remove it), or use a checkpoint pre-trained with patch {args.patch_size}.",
        )
    if found.num_channels != channels:
        raise DataError(
            f"the checkpoint expects {found.num_channels}-channel images, the data has {channels} channels.",
            f"use images with {found.num_channels} channels, or pre-train an MAE on {channels}-channel images.",
        )
    if args.init == "scratch":  # same architecture, fresh weights: the comparison is one flag apart
        encoder = ViTModel(encoder.config, add_pooling_layer=False)
        encoder.image_mean = encoder.image_std = None
    return encoder


def present_class_scores(probs: np.ndarray, labels: np.ndarray) -> dict:
    """Macro precision/recall/F1 over the classes present in `labels` (train-only classes left out of the mean)."""
    present = np.unique(labels)
    p, r, f, _ = precision_recall_fscore_support(
        labels, probs.argmax(1), labels=present, average="macro", zero_division=0
    )
    return {"macro_precision_present": float(p), "macro_recall_present": float(r), "macro_f1_present": float(f)}


def prepare(model_args: ModelArguments, data_args: DataArguments, args: MedTrainingArguments):
    """Data, encoder, split indices {"train" (the label subset), "val", "test"}, train-only classes, and (mean, std)."""
    seed = args.seed if data_args.split_seed is None else data_args.split_seed
    data = load_data(data_args)
    channels = check_channels(data.images, data_args.data_dir)
    encoder = build_encoder(model_args, channels) if model_args.architecture == "vit" else None
    split = stratified_split(
        data.labels, data.class_names, data_args.validation_fraction, data_args.test_fraction, seed
    )
    subset = split.train[
        label_subset(
            data.labels[split.train], data.class_names, data_args.train_fraction, seed, data_args.strict_fraction
        )
    ]
    if len(split.val) == 0:
        raise DataError(
            "the validation split is empty, so no checkpoint can be selected.",
            "set validation_fraction > 0 (e.g. 0.15).",
        )
    mean, std = encoder_normalisation(
        encoder, model_args.init if encoder is not None else "scratch", [data.images[i] for i in split.train]
    )
    parts = {"train": subset, "val": split.val, "test": split.test}
    logger.info(
        "per-class counts %s; train-only classes %s",
        {name: class_counts(data.labels[idx], data.class_names) for name, idx in parts.items()},
        split.train_only_classes,
    )
    return data, encoder, parts, split.train_only_classes, mean, std


@torch.no_grad()
def pooled_features(
    encoder: ViTModel, dataset: ClassificationDataset, batch_size: int = 64, blocks: int = 1
) -> np.ndarray:
    """[N, blocks x D] mean-pooled patch tokens of the frozen encoder's last `blocks` blocks, each through its final
    LayerNorm (an MAE never trains its CLS token; blocks=1 is `last_hidden_state`)."""
    if not 1 <= blocks <= encoder.config.num_hidden_layers:
        raise ConfigError(
            f"frozen_blocks={blocks} but the encoder has {encoder.config.num_hidden_layers} blocks.",
            f"use 1..{encoder.config.num_hidden_layers}.",
        )
    encoder.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    out = []
    for batch in progress(loader, desc="features", unit="batch"):
        hidden = encoder(batch["pixel_values"], output_hidden_states=True).hidden_states[-blocks:]
        out.append(torch.cat([encoder.layernorm(h)[:, 1:].mean(1) for h in hidden], dim=-1).double().numpy())
    return np.concatenate(out)


def frozen_features(model_args: ModelArguments, data_args: DataArguments, args: MedTrainingArguments) -> dict:
    """`mode: frozen_features`: the encoder's features, extracted once, and scikit-learn on top, chosen on validation.

    Logistic regression (standardised features, strength C picked from a small grid on validation macro-F1)
    or k-nearest neighbours (cosine, k picked alike). Seconds, not minutes: the low-label protocol of
    the self-supervised literature. Same split, metrics, plots and files as fine-tuning.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if model_args.architecture != "vit":
        raise ConfigError(
            f"mode: frozen_features evaluates a pre-trained ViT encoder; architecture {model_args.architecture} is a CNN "
            "baseline trained from scratch.",
            "use mode: full with a CNN, or architecture: vit for frozen features.",
        )
    if model_args.throw_ratio > 0:
        raise ConfigError(
            "throw_ratio drops tokens while fine-tuning; mode: frozen_features does not fine-tune the encoder.",
            "set throw_ratio: 0, or use mode: full / linear_probe.",
        )
    data, encoder, parts, train_only, mean, std = prepare(model_args, data_args, args)
    if data.multi_label:
        raise ConfigError(
            "mode: frozen_features is for single-label data.", "use mode: full or linear_probe with multi_label."
        )
    feats = {
        name: pooled_features(
            encoder,
            ClassificationDataset([data.images[i] for i in idx], data.labels[idx], mean, std, model_args.image_size),
            args.per_device_eval_batch_size,
            model_args.frozen_blocks,
        )
        for name, idx in parts.items()
        if len(idx)
    }
    labels = {name: data.labels[idx] for name, idx in parts.items()}
    k_max = max(1, min(15, len(labels["train"])))
    grid = (
        [
            (
                f"C={c}",
                make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=3000)),
            )
            for c in (0.01, 0.1, 1.0)
        ]
        if model_args.frozen_classifier == "logistic"
        else [
            (f"k={k}", KNeighborsClassifier(n_neighbors=k, metric="cosine", weights="distance"))
            for k in sorted({1, 5, k_max})
            if k <= k_max
        ]
    )
    names = data.class_names

    def proba(clf, x):  # [N, K] over all classes, also those absent from the training subset
        out = np.zeros((len(x), len(names)))
        out[:, clf.classes_] = clf.predict_proba(x)
        return out

    chosen = max(
        grid,
        key=lambda g: f1_score(
            labels["val"],
            proba(g[1].fit(feats["train"], labels["train"]), feats["val"]).argmax(1),
            average="macro",
            zero_division=0,
        ),
    )
    clf = chosen[1].fit(feats["train"], labels["train"])
    test = score(proba(clf, feats["test"]), labels["test"], names, False, args.output_dir) if "test" in feats else {}
    report = {
        **test,
        "mode": "frozen_features",
        "classifier": f"{model_args.frozen_classifier} ({chosen[0]}, chosen on validation)",
        "frozen_blocks": model_args.frozen_blocks,
        "init": model_args.init,
        "train_fraction": data_args.train_fraction,
        "train_only_classes": train_only,
        "class_counts": {n: class_counts(labels[n], names) for n in labels},
        "image_mean": mean,
        "image_std": std,
        "hardware": hardware_description(),
    }
    Path(args.output_dir, "test_metrics.json").write_text(json.dumps(report, indent=2, default=str))
    Path(args.output_dir, "splits.json").write_text(
        json.dumps({name: [data.files[i] for i in idx] for name, idx in parts.items()}, indent=1)
    )
    metrics = {f"test_{k}": v for k, v in test.items() if isinstance(v, (int, float))}
    metrics.update(mode="frozen_features", classifier=report["classifier"], num_train_images=len(labels["train"]))
    Path(args.output_dir, "all_results.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


class Classify(Task):
    arguments = (ModelArguments, DataArguments, MedTrainingArguments)

    def predict(self, model_args: ModelArguments, data_args: DataArguments, args: MedTrainingArguments) -> dict:
        return predict_only(model_args, data_args, args.output_dir, args.per_device_eval_batch_size)

    def main(self, argv: list[str] | None = None) -> dict:
        model_args, data_args, args = parse_config(self.arguments, argv)
        if model_args.mode != "frozen_features" or model_args.predict_only:
            return super().main(argv)
        self.output_dir = args.output_dir
        logging.basicConfig(level=logging.INFO)
        check_writable(args.output_dir)
        set_seed(args.seed)
        return frozen_features(model_args, data_args, args)

    def setup(self, model_args: ModelArguments, data_args: DataArguments, args: MedTrainingArguments) -> TaskSetup:
        if model_args.architecture != "vit":
            if model_args.mode != "full":
                raise ConfigError(
                    f"mode: {model_args.mode} freezes parts of a pre-trained ViT; the {model_args.architecture} baseline "
                    "trains from random weights.",
                    "use mode: full with a CNN (or architecture: vit).",
                )
            if model_args.init == "mae" or model_args.model_name_or_path:
                logger.warning(
                    "architecture %s trains from random weights: init and model_name_or_path are not used",
                    model_args.architecture,
                )
        if model_args.throw_ratio > 0 and model_args.architecture != "vit":
            raise ConfigError(
                f"throw_ratio={model_args.throw_ratio} drops ViT patch tokens; the {model_args.architecture} baseline has none.",
                "set throw_ratio: 0 with a CNN, or architecture: vit.",
            )
        data, encoder, parts, train_only, mean, std = prepare(model_args, data_args, args)
        dropping = model_args.throw_ratio > 0
        # The maps that choose the dropped tokens are computed once per refresh on the un-augmented images (a map
        # per augmented batch would cost an extra all-token forward pass every step, more than dropping saves:
        # benchmarks/token_dropping.py). A training view must therefore keep every patch where the map has it:
        # the random resized crop (which resamples patches) is off; flips and 90-degree rotations permute whole
        # patches, and the model moves each map along with its view (`view_ids`).
        augment = Augment(
            model_args.image_size,
            tuple(data_args.crop_scale),
            hflip=data_args.hflip,
            vflip=data_args.vflip,
            rot90=data_args.rot90,
            crop=not dropping,
        )
        if dropping:
            logger.info(
                "throw_ratio %.2f: training drops the least attended patch tokens, so the random resized crop is off "
                "(crop_scale is not used); flips and rotations stay",
                model_args.throw_ratio,
            )
        sets = {
            name: ClassificationDataset(
                [data.images[i] for i in idx],
                data.labels[idx],
                mean,
                std,
                model_args.image_size,
                augment if name == "train" else None,
                with_ids=dropping and name == "train",
            )
            for name, idx in parts.items()
            if len(idx)
        }
        callbacks = []
        if dropping:  # the un-augmented training images, which the bank's maps are keyed by
            plain = ClassificationDataset(
                [data.images[i] for i in parts["train"]],
                data.labels[parts["train"]],
                mean,
                std,
                model_args.image_size,
                with_ids=True,
            )
            callbacks.append(
                AttentionRefreshCallback(
                    plain, every_epochs=model_args.attention_refresh_epochs, batch_size=args.per_device_eval_batch_size
                )
            )
        subset = parts["train"]
        weights = class_weights(data.labels[subset], len(data.class_names), model_args.class_weighting)
        args.remove_unused_columns = False
        if encoder is None:  # a CNN baseline: the Trainer's own AdamW (no weight decay on biases and norms)
            model = build_cnn(
                model_args.architecture,
                data.images[0].shape[0],
                len(data.class_names),
                model_args.image_size,
                id2label=dict(enumerate(data.class_names)),
                label_smoothing=model_args.label_smoothing,
                class_weights=weights,
                problem_type=MULTI if data.multi_label else SINGLE,
            )
            optimizer = {}
        else:
            model = self.build_model(encoder, data, model_args, weights, mean, std)
            groups = param_groups_layer_decay(
                model,
                args.learning_rate,
                args.weight_decay,
                default_layer_decay(model_args.layer_decay, model_args.init),
            )
            optimizer = {"optimizer_cls_and_kwargs": (torch.optim.AdamW, {"params": groups, "betas": (0.9, 0.999)})}
        processor = ViTImageProcessorPil(
            do_resize=True,
            size={"height": model_args.image_size, "width": model_args.image_size},
            do_rescale=False,
            image_mean=mean,
            image_std=std,
        )
        counts = {name: class_counts(data.labels[idx], data.class_names) for name, idx in parts.items()}
        trainer_kwargs = dict(compute_metrics=compute_metrics_fn(data.class_names, data.multi_label), **optimizer)
        state = dict(
            data=data,
            test=sets.get("test"),
            counts=counts,
            train_only=train_only,
            mean=mean,
            std=std,
            files={name: [data.files[i] for i in idx] for name, idx in parts.items()},
        )
        return TaskSetup(
            model,
            sets["train"],
            sets["val"],
            processor,
            str(data_args.data_dir),
            callbacks=callbacks,
            trainer_kwargs=trainer_kwargs,
            select_on="macro_f1",
            selection_metrics=SELECTION_METRICS,
            state=state,
        )

    def summary(self, metrics: dict, output_dir: str) -> str:
        if "sets" in metrics:  # predict_only
            return "\n".join(
                f"{row['set']}: {row['images']} images -> {output_dir}/{row['set']}/predictions.csv"
                + (f", accuracy {row['accuracy']:.3f}, macro-F1 {row['macro_f1']:.3f}" if "accuracy" in row else "")
                for row in metrics["sets"]
            )
        chosen = (
            metrics.get("classifier") or f"checkpoint selected on validation {metrics.get('metric_for_best_model')}"
        )
        lines = (
            [
                f"test accuracy {metrics['test_accuracy']:.3f}, macro-F1 over the classes present "
                f"{metrics.get('test_macro_f1_present', metrics.get('test_macro_f1', float('nan'))):.3f} ({chosen})"
            ]
            if "test_accuracy" in metrics
            else []
        )
        if metrics.get("mode") == "frozen_features":  # scikit-learn's model is not saved: refit it in seconds
            return "\n".join(
                [
                    *lines,
                    f"outputs in {output_dir}: test_metrics.json, all_results.json, confusion_matrix.png, "
                    "confidence.png, reliability.png",
                ]
            )
        lines += [
            f"outputs in {output_dir}: the classifier, test_metrics.json, confusion_matrix.png, confidence.png, reliability.png",
            f"next: classify new images with  python run_classification.py --predict_only --model_name_or_path {output_dir} "
            "--predict_data FOLDER  (add --predict_labels_csv to score them)",
        ]
        return "\n".join(lines)

    @staticmethod
    def build_model(
        encoder: ViTModel, data: LabelledImages, args: ModelArguments, weights, mean, std
    ) -> MedClsForImageClassification:
        encoder.config.image_mean, encoder.config.image_std = mean, std  # travel in the classifier's config
        drop_path = (
            0.0 if args.mode == "linear_probe" else args.drop_path_rate
        )  # a frozen encoder gets no stochastic depth
        model = MedClsForImageClassification.from_encoder(
            encoder,
            len(data.class_names),
            id2label=dict(enumerate(data.class_names)),
            pooling=args.pooling,
            drop_path_rate=drop_path,
            head_dropout=args.head_dropout,
            label_smoothing=args.label_smoothing,
            class_weights=weights,
            problem_type=MULTI if data.multi_label else SINGLE,
            throw_ratio=args.throw_ratio,
            attention_refresh_epochs=args.attention_refresh_epochs,
        )
        trainable = freeze(model, args.mode)
        logger.info(
            "init %s, mode %s: %d trainable parameters of %d", args.init, args.mode, trainable, model.num_parameters()
        )
        return model

    def report(
        self, trainer, setup: TaskSetup, model_args: ModelArguments, data_args: DataArguments, is_main: bool
    ) -> dict:
        args, state, data = trainer.args, setup.state, setup.state["data"]
        selection = {
            "selected_on": "validation" if args.eval_strategy != "no" else "last",
            "metric_for_best_model": args.metric_for_best_model,
            "best_metric": trainer.state.best_metric,
            "best_model_checkpoint": trainer.state.best_model_checkpoint,
        }
        test = (
            evaluate_test(trainer, state["test"], data.class_names, data.multi_label, args.output_dir, is_main)
            if state["test"] is not None
            else {}
        )
        report = {
            **test,
            **selection,
            "train_class_counts": state["counts"]["train"],
            "class_counts": state["counts"],
            "train_only_classes": state["train_only"],
            "architecture": model_args.architecture,
            "init": model_args.init if model_args.architecture == "vit" else "scratch",
            "mode": model_args.mode,
            "layer_decay": default_layer_decay(model_args.layer_decay, model_args.init)
            if model_args.architecture == "vit"
            else None,
            "train_fraction": data_args.train_fraction,
            "image_mean": state["mean"],
            "image_std": state["std"],
        }
        metrics = {**trainer.evaluate(metric_key_prefix="eval"), **selection}
        metrics.update({f"test_{k}": v for k, v in test.items() if isinstance(v, (int, float))})
        trainer.save_model()  # the selected (best-on-validation) model, as safetensors, with its processor
        if is_main:
            Path(args.output_dir, "splits.json").write_text(json.dumps(state["files"], indent=1))
            Path(args.output_dir, "test_metrics.json").write_text(
                json.dumps({**report, "hardware": hardware_description()}, indent=2, default=str)
            )
        return metrics


def evaluate_test(
    trainer, test_set, class_names: list[str], multi_label: bool, output_dir: str, is_main: bool = True
) -> dict:
    """Metrics of the selected model on the test split, plus the three plots (single-label)."""
    logits = trainer.predict(test_set).predictions
    logits = (logits[0] if isinstance(logits, tuple) else logits).astype(np.float64)
    probs = expit(logits) if multi_label else softmax(logits, axis=-1)  # [N, K]
    return score(probs, test_set.labels.numpy(), class_names, multi_label, output_dir if is_main else None)


def score(
    probs: np.ndarray, labels: np.ndarray, class_names: list[str], multi_label: bool, output_dir: str | None
) -> dict:
    """`classification_metrics` plus, for single-label data, what was predicted per class and the three plots.

    `predicted_counts` next to `true_counts` makes a collapse onto one class obvious at a glance.
    """
    from ..plots import plot_confidence, plot_confusion_matrix, plot_reliability

    metrics = classification_metrics(probs, labels, class_names, multi_label)
    if multi_label:
        return metrics
    metrics.update(present_class_scores(probs, labels))
    metrics["true_counts"] = class_counts(labels, class_names)
    metrics["predicted_counts"] = class_counts(probs.argmax(1), class_names)
    if output_dir is None:
        return metrics
    plot_confusion_matrix(np.asarray(metrics["confusion_matrix"]), class_names, f"{output_dir}/confusion_matrix.png")
    if 0 < int((probs.argmax(1) == labels).sum()) < len(labels):
        plot_confidence(probs, labels, class_names, f"{output_dir}/confidence.png")
    else:  # hf_medmae.plots.plot_confidence cannot draw an empty correct (or wrong) group
        logger.warning(
            "confidence.png not drawn: every test prediction is %s", "right" if metrics["accuracy"] == 1 else "wrong"
        )
    plot_reliability(probs, labels, f"{output_dir}/reliability.png")
    return metrics


def load_classifier(name_or_path: str) -> tuple[MedClsForImageClassification | MedCNNForImageClassification, dict]:
    """A classifier saved by this task (ViT or CNN, local or Hub), strictly loaded, and its preprocessor settings."""
    model = load_checkpoint(
        AutoModelForImageClassification,
        name_or_path,
        model_types=("medmae_classifier", "medmae_cnn"),
        what="an hf_medmae classifier",
    )
    folder = resolve_checkpoint(name_or_path)
    processor = (
        json.loads((folder / "preprocessor_config.json").read_text())
        if (folder / "preprocessor_config.json").is_file()
        else {}
    )
    if processor.get("image_mean") is None:
        raise CheckpointError(
            f"{name_or_path} has no preprocessor_config.json with image_mean/image_std.",
            "point at the output_dir of run_classification.py, which saves the normalisation beside the weights.",
        )
    return model.eval(), processor


def read_prediction_set(
    source: str, labels_csv: str | None, data_args: DataArguments, class_names: list[str]
) -> LabelledImages:
    """Images to classify: a CSV-labelled folder, a folder of class sub-folders (labelled), or plain images (labels -1)."""
    path = Path(source)
    if labels_csv:
        return load_csv_labels(
            path,
            labels_csv,
            data_args.id_column,
            data_args.label_columns or [data_args.label_column],
            data_args.filename_template,
            class_names,
            data_args.label_offset,
            data_args.label_map,
            data_args.multi_label,
            data_args.on_bad_file,
        )
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        return load_class_folders(path, class_names, data_args.on_bad_file)
    files = [path] if path.is_file() else list_image_files(path, pattern=data_args.predict_pattern)
    if not files:
        raise DataError(
            f"no images found in {source} (pattern {data_args.predict_pattern!r}).",
            "point predict_data at an image folder or file.",
        )
    images, kept = read_all(files, data_args.on_bad_file)
    return LabelledImages(images, np.full(len(kept), -1), class_names, [files[i].name for i in kept])


@torch.no_grad()
def predict_probs(
    model: MedClsForImageClassification, dataset: ClassificationDataset, batch_size: int = 64
) -> np.ndarray:
    """[N, K] class probabilities (softmax, or sigmoid for multi-label) of every image of `dataset`."""
    multi = model.config.problem_type == MULTI
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
    out = []
    for batch in progress(loader, desc="classifying", unit="batch"):
        logits = model(batch["pixel_values"].to(model.device)).logits.double()
        out.append((logits.sigmoid() if multi else logits.softmax(-1)).cpu().numpy())
    return np.concatenate(out)


def predict_only(model_args: ModelArguments, data_args: DataArguments, output_dir: str, batch_size: int = 64) -> dict:
    """Classify each `predict_data` set with a trained classifier: `<set>/predictions.csv`, and for labelled sets
    `<set>/test_metrics.json` with the training run's plots; one row per set in `external_metrics.csv`."""
    if not data_args.predict_data or not model_args.model_name_or_path:
        raise ConfigError(
            "predict_only needs predict_data and a model_name_or_path written by run_classification.py.",
            "pass --model_name_or_path OUTPUT_DIR_OF_A_RUN --predict_data FOLDER [FOLDER ...].",
        )
    csvs = data_args.predict_labels_csv or [None] * len(data_args.predict_data)
    if len(csvs) != len(data_args.predict_data):
        raise ConfigError(
            f"{len(csvs)} predict_labels_csv for {len(data_args.predict_data)} predict_data sets.",
            "give one labels CSV per set, in the same order.",
        )
    model, processor = load_classifier(model_args.model_name_or_path)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    inputs = (
        getattr(model.config, "vit_config", None) or model.config.to_dict()
    )  # ViT: its encoder's config; CNN: its own
    size = processor.get("size", {}).get("height") or as_pair(inputs["image_size"])[0]
    channels, rows = inputs["num_channels"], []
    for source, labels_csv in zip(data_args.predict_data, csvs):
        data = read_prediction_set(source, labels_csv, data_args, names)
        found = check_channels(data.images, source)
        if found != channels:
            raise DataError(
                f"{source} has {found}-channel images but the classifier expects {channels}.",
                f"convert the images to {channels} channels, as the training images were.",
            )
        mean, std = (
            channel_stats(data.images) if data_args.renormalise else (processor["image_mean"], processor["image_std"])
        )
        probs = predict_probs(
            model, ClassificationDataset(data.images, np.zeros(len(data.images)), mean, std, size), batch_size
        )
        name = Path(source).stem or "predict"
        target = Path(output_dir, name)
        target.mkdir(parents=True, exist_ok=True)
        with (target / "predictions.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "predicted", *[f"p_{n}" for n in names]])
            for file, p in zip(data.files, probs):
                writer.writerow(
                    [
                        file,
                        ", ".join(n for n, q in zip(names, p) if q >= 0.5)
                        if data.multi_label
                        else names[int(p.argmax())],
                        *[f"{q:.6f}" for q in p],
                    ]
                )
        row = {
            "set": name,
            "images": len(data.files),
            "normalisation": "target set" if data_args.renormalise else "checkpoint",
        }
        if labels_csv or (data.labels.ndim == 1 and (data.labels >= 0).all()) or data.multi_label:
            metrics = score(probs, data.labels, names, data.multi_label, str(target))
            info = {
                "data": source,
                "model": model_args.model_name_or_path,
                "image_mean": list(mean),
                "image_std": list(std),
                **row,
            }
            (target / "test_metrics.json").write_text(json.dumps({**metrics, **info}, indent=2, default=str))
            row.update(
                {
                    k: metrics[k]
                    for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")
                    if isinstance(metrics.get(k), (int, float))
                }
            )
            row["predicted_counts"] = json.dumps(metrics.get("predicted_counts"))
        rows.append(row)
        logger.info("%s: %d images -> %s", name, len(data.files), target)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with Path(output_dir, "external_metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return {"sets": rows}


TASK = Classify()
main = TASK.main


def cli() -> None:
    """Console entry point `medmae-classify` (and `python run_*.py`): metrics as JSON, or the problem and its fix."""
    console(TASK)


__all__ = [
    "Classify",
    "DataArguments",
    "ModelArguments",
    "build_encoder",
    "cli",
    "evaluate_test",
    "load_classifier",
    "load_data",
    "main",
    "predict_only",
    "predict_probs",
    "score",
]
