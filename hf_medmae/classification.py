"""Image classifier on an MAE encoder: `MedClsConfig` + `MedClsForImageClassification`, and `freeze` modes.

The encoder is a plain `transformers.ViTModel` under the attribute `vit` (so its weights are
saved as `vit.*`, which `load_encoder` reads back); on top sit mean pooling over patch tokens with
a LayerNorm (`fc_norm`, as in MAE fine-tuning) or the CLS token, dropout and a linear head.
With `throw_ratio > 0` (MSMAE) training drops the least attended patch tokens before the blocks.
"""

from __future__ import annotations

import numpy as np
import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    PreTrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput

from .attention_maps import TokenDropper, align_to_views, bank_scores, kept_patches, last_block_cls_attention
from .encoder import mae_encoder_state_dict, vit_config_dict, vit_config_from
from .errors import ConfigError, DataError
from .loading import CurrentKeyNamesMixin
from .optim import add_drop_path
from .validation import as_pair, check_pixels

SINGLE, MULTI = "single_label_classification", "multi_label_classification"


def check_head_fields(config: PreTrainedConfig, rates: tuple[str, ...]) -> None:
    """The checks every classifier config shares: problem type, rates in [0, 1), one positive weight per class."""
    if config.problem_type not in (SINGLE, MULTI):
        raise ConfigError(
            f"problem_type={config.problem_type!r} is not supported by the hf_medmae classifiers.",
            f"use {SINGLE!r} or {MULTI!r}.",
        )
    for name in rates:
        value, top = getattr(config, name), 1.0 if name == "drop_path_rate" else 0.999
        if not 0.0 <= value <= top:
            raise ConfigError(f"{name}={value} is outside [0, 1).", f"use e.g. 0.1 for {name}.")
    weights = config.class_weights
    if weights is not None and (len(weights) != config.num_labels or min(weights) <= 0):
        raise ConfigError(
            f"class_weights has {len(weights)} entries but there are {config.num_labels} labels "
            "(all weights must be > 0).",
            "give one positive weight per label (e.g. inverse class frequency), or leave class_weights unset.",
        )


class ClassificationLossMixin:
    """Cross-entropy (label smoothing, class weights) or BCE-with-logits, with label checks, for every classifier."""

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (label smoothing, class weights) or BCE-with-logits, after checking the labels."""
        weights = None
        if self.config.class_weights is not None:
            weights = torch.tensor(self.config.class_weights, dtype=logits.dtype, device=logits.device)
        if self.config.problem_type == MULTI:
            self._check_multi_labels(labels, logits.shape)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
            return (loss * weights).mean() if weights is not None else loss.mean()
        self._check_single_labels(labels, logits.shape)
        return nn.functional.cross_entropy(
            logits, labels.long(), weight=weights, label_smoothing=self.config.label_smoothing
        )

    def _check_single_labels(self, labels: torch.Tensor, shape: torch.Size) -> None:
        if labels.dim() != 1 or labels.is_floating_point():
            raise DataError(
                f"single-label config given labels of shape {tuple(labels.shape)} and dtype {labels.dtype} "
                "(multi-label data?).",
                f"pass [N] integer class indices, or set problem_type: {MULTI} for [N, K] 0/1 labels.",
            )
        bad = labels[(labels < 0) | (labels >= shape[-1])]
        if bad.numel():
            raise DataError(
                f"labels {sorted(set(bad.tolist()))} are outside [0, {shape[-1]}) for num_labels={shape[-1]}.",
                "map the classes to 0..num_labels-1 (e.g. CSV classes 1-5 -> 0-4) or raise num_labels.",
            )

    def _check_multi_labels(self, labels: torch.Tensor, shape: torch.Size) -> None:
        if labels.dim() == 1:
            raise DataError(
                "multi-label config with single-label data: labels are 1-D class indices "
                f"(shape {tuple(labels.shape)}).",
                f"set problem_type: {SINGLE}, or provide [N, {shape[-1]}] 0/1 labels.",
            )
        if tuple(labels.shape) != tuple(shape):
            raise DataError(
                f"multi-label targets have shape {tuple(labels.shape)} but the logits are {tuple(shape)}.",
                f"give one 0/1 column per label: [N, {shape[-1]}].",
            )
        if bool(((labels < 0) | (labels > 1)).any()):
            raise DataError("multi-label targets must lie in [0, 1].", "use 0/1 (or soft) targets per label.")


@strict
class MedClsConfig(PreTrainedConfig):
    r"""Configuration of [`MedClsForImageClassification`].

    Args:
        vit_config (`dict`, *optional*):
            The encoder's `ViTConfig` fields (see `hf_medmae.encoder.vit_config_dict`); ViT-B/16
            defaults when omitted.
        pooling (`str`, defaults to `"mean"`):
            `"mean"` over patch tokens followed by `fc_norm` (MAE fine-tuning), `"cls"`, or `"features"`: the
            frozen-feature probe's features (`block_features`, no `fc_norm`), under the head it fitted.
        feature_blocks (`int`, defaults to 1):
            `pooling="features"`: how many last blocks' mean patch tokens are concatenated.
        drop_path_rate (`float`, defaults to 0.1):
            Stochastic depth of the last block (linear from 0 over depth), training only.
        head_dropout (`float`, defaults to 0.0): Dropout before the linear head.
        label_smoothing (`float`, defaults to 0.0): Cross-entropy label smoothing (single-label).
        class_weights (`list[float]`, *optional*): Per-class loss weights (one per label).
        problem_type (`str`, defaults to `"single_label_classification"`):
            Or `"multi_label_classification"` (sigmoid + BCE on [N, K] 0/1 labels).
        throw_ratio (`float`, defaults to 0.0):
            MSMAE's attention-driven token dropping: in `train()` mode the `round(throw_ratio * L)` least
            attended of the L patch tokens of each image are dropped after the embeddings (CLS and the rest
            keep their position embeddings), so every block runs on fewer tokens; `eval()` uses all of them.
            "Attended" is the image's map in `attention_bank` (last-block CLS attention, refreshed every
            `attention_refresh_epochs` by `training.AttentionRefreshCallback`); before the first refresh the
            dropped tokens are drawn uniformly at random (MSMAE's warm-up). The maps are of un-augmented
            images, so a training view must leave patches where they are: run_classification.py turns the
            random resized crop off when throw_ratio > 0 (and logs it) and keeps flips and 90-degree
            rotations, whose exact patch permutation the model applies to the map (`view_ids`).
        attention_refresh_epochs (`float`, defaults to 5.0):
            Epochs between two refreshes of the attention maps (used when throw_ratio > 0).

    Example:
        >>> config = MedClsConfig(vit_config={"hidden_size": 32, "num_attention_heads": 2}, num_labels=5)
        >>> config.num_labels, config.problem_type
        (5, 'single_label_classification')
    """

    model_type = "medmae_classifier"

    vit_config: dict | None = None
    pooling: str = "mean"
    feature_blocks: int = 1
    drop_path_rate: float = 0.1
    head_dropout: float = 0.0
    label_smoothing: float = 0.0
    class_weights: list[float] | None = None
    throw_ratio: float = 0.0
    attention_refresh_epochs: float = 5.0

    def __post_init__(self, **kwargs):
        if self.vit_config is None:
            self.vit_config = vit_config_dict(ViTConfig())
        super().__post_init__(**kwargs)
        if self.problem_type is None:
            self.problem_type = SINGLE
        self.check()

    def check(self) -> None:
        """Raise ConfigError naming the fix (run at construction, so also on from_pretrained)."""
        if self.pooling not in ("mean", "cls", "features"):
            raise ConfigError(
                f"pooling={self.pooling!r} is unknown.", "use 'mean' (MAE fine-tuning), 'cls' or 'features'."
            )
        check_head_fields(self, ("drop_path_rate", "head_dropout", "label_smoothing"))
        try:
            vit = ViTConfig(**self.vit_config)
        except Exception as err:
            raise ConfigError(
                f"vit_config is not a valid ViTConfig: {err}", "build it with vit_config_dict(encoder.config)."
            ) from err
        (h, w), (ph, pw) = as_pair(vit.image_size), as_pair(vit.patch_size)
        if h % ph or w % pw or vit.hidden_size % vit.num_attention_heads:
            raise ConfigError(
                f"vit_config: image_size {h}x{w} / patch_size {ph}x{pw} / hidden_size {vit.hidden_size} / "
                f"{vit.num_attention_heads} heads do not divide.",
                "image_size must be a multiple of patch_size and hidden_size of num_attention_heads.",
            )
        if not 1 <= self.feature_blocks <= vit.num_hidden_layers:
            raise ConfigError(
                f"frozen_blocks={self.feature_blocks} but the encoder has {vit.num_hidden_layers} blocks.",
                f"use 1..{vit.num_hidden_layers}.",
            )
        num_patches = (h // ph) * (w // pw)
        if not 0.0 <= self.throw_ratio < 1.0 or round(self.throw_ratio * num_patches) >= num_patches:
            raise ConfigError(
                f"throw_ratio={self.throw_ratio} must lie in [0, 1) and keep at least one of the "
                f"{num_patches} patches.",
                "use e.g. 0.3 (MSMAE), or 0 to train on every token.",
            )
        if self.attention_refresh_epochs <= 0:
            raise ConfigError(
                f"attention_refresh_epochs={self.attention_refresh_epochs} must be > 0.",
                "use e.g. 5 (epochs between two refreshes of the attention maps).",
            )


class MedClsForImageClassification(ClassificationLossMixin, CurrentKeyNamesMixin, PreTrainedModel):
    r"""ViT encoder + (mean | CLS) pooling + linear head, with stochastic depth and MAE head init.

    Example:
        >>> from hf_medmae.encoder import load_encoder  # doctest: +SKIP
        >>> model = MedClsForImageClassification.from_encoder(load_encoder("runs/mae"), num_labels=4)
        >>> model(torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 3])).loss
    """

    config_class = MedClsConfig
    config: MedClsConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTEmbeddings", "ViTLayer"]
    _supports_sdpa = True
    # The loss is a per-batch mean. With **kwargs in forward, Trainer would otherwise assume the model
    # divides by a global `num_items_in_batch` and multiply the loss by the process count (2x loss and
    # gradients with 2 processes).
    accepts_loss_kwargs = False

    def __init__(self, config: MedClsConfig):
        super().__init__(config)
        vit_config = ViTConfig(**config.vit_config)
        self.vit = ViTModel(vit_config, add_pooling_layer=False)
        hidden = vit_config.hidden_size
        # MAE's global pool normalises the mean token; CLS output is already normalised by vit.layernorm.
        mean_pool = config.pooling == "mean"
        self.fc_norm = nn.LayerNorm(hidden, eps=vit_config.layer_norm_eps) if mean_pool else nn.Identity()
        self.head_drop = nn.Dropout(config.head_dropout)
        features = hidden * (config.feature_blocks if config.pooling == "features" else 1)
        self.head = nn.Linear(features, config.num_labels)
        self._drop_path_handles = add_drop_path(self.vit, config.drop_path_rate) if config.drop_path_rate else []
        # MSMAE token dropping: per-sample maps (AttentionRefreshCallback fills them) and the hook that applies it.
        self.attention_bank: dict[int, torch.Tensor] = {}
        self.token_dropper = TokenDropper()
        if config.throw_ratio > 0:
            self.vit.embeddings.register_forward_hook(self.token_dropper)
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self.head:  # MAE fine-tuning: tiny head so the first steps do not wreck the encoder
            init.trunc_normal_(module.weight, std=2e-5)
            init.zeros_(module.bias)

    @classmethod
    def from_encoder(
        cls, vit: nn.Module, num_labels: int, id2label: dict | None = None, **cfg
    ) -> MedClsForImageClassification:
        """A classifier whose encoder is a copy of `vit` (a ViTModel, or any model with `.vit`).

        Args:
            vit: The encoder, e.g. from `load_encoder`. Its `image_mean` / `image_std` travel in the config.
            num_labels: Number of classes.
            id2label: Optional {index: name}; label2id is derived from it.
            **cfg: Other `MedClsConfig` fields (pooling, drop_path_rate, problem_type, ...).

        Example:
            >>> model = MedClsForImageClassification.from_encoder(encoder, 5, pooling="cls")  # doctest: +SKIP
        """
        encoder = vit.vit if hasattr(vit, "vit") else vit
        vit_config = vit_config_from(encoder.config)
        if id2label is not None:
            id2label = {int(k): str(v) for k, v in id2label.items()}
            cfg.setdefault("label2id", {v: k for k, v in id2label.items()})
            cfg["id2label"] = id2label
        else:
            cfg["num_labels"] = num_labels
        if id2label is not None and len(id2label) != num_labels:
            raise ConfigError(
                f"id2label has {len(id2label)} names but num_labels={num_labels}.", "give one name per class."
            )
        model = cls(MedClsConfig(vit_config=vit_config_dict(vit_config), **cfg))
        model.vit.load_state_dict(mae_encoder_state_dict(encoder), strict=True)
        return model

    def _check_pixels(self, pixel_values: torch.Tensor, interpolate: bool) -> None:
        vit = self.vit.config
        eh, ew = as_pair(vit.image_size)
        check_pixels(
            pixel_values,
            vit.num_channels,
            "the checkpoint's encoder",
            size=None if interpolate else (eh, ew),
            channel_fix=f"convert the images to {vit.num_channels} channels (the channels the encoder was "
            f"pre-trained on), or pre-train an encoder with num_channels={pixel_values.shape[1]}.",
            size_fix=f"resize/crop the images to {eh}x{ew}, or load the encoder with load_encoder(..., "
            f"image_size={pixel_values.shape[-2]}) to interpolate its position embeddings.",
        )

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
        view_ids: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values: [B, C, H, W] normalised images.
            labels: [B] class indices (single-label) or [B, K] 0/1 targets (multi-label).
            sample_ids: [B] dataset indices: which `attention_bank` maps token dropping reads (training only).
            view_ids: [B] `Augment.with_view` codes of the training views, to move each map along (training only).
            interpolate_pos_encoding: Let the encoder run on other image sizes (bicubic position embeddings).
        """
        self._check_pixels(pixel_values, bool(interpolate_pos_encoding))
        dropping = self.training and self.config.throw_ratio > 0
        if dropping:  # the encoder's blocks see CLS + the kept patches (TokenDropper on the embeddings' output)
            self.token_dropper.keep[pixel_values.device] = self.kept_patches(pixel_values, sample_ids, view_ids)
        try:
            if self.config.pooling == "features":  # the probe's features read the blocks' outputs
                kwargs["output_hidden_states"] = True
            outputs = self.vit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        finally:
            self.token_dropper.keep.pop(pixel_values.device, None)
        tokens = outputs.last_hidden_state  # [B, 1 + L (- thrown in training), D]
        if self.config.pooling == "features":
            pooled = block_features(self.vit, outputs.hidden_states, self.config.feature_blocks)
        elif self.config.pooling == "mean":
            pooled = self.fc_norm(tokens[:, 1:].mean(dim=1))
        else:
            pooled = tokens[:, 0]
        logits = self.head(self.head_drop(pooled))  # [B, K]
        loss = self.classification_loss(logits, labels) if labels is not None else None
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def kept_patches(
        self, pixel_values: torch.Tensor, sample_ids: torch.Tensor | None = None, view_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch indices kept in training, [B, L - round(throw_ratio * L)]: all but the least attended ones
        by the banked maps (moved along each view), or a uniformly random choice while a map is missing."""
        p = as_pair(self.vit.config.patch_size)
        grid = (pixel_values.shape[-2] // p[0], pixel_values.shape[-1] // p[1])
        num_patches = grid[0] * grid[1]
        scores = bank_scores(self.attention_bank, sample_ids, num_patches, pixel_values.device)
        if scores is not None and view_ids is not None:
            scores = align_to_views(scores, grid, view_ids)
        return kept_patches(
            scores,
            round(self.config.throw_ratio * num_patches),
            pixel_values.shape[0],
            num_patches,
            pixel_values.device,
        )

    @torch.no_grad()
    def attention_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Last-block CLS attention on all patches, heads min-max normalised and averaged (MSMAE). [B,C,H,W] -> [B, L].

        Runs in eval mode (no drop path, no dropout, no token dropping) whatever the model's mode, and with
        plain arithmetic for the last block, so it is the same under every attention implementation.
        """
        was_training = self.training
        self.eval()
        try:
            dtype = self.vit.embeddings.patch_embeddings.projection.weight.dtype
            return last_block_cls_attention(self.vit.layers, self.vit.embeddings(pixel_values.to(dtype)))
        finally:
            self.train(was_training)


def block_features(vit: ViTModel, hidden_states: tuple[torch.Tensor, ...] | None, blocks: int = 1) -> torch.Tensor:
    """[B, blocks x D] mean patch tokens of the encoder's last `blocks` blocks, each through its final LayerNorm
    (the frozen-feature probe's features; an MAE never trains its CLS token).

    Args:
        vit: The encoder whose `layernorm` normalises each block's tokens.
        hidden_states: The encoder's `hidden_states` (embeddings, then one per block).
        blocks: How many last blocks, the last one concatenated last.
    """
    return torch.cat([vit.layernorm(h)[:, 1:].mean(1) for h in hidden_states[-blocks:]], dim=-1)


def freeze(model: nn.Module, mode: str) -> int:
    """Choose what trains: "full", "linear_probe" (head only) or "last_k:<k>" (last k blocks + final norm + head).

    Everything outside `model.vit` (fc_norm, head, a segmenter's decoder) always trains.

    Args:
        model: A model with a `.vit` ViTModel (classifier or segmenter).
        mode: "full" | "linear_probe" | "last_k:<k>" with 0 <= k <= num_hidden_layers.

    Returns:
        The number of trainable parameters (elements).

    Example:
        >>> freeze(model, "last_k:2")  # doctest: +SKIP
    """
    vit: ViTModel = model.vit
    num_layers = len(vit.layers)
    if mode == "full":
        trainable_blocks, norm = num_layers, True
    elif mode == "linear_probe":
        trainable_blocks, norm = 0, False
    elif mode.startswith("last_k:") and mode[7:].isdigit() and int(mode[7:]) <= num_layers:
        trainable_blocks, norm = int(mode[7:]), True
    else:
        raise ConfigError(
            f"freeze mode {mode!r} is unknown.",
            f"use 'full', 'linear_probe' or 'last_k:<k>' with k in 0..{num_layers}.",
        )
    model.requires_grad_(True)
    vit.requires_grad_(False)
    for layer in vit.layers[num_layers - trainable_blocks :]:
        layer.requires_grad_(True)
    vit.layernorm.requires_grad_(norm)
    vit.embeddings.requires_grad_(mode == "full")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


AutoConfig.register(MedClsConfig.model_type, MedClsConfig)
AutoModelForImageClassification.register(MedClsConfig, MedClsForImageClassification)


def class_weights(labels: np.ndarray, num_labels: int, how: str) -> list[float] | None:
    """'balanced': n / (classes present x count), 1.0 for classes absent from training; 'none': None."""
    if how == "none":
        return None
    if labels.ndim == 2:
        raise ConfigError(
            "class_weighting: balanced is for single-label data.", "use class_weighting: none with multi_label."
        )
    counts = np.bincount(labels, minlength=num_labels)
    present = counts > 0
    weights = np.ones(num_labels)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.tolist()


__all__ = [
    "class_weights",
    "ClassificationLossMixin",
    "block_features",
    "MedClsConfig",
    "MedClsForImageClassification",
    "check_head_fields",
    "freeze",
]
