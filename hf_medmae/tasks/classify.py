"""Fine-tune (or linearly probe) an MAE encoder, or the same ViT from scratch, on labelled images
(`run_classification.py`, `medmae-classify`).

    medmae-classify --config configs/wbc_classification.yaml
    medmae-classify --config configs/wbc_classification.yaml --init scratch   # one flag apart

The checkpoint is selected on the validation split (`metric_for_best_model`, default macro_f1);
the test split is used once, at the end, for `test_metrics.json` and the plots. The modes of the shared
run sequence (`tasks/run.py`): train (fine-tuning), probe (`mode: frozen_features`, `evaluation/probe.py`)
and predict (`--predict_only`, `inference/classification.py`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import ViTImageProcessorPil, ViTModel

from ..arguments import MedTrainingArguments
from ..classification import MULTI, SINGLE, MedClsForImageClassification, class_weights, freeze
from ..cnn import build_cnn
from ..data.classification import ClassificationDataset, LabelledImages, load_labelled, split_labelled
from ..data.splits import class_counts
from ..data.stain import stain_reference_of
from ..data.transforms import Augment, Photometric, PhotometricArguments, check_channels
from ..encoder import build_encoder, encoder_normalisation
from ..errors import ConfigError
from ..evaluation.classification import evaluate_test, score
from ..evaluation.probe import fit_probe, pooled_features, set_linear_head
from ..inference.classification import classify_sets
from ..metrics import EVAL_METRICS, compute_metrics_fn
from ..optim import default_layer_decay, layer_decay_adamw
from ..training import AttentionRefreshCallback, hardware_description
from .run import Task, TaskSetup, console

logger = logging.getLogger(__name__)

# every reported metric but calibration error, which says how honest the confidence is, not how good the model
SELECTION_METRICS = ("loss", *dict.fromkeys(m for keys in EVAL_METRICS.values() for m in keys if m != "ece"))


@dataclass
class DataArguments(PhotometricArguments):
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
        default=None, metadata={"help": "seed of the split (the label subset follows seed); default: seed"}
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
    stain_normalisation: Literal["none", "reinhard"] = field(
        default="none",
        metadata={
            "help": "predict_only, RGB: map each image's colours onto the training images' (Reinhard, CIELAB "
            "statistics saved with the classifier) before classifying; recorded in the outputs"
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
            "help": "full | linear_probe | last_k:<k> | frozen_features (scikit-learn on the frozen encoder's "
            "mean-pooled features, no Trainer; a logistic regression is saved as the classifier's linear head)"
        },
    )
    frozen_classifier: Literal["logistic", "knn"] = field(
        default="logistic",
        metadata={"help": "mode frozen_features: logistic regression (saved as a classifier) or k-NN (scores only)"},
    )
    frozen_blocks: int = field(
        default=1, metadata={"help": "mode frozen_features: concatenate the mean-pooled tokens of the last k blocks"}
    )
    layer_decay: float | None = field(
        default=None,
        metadata={
            "help": "encoder lr factor per block (MAE fine-tuning); default 0.75 for init mae, 1.0 for scratch, "
            "whose every layer learns from nothing (measured on WBC: 0.75 from scratch cost accuracy)"
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
            "help": "ViT only (MSMAE): drop this share of each training image's least attended patch tokens before "
            "the encoder blocks (random before the first attention refresh); evaluation uses all tokens. Turns the "
            "random resized crop off (flips and rotations stay): the maps must line up with the training views"
        },
    )
    attention_refresh_epochs: float = field(
        default=5.0, metadata={"help": "throw_ratio > 0: epochs between refreshes of the attention maps"}
    )


@dataclass
class ClassifyState:
    """What `Classify.report` and `Classify.probe` need again from the setup.

    Args:
        data: the labelled images (class names, whether multi-label).
        counts: images per class in each split ("train", "val", "test").
        train_only: the classes only the training split has.
        mean: the per-channel normalisation mean the model was given.
        std: the per-channel normalisation standard deviation.
        files: the files of each split, for `splits.json`.
        test: the test set (None without a test split).
        sets: every split as a dataset (mode probe: the features are extracted from each).
    """

    data: LabelledImages
    counts: dict[str, dict[str, int]]
    train_only: list[str]
    mean: list[float]
    std: list[float]
    files: dict[str, list[str]]
    test: ClassificationDataset | None = None
    sets: dict[str, ClassificationDataset] = field(default_factory=dict)


class Classify(Task):
    arguments = (ModelArguments, DataArguments, MedTrainingArguments)

    def predict(self, model_args: ModelArguments, data_args: DataArguments, args: MedTrainingArguments) -> dict:
        return classify_sets(
            model_args.model_name_or_path,
            data_args.predict_data,
            data_args.predict_labels_csv,
            data_args,
            args.output_dir,
            data_args.predict_pattern,
            data_args.renormalise,
            args.per_device_eval_batch_size,
            data_args.stain_normalisation,
        )

    def setup(
        self, model_args: ModelArguments, data_args: DataArguments, args: MedTrainingArguments
    ) -> TaskSetup[ClassifyState]:
        self.check(model_args)
        data = load_labelled(data_args)
        if model_args.mode == "frozen_features" and data.multi_label:
            raise ConfigError(
                "mode: frozen_features is for single-label data.", "use mode: full or linear_probe with multi_label."
            )
        channels = check_channels(data.images, data_args.data_dir)
        encoder = None
        if model_args.architecture == "vit":
            encoder = build_encoder(
                model_args.model_name_or_path,
                model_args.init,
                channels,
                model_args.image_size,
                model_args.patch_size,
                hidden_size=model_args.hidden_size,
                num_hidden_layers=model_args.num_hidden_layers,
                num_attention_heads=model_args.num_attention_heads,
                intermediate_size=model_args.intermediate_size,
            )
        parts, train_only = split_labelled(
            data,
            data_args.validation_fraction,
            data_args.test_fraction,
            data_args.train_fraction,
            args.seed,
            data_args.strict_fraction,
            data_args.split_seed,
        )
        mean, std = encoder_normalisation(
            encoder, model_args.init if encoder is not None else "scratch", [data.images[i] for i in parts["train"]]
        )
        processor = ViTImageProcessorPil(
            do_resize=True,
            size={"height": model_args.image_size, "width": model_args.image_size},
            do_rescale=False,
            image_mean=mean,
            image_std=std,
            # the training images' colours, for `stain_normalisation: reinhard` when the classifier meets another site
            stain_reference=stain_reference_of([data.images[i] for i in parts["train"]], args.seed),
        )
        state = ClassifyState(
            data=data,
            counts={name: class_counts(data.labels[idx], data.class_names) for name, idx in parts.items()},
            train_only=train_only,
            mean=mean,
            std=std,
            files={name: [data.files[i] for i in idx] for name, idx in parts.items()},
        )
        if model_args.mode == "frozen_features":
            sets = {
                name: ClassificationDataset(
                    [data.images[i] for i in idx], data.labels[idx], mean, std, model_args.image_size
                )
                for name, idx in parts.items()
                if len(idx)
            }
            model = self.build_model(encoder, data, model_args, None, mean, std)
            state.sets, state.test = sets, sets.get("test")
            return TaskSetup(
                model, sets["train"], sets["val"], processor, str(data_args.data_dir), extras=state, mode="probe"
            )
        return self.train_setup(model_args, data_args, args, processor, state, parts, encoder)

    def train_setup(
        self,
        model_args: ModelArguments,
        data_args: DataArguments,
        args: MedTrainingArguments,
        processor: ViTImageProcessorPil,
        state: ClassifyState,
        parts: dict,
        encoder: ViTModel | None,
    ) -> TaskSetup[ClassifyState]:
        """Mode train: the augmented training set, the model (ViT or CNN), its optimiser and validation metrics."""
        data, mean, std = state.data, state.mean, state.std
        dropping = model_args.throw_ratio > 0
        # The maps that choose the dropped tokens are computed once per refresh on the un-augmented images (a map
        # per augmented batch would cost an extra all-token forward pass every step, more than dropping saves).
        # A training view must therefore keep every patch where the map has it: the random resized crop (which
        # resamples patches) is off; flips and 90-degree rotations permute whole patches, and the model moves
        # each map along with its view (`view_ids`).
        augment = Augment(
            model_args.image_size,
            tuple(data_args.crop_scale),
            hflip=data_args.hflip,
            vflip=data_args.vflip,
            rot90=data_args.rot90,
            crop=not dropping,
            photometric=Photometric.from_args(data_args, data.images[0].shape[0]),
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
        weights = class_weights(data.labels[parts["train"]], len(data.class_names), model_args.class_weighting)
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
            layer_decay = default_layer_decay(model_args.layer_decay, model_args.init)
            optimizer = {"optimizer_cls_and_kwargs": layer_decay_adamw(model, args, layer_decay)}
        trainer_kwargs = dict(compute_metrics=compute_metrics_fn(data.class_names, data.multi_label), **optimizer)
        state.test = sets.get("test")
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
            keep_columns=True,  # every column the datasets give reaches the model (sample ids when dropping tokens)
            extras=state,
        )

    @staticmethod
    def check(model_args: ModelArguments) -> None:
        """The combinations of architecture, mode and throw_ratio that cannot run, named with their fix."""
        if model_args.architecture != "vit":
            if model_args.mode == "frozen_features":
                raise ConfigError(
                    "mode: frozen_features evaluates a pre-trained ViT encoder; architecture "
                    f"{model_args.architecture} is a CNN baseline trained from scratch.",
                    "use mode: full with a CNN, or architecture: vit for frozen features.",
                )
            if model_args.mode != "full":
                raise ConfigError(
                    f"mode: {model_args.mode} freezes parts of a pre-trained ViT; the {model_args.architecture} "
                    "baseline trains from random weights.",
                    "use mode: full with a CNN (or architecture: vit).",
                )
            if model_args.init == "mae" or model_args.model_name_or_path:
                logger.warning(
                    "architecture %s trains from random weights: init and model_name_or_path are not used",
                    model_args.architecture,
                )
            if model_args.throw_ratio > 0:
                raise ConfigError(
                    f"throw_ratio={model_args.throw_ratio} drops ViT patch tokens; the {model_args.architecture} "
                    "baseline has none.",
                    "set throw_ratio: 0 with a CNN, or architecture: vit.",
                )
        if model_args.mode == "frozen_features" and model_args.throw_ratio > 0:
            raise ConfigError(
                "throw_ratio drops tokens while fine-tuning; mode: frozen_features does not fine-tune the encoder.",
                "set throw_ratio: 0, or use mode: full / linear_probe.",
            )

    def weights_from(self, model_args) -> str | None:
        vit_from_mae = model_args.architecture == "vit" and model_args.init == "mae"
        return model_args.model_name_or_path if vit_from_mae else None

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
        if metrics.get("mode") == "frozen_features" and not metrics.get("saved_classifier"):
            return "\n".join(
                [
                    *lines,
                    f"outputs in {output_dir}: test_metrics.json, all_results.json, confusion_matrix.png, "
                    "confidence.png, reliability.png (k-NN is not a linear head: no classifier saved)",
                ]
            )
        lines += [
            f"outputs in {output_dir}: the classifier, test_metrics.json, confusion_matrix.png, confidence.png, "
            "reliability.png",
            f"next: classify new images with  python run_classification.py --predict_only --model_name_or_path "
            f"{output_dir} --predict_data FOLDER  (add --predict_labels_csv to score them)",
        ]
        return "\n".join(lines)

    @staticmethod
    def build_model(
        encoder: ViTModel, data: LabelledImages, args: ModelArguments, weights, mean, std
    ) -> MedClsForImageClassification:
        encoder.config.image_mean, encoder.config.image_std = mean, std  # travel in the classifier's config
        frozen = args.mode in ("linear_probe", "frozen_features")  # a frozen encoder gets no stochastic depth
        probing = args.mode == "frozen_features"  # the probe's features, under the head it fits
        model = MedClsForImageClassification.from_encoder(
            encoder,
            len(data.class_names),
            id2label=dict(enumerate(data.class_names)),
            pooling="features" if probing else args.pooling,
            feature_blocks=args.frozen_blocks if probing else 1,
            drop_path_rate=0.0 if frozen else args.drop_path_rate,
            head_dropout=args.head_dropout,
            label_smoothing=args.label_smoothing,
            class_weights=weights,
            problem_type=MULTI if data.multi_label else SINGLE,
            throw_ratio=args.throw_ratio,
            attention_refresh_epochs=args.attention_refresh_epochs,
        )
        trainable = freeze(model, "linear_probe" if probing else args.mode)
        logger.info(
            "init %s, mode %s: %d trainable parameters of %d", args.init, args.mode, trainable, model.num_parameters()
        )
        return model

    def probe(
        self,
        setup: TaskSetup[ClassifyState],
        model_args: ModelArguments,
        data_args: DataArguments,
        args: MedTrainingArguments,
        is_main: bool,
    ) -> dict:
        """`mode: frozen_features`: the frozen encoder's features, extracted once, and scikit-learn on top, chosen
        on validation (`evaluation.probe`); a logistic regression becomes the saved classifier's linear head."""
        state = setup.extras
        sets, names = state.sets, state.data.class_names
        feats = {
            name: pooled_features(setup.model.vit, dataset, args.per_device_eval_batch_size, model_args.frozen_blocks)
            for name, dataset in sets.items()
        }
        labels = {name: dataset.labels.numpy() for name, dataset in sets.items()}
        probe = fit_probe(feats, labels, len(names), model_args.frozen_classifier)
        output = args.output_dir if is_main else None
        test = score(probe.proba(feats["test"]), labels["test"], names, False, output) if "test" in feats else {}
        saved = model_args.frozen_classifier == "logistic"
        if saved:
            set_linear_head(setup.model, probe)
        else:
            logger.warning("frozen_classifier knn is not a linear head: the run saves its metrics but no classifier")
        report = {
            **test,
            "mode": "frozen_features",
            "classifier": f"{model_args.frozen_classifier} ({probe.choice}, chosen on validation)",
            "frozen_blocks": model_args.frozen_blocks,
            "init": model_args.init,
            "train_fraction": data_args.train_fraction,
            "train_only_classes": state.train_only,
            "class_counts": state.counts,
            "image_mean": state.mean,
            "image_std": state.std,
        }
        if is_main:
            if saved:
                setup.model.save_pretrained(args.output_dir)
                setup.processor.save_pretrained(args.output_dir)
            Path(args.output_dir, "splits.json").write_text(json.dumps(state.files, indent=1))
            Path(args.output_dir, "test_metrics.json").write_text(
                json.dumps({**report, "hardware": hardware_description()}, indent=2, default=str)
            )
        metrics = {f"test_{k}": v for k, v in test.items() if isinstance(v, (int, float))}
        metrics.update(
            mode="frozen_features",
            classifier=report["classifier"],
            num_train_images=len(labels["train"]),
            saved_classifier=saved,
        )
        return metrics

    def report(
        self,
        trainer,
        setup: TaskSetup[ClassifyState],
        model_args: ModelArguments,
        data_args: DataArguments,
        is_main: bool,
    ) -> dict:
        args, state, data = trainer.args, setup.extras, setup.extras.data
        selection = {
            "selected_on": "validation" if args.eval_strategy != "no" else "last",
            "metric_for_best_model": args.metric_for_best_model,
            "best_metric": trainer.state.best_metric,
            "best_model_checkpoint": trainer.state.best_model_checkpoint,
        }
        output = args.output_dir if is_main else None
        test = (
            evaluate_test(trainer, state.test, data.class_names, data.multi_label, output)
            if state.test is not None
            else {}
        )
        report = {
            **test,
            **selection,
            "train_class_counts": state.counts["train"],
            "class_counts": state.counts,
            "train_only_classes": state.train_only,
            "architecture": model_args.architecture,
            "init": model_args.init if model_args.architecture == "vit" else "scratch",
            "mode": model_args.mode,
            "layer_decay": default_layer_decay(model_args.layer_decay, model_args.init)
            if model_args.architecture == "vit"
            else None,
            "train_fraction": data_args.train_fraction,
            "image_mean": state.mean,
            "image_std": state.std,
        }
        metrics = {**trainer.evaluate(metric_key_prefix="eval"), **selection}
        metrics.update({f"test_{k}": v for k, v in test.items() if isinstance(v, (int, float))})
        trainer.save_model()  # the selected (best-on-validation) model, as safetensors, with its processor
        if is_main:
            Path(args.output_dir, "splits.json").write_text(json.dumps(state.files, indent=1))
            Path(args.output_dir, "test_metrics.json").write_text(
                json.dumps({**report, "hardware": hardware_description()}, indent=2, default=str)
            )
        return metrics


TASK = Classify()
main = TASK.main


def cli() -> None:
    """Console entry point `medmae-classify` (and `python run_*.py`): metrics as JSON, or the problem and its fix."""
    console(TASK)


__all__ = ["Classify", "ClassifyState", "DataArguments", "ModelArguments", "cli", "main"]
