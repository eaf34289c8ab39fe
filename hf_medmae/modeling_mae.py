"""`MedMAEForPreTraining`: transformers' ViT-MAE with pluggable mask generators and any channel count.

The model reuses `ViTMAEForPreTraining` and steers it through its public `noise` argument: the mask
generator's codes become noise whose argsort keeps exactly the visible patches. The one change inside
is `MedMAEEmbeddings`, which projects only the visible patches (stock projects all, then drops most).
With `supervised_loss_weight > 0` (MSMAE) a linear `classifier` on the masked pass's CLS token adds a
cross-entropy term, so the CLS attention that the `attention` generator reads is shaped by the labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForPreTraining, ViTMAEForPreTraining
from transformers import initialization as init
from transformers.models.vit_mae.modeling_vit_mae import (
    ViTMAEDecoder,
    ViTMAEEmbeddings,
    ViTMAEForPreTrainingOutput,
    build_2d_sinusoidal_position_embedding,
)

from .attention_maps import align_to_views, bank_scores, last_block_cls_attention
from .configuration import MedMAEConfig, check_masking
from .errors import ConfigError, DataError
from .loading import CurrentKeyNamesMixin
from .masking import MASKED, VISIBLE, MaskGenerator, build_mask_generator, codes_to_noise
from .validation import check_pixels

logger = logging.getLogger(__name__)


class MedMAEEmbeddings(ViTMAEEmbeddings):
    """Stock MAE embeddings that project only the patches the encoder will see.

    Stock transformers runs the patch convolution over every patch and then drops the masked ones, so
    at mask ratio r it spends r of the projection (forward and weight gradient) on discarded tokens.
    Here the pixels are cut into patches first, stock's own `random_masking` picks the visible ones
    (same noise, same RNG draws), and the conv weight is applied to those alone as the linear map it is.
    Same parameters, same outputs up to float summation order.
    """

    def forward(
        self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None, interpolate_pos_encoding: bool = False
    ):
        if interpolate_pos_encoding or tuple(pixel_values.shape[2:]) != tuple(self.image_size):
            return super().forward(pixel_values, noise, interpolate_pos_encoding)
        batch, channels, height, width = pixel_values.shape
        p = self.patch_size
        patches = pixel_values.reshape(batch, channels, height // p, p, width // p, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, -1, channels * p * p)  # the conv's (C, p, p) order
        visible, mask, ids_restore = self.random_masking(patches, noise)
        ids_keep = torch.argsort(ids_restore, dim=1)[:, : visible.shape[1]]  # the inverse permutation's head
        position = self.position_embeddings[:, 1:].expand(batch, -1, -1)
        position = torch.gather(position, 1, ids_keep[..., None].expand(-1, -1, position.shape[-1]))
        projection = self.patch_embeddings.projection
        embeddings = nn.functional.linear(visible, projection.weight.flatten(1), projection.bias) + position
        cls_tokens = (self.cls_token + self.position_embeddings[:, :1]).expand(batch, -1, -1)
        return torch.cat((cls_tokens, embeddings), dim=1), mask, ids_restore


def sincos_position_embedding(grid_size: tuple[int, int], dim: int) -> torch.Tensor:
    """[1, 1 + gh*gw, dim] fixed 2D sin-cos position embeddings (CLS first, zeros), in ViT-MAE's layout.

    The half-swap reproduces the original MAE's [sin_w|cos_w|sin_h|cos_h] order that pretrained ViT-MAE
    weights use (as transformers' own `initialize_weights` does); any grid, square or not.
    """
    pos = build_2d_sinusoidal_position_embedding(
        height=grid_size[0], width=grid_size[1], embed_dim=dim, cls_token=True
    )
    half = pos.shape[-1] // 2
    return torch.cat([pos[..., half:], pos[..., :half]], dim=-1)[None]


def patch_moments(patches: torch.Tensor, eps: float = 1.0e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and standard deviation (unbiased variance + eps, as the MAE): [B, L, P] -> two [B, L, 1]."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + eps) ** 0.5


def mae_targets(patches: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """The MAE's target per patch, for 2D and 3D: the pixels, or with `norm_pix_loss` each patch normalised by its
    own mean and standard deviation. [B, L, P] -> [B, L, P].

    Example:
        >>> mae_targets(torch.tensor([[[1.0, 3.0]]]), norm_pix_loss=True).round(decimals=3)
        tensor([[[-0.7070,  0.7070]]])
    """
    if not norm_pix_loss:
        return patches
    mean, std = patch_moments(patches)
    return (patches - mean) / std


def targets_to_pixels(predictions: torch.Tensor, patches: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """The inverse of `mae_targets`: predictions [B, L, P] in pixel units, with the moments of `patches` (the same
    [B, L, P] patches the targets were made of)."""
    if not norm_pix_loss:
        return predictions
    mean, std = patch_moments(patches)
    return predictions * std + mean


def mae_loss(predictions: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The MAE's loss, for 2D and 3D: the per-patch mean squared error, averaged over the patches with weight 1.

    Args:
        predictions, targets: [B, L, P].
        weight: [B, L], 1 where a patch counts (the masked ones); None: every patch counts.

    Example:
        >>> mae_loss(torch.zeros(1, 2, 4), torch.ones(1, 2, 4), torch.tensor([[1.0, 0.0]]))
        tensor(1.)
    """
    per_patch = ((predictions - targets) ** 2).mean(dim=-1)  # [B, L]
    if weight is None:
        return per_patch.mean()
    return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)


@dataclass
class MedMAEForPreTrainingOutput(ViTMAEForPreTrainingOutput):
    r"""
    class_logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`, *optional*):
        The supervised head's logits on the masked pass's CLS token (only with `supervised_loss_weight > 0`).
    reconstruction_loss, supervised_loss (`torch.FloatTensor`, *optional*):
        The two terms of `loss = reconstruction_loss + supervised_loss_weight * supervised_loss`.
    """

    class_logits: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    supervised_loss: torch.FloatTensor | None = None


RECIPE_FIELDS = ("mask_ratio", "mask_generator", "mask_generator_kwargs", "throw_ratio", "norm_pix_loss")


class MaskingMixin:
    """The masking half of both MAEs (2D and 3D): the generator named in the config, and per-batch codes."""

    def build_masking(self, config) -> None:
        kwargs = dict(config.mask_generator_kwargs or {})
        if config.mask_generator == "attention":
            kwargs.setdefault("throw_ratio", config.throw_ratio)
        self.mask_generator: MaskGenerator = build_mask_generator(
            config.mask_generator, mask_ratio=config.mask_ratio, grid_size=config.grid_size, **kwargs
        )
        # Per-sample attention maps for the `attention` generator, filled by AttentionRefreshCallback.
        self.attention_bank: dict[int, torch.Tensor] = {}

    def set_masking(self, **fields) -> dict:
        """Give a loaded checkpoint this run's masking and loss settings (`RECIPE_FIELDS`), as transformers'
        `run_mae.py` does with `mask_ratio` and `norm_pix_loss`; returns {field: (checkpoint's, new)} for those
        that changed. They shape no weight, so continuing e.g. a plain MAE with MSMAE's masking is legitimate."""
        unknown = set(fields) - set(RECIPE_FIELDS)
        if unknown:
            raise ConfigError(
                f"{sorted(unknown)} are not masking settings.", f"set only {list(RECIPE_FIELDS)} this way."
            )
        changed = {
            k: (getattr(self.config, k, None), v) for k, v in fields.items() if getattr(self.config, k, None) != v
        }
        for key, (_, value) in changed.items():
            setattr(self.config, key, value)
        if changed:
            check_masking(self.config)
            self.build_masking(self.config)
        return changed

    def eval_generator(self, batch: int) -> torch.Generator | None:
        """Validation masks come from a generator seeded by the batch size, so eval losses are comparable."""
        return None if self.training else torch.Generator().manual_seed(1234 + int(batch))

    def check_codes(self, codes: torch.Tensor, batch: int) -> None:
        """Explicit codes must be [B, L] with the same number of visible and of masked patches in every row:
        the encoder and decoder gather them into [B, n, D] tensors, so unequal rows would mix images."""
        if tuple(codes.shape) != (batch, self.config.num_patches):
            raise DataError(
                f"mask_codes has shape {tuple(codes.shape)}; the model needs [{batch}, {self.config.num_patches}].",
                "give one code per patch of the patch grid ((D/t,) H/p, W/p), for every image.",
            )
        counts = torch.stack([(codes == VISIBLE).sum(1), (codes == MASKED).sum(1)])
        if bool((counts != counts[:, :1]).any()):
            raise DataError(
                "mask_codes rows have different numbers of visible or masked patches.",
                "give every image of a batch the same counts (as every mask generator does).",
            )

    def generate_codes(
        self,
        pixel_values: torch.Tensor,
        sample_ids: torch.Tensor | None = None,
        generator=None,
        view_ids: torch.Tensor | None = None,
    ):
        """Per-patch codes (0 visible, 1 masked, 2 thrown) for a batch. [B, C, (D,) H, W] -> [B, L].

        `view_ids` (2D): the `Augment.with_view` flips and turn of each training view; the banked maps are of the
        un-augmented images, so each is turned along with its view before it picks the patches."""
        scores = None
        if self.mask_generator.uses_scores:
            gen = self.mask_generator
            scores = bank_scores(self.attention_bank, sample_ids, gen.num_patches, pixel_values.device)
            if scores is not None and view_ids is not None:
                scores = align_to_views(scores, gen.grid_size, view_ids.to(scores.device))
        return self.mask_generator(
            pixel_values.shape[0],
            pixel_values=pixel_values if self.mask_generator.uses_pixels else None,
            scores=scores,
            generator=generator,
            device=pixel_values.device,
        )


class MedMAEForPreTraining(MaskingMixin, CurrentKeyNamesMixin, ViTMAEForPreTraining):
    r"""ViT masked autoencoder whose masking strategy is part of its config.

    Example:
        >>> import torch
        >>> from hf_medmae import MedMAEConfig, MedMAEForPreTraining
        >>> config = MedMAEConfig(num_channels=16, image_size=32, patch_size=4, hidden_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, decoder_hidden_size=32,
        ...     decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64,
        ...     mask_generator="grid", mask_ratio=0.5)
        >>> out = MedMAEForPreTraining(config)(torch.randn(2, 16, 32, 32))
        >>> out.logits.shape  # [batch, patches, patch_size**2 * channels]
        torch.Size([2, 64, 256])
    """

    config_class = MedMAEConfig
    config: MedMAEConfig
    # Both losses are per-batch means. With **kwargs in forward, a Trainer fed `labels` would otherwise pass
    # `num_items_in_batch` and scale the loss by the process count (as for MedClsForImageClassification).
    accepts_loss_kwargs = False

    def __init__(self, config: MedMAEConfig):
        super().__init__(config)
        # MSMAE's supervised head: linear, on the encoder's final-LayerNorm CLS token (None for a plain MAE,
        # whose weights and outputs stay exactly stock's).
        supervised = config.supervised_loss_weight > 0
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if supervised else None
        if supervised:
            self._init_weights(
                self.classifier
            )  # stock's Linear init; super().__init__'s post_init ran before the head existed
        # The encoder (a ViTMAEModel) ran its own stock init inside super().__init__, so `_init_weights`
        # below never reaches its embeddings: give them their sin-cos values here (loading overwrites them).
        embeddings = self.vit.embeddings
        init.copy_(
            embeddings.position_embeddings,
            sincos_position_embedding(config.grid_size, embeddings.position_embeddings.shape[-1]),
        )
        # Swap the forward only: the module keeps stock's parameters, names, initialisation and loading.
        self.vit.embeddings.__class__ = MedMAEEmbeddings
        self.build_masking(config)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Stock init, plus the MAE's fixed 2D sin-cos position embeddings, which transformers 5.x leaves at zero.

        In 5.23 stock `_init_weights` zeroes the decoder's `decoder_pos_embed`, and the encoder's sin-cos
        init returns early once the patch projection is initialised: a ViT-MAE built from a config has
        no position information at all and can only learn what does not depend on where a patch is
        (`tests/test_model.py` pins both the values and what they make learnable). `init.copy_` skips
        weights loaded from a checkpoint, so `from_pretrained` keeps what was saved.
        """
        super()._init_weights(module)
        if isinstance(module, ViTMAEEmbeddings):  # reached on re-initialisation (e.g. missing keys on load)
            init.copy_(
                module.position_embeddings,
                sincos_position_embedding(self.config.grid_size, module.position_embeddings.shape[-1]),
            )
        elif isinstance(module, ViTMAEDecoder):
            init.copy_(
                module.decoder_pos_embed,
                sincos_position_embedding(self.config.grid_size, module.decoder_pos_embed.shape[-1]),
            )
            init.normal_(module.mask_token, std=self.config.initializer_range)  # as the MAE paper (stock zeroes it)

    def _check_input(self, pixel_values: torch.Tensor) -> None:
        size, p = self.vit.embeddings.image_size, self.config.patch_size
        check_pixels(
            pixel_values,
            self.config.num_channels,
            "the model",
            size=size,
            channel_fix=f"set num_channels: {pixel_values.shape[1]} when pre-training from scratch, or convert "
            f"the images to {self.config.num_channels} channels for this checkpoint.",
            size_fix=f"set image_size: {pixel_values.shape[-2]} (a multiple of patch_size {p}), or crop/tile "
            "the images to the model's size.",
        )

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
        mask_codes: torch.Tensor | None = None,
        view_ids: torch.Tensor | None = None,
        return_loss: bool = True,
        **kwargs,
    ) -> ViTMAEForPreTrainingOutput:
        r"""
        Args:
            pixel_values: [B, C, H, W] normalised images.
            noise: [B, L] explicit noise (as in transformers); bypasses the mask generator.
            sample_ids: [B] dataset indices, used by the `attention` generator's per-sample maps.
            mask_codes: [B, L] explicit codes (0 visible, 1 masked, 2 thrown); bypasses the generator.
            view_ids: [B] flips and turn of each training view (`Augment.with_view`), to turn its attention map along.
            return_loss: always computed; declaring it tells `Trainer` this label-free model has an eval loss.
            labels (keyword): [B] class indices for the supervised head (`supervised_loss_weight > 0`), -100 for
                unlabeled images. Read from `**kwargs` on purpose: a `labels` parameter would make `Trainer` treat
                the MAE as a labelled model and drop the eval loss of every batch without labels. With `Trainer`,
                keep the column (`remove_unused_columns=False`, as for `sample_ids`).

        In `eval()` mode the masks come from a generator seeded by the batch, so validation loss is
        comparable across evaluations.
        """
        labels = kwargs.pop("labels", None)
        self._check_input(pixel_values)
        noise, codes = self._masking_noise(pixel_values, noise, sample_ids, mask_codes, view_ids)
        if self.classifier is None:
            if labels is not None:
                raise ConfigError(
                    "labels were given to an MAE without a supervised head (supervised_loss_weight is 0).",
                    "set supervised_loss_weight > 0 and num_labels in the config, or drop the labels.",
                )
            outputs = super().forward(pixel_values, noise=noise, **kwargs)
        else:  # stock's encoder -> decoder -> loss, keeping the encoder's output for the head
            encoded = self.vit(pixel_values, noise=noise, **kwargs)  # the masked pass: visible patches only
            logits = self.decoder(encoded.last_hidden_state, encoded.ids_restore).logits  # [B, L, p*p*C]
            outputs = MedMAEForPreTrainingOutput(
                loss=self.reconstruction_loss(pixel_values, logits, encoded.mask),
                logits=logits,
                mask=encoded.mask,
                ids_restore=encoded.ids_restore,
                hidden_states=encoded.hidden_states,
                attentions=encoded.attentions,
            )
        # Only a throw_ratio or explicit codes can throw patches: testing for them otherwise would make
        # every GPU step wait for the device (a host sync) for nothing.
        may_throw = self.config.throw_ratio > 0 or mask_codes is not None
        if codes is not None and may_throw and bool((codes > MASKED).any()):
            # Thrown patches were removed from the encoder too; only MASKED ones count in the loss.
            outputs.loss = self.reconstruction_loss(pixel_values, outputs.logits, (codes == MASKED).float())
        if self.classifier is not None:
            outputs.class_logits = self.classifier(encoded.last_hidden_state[:, 0])  # [B, K], the final-LayerNorm CLS
            outputs.reconstruction_loss = outputs.loss
            outputs.supervised_loss = self.supervised_loss(outputs.class_logits, labels)
            outputs.loss = outputs.loss + self.config.supervised_loss_weight * outputs.supervised_loss
        return outputs

    def _masking_noise(
        self, pixel_values, noise, sample_ids, mask_codes, view_ids=None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The `noise` transformers argsorts, and the generator's codes (None for stock uniform masking)."""
        if noise is not None:
            return noise, None
        generator = self.eval_generator(pixel_values.shape[0])
        if mask_codes is not None:
            self.check_codes(mask_codes, pixel_values.shape[0])
        if mask_codes is None and self.mask_generator.name == "random":
            # Uniform masking is what transformers already does with plain uniform noise: no codes and
            # no extra sort on top of stock's. In training, `noise=None` lets transformers draw it from
            # the global RNG that the Trainer seeds and restores (run_mae.py passes per-image noise).
            if generator is not None:
                noise = torch.rand(pixel_values.shape[0], self.mask_generator.num_patches, generator=generator)
                noise = noise.to(pixel_values.device)
            return noise, None
        codes = (
            mask_codes
            if mask_codes is not None
            else self.generate_codes(pixel_values, sample_ids, generator, view_ids)
        )
        return codes_to_noise(codes, generator), codes

    def supervised_loss(self, class_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Class-weighted cross-entropy over the labelled images of the batch; -100 (unlabeled) is left out.

        A batch without a labelled image gives 0 (not 0/0 = NaN) and keeps the head in the graph, so every
        process of a distributed run uses the same parameters. Labels are range-checked on the CPU only: on an
        accelerator the check would wait for the device every step (run_mae.py checks them when reading them).
        """
        if labels is None:
            return class_logits.sum() * 0.0
        if labels.dim() != 1 or labels.is_floating_point():
            raise DataError(
                f"labels of shape {tuple(labels.shape)} and dtype {labels.dtype} for the supervised head.",
                "pass [B] integer class indices, -100 for unlabeled images.",
            )
        labelled = labels != -100
        if labels.device.type == "cpu" and bool(((labels < 0) & labelled | (labels >= class_logits.shape[-1])).any()):
            bad = sorted(set(labels[labelled & ((labels < 0) | (labels >= class_logits.shape[-1]))].tolist()))
            raise DataError(
                f"labels {bad} are outside [0, {class_logits.shape[-1]}) and are not -100 (unlabeled).",
                "map the classes to 0..num_labels-1 and unlabeled images to -100.",
            )
        weights = torch.ones(class_logits.shape[-1], device=class_logits.device)
        if self.config.class_weights is not None:
            weights = torch.tensor(self.config.class_weights, dtype=torch.float32, device=class_logits.device)
        per_image = nn.functional.cross_entropy(
            class_logits.float(), labels.long(), weight=weights, ignore_index=-100, reduction="none"
        )  # [B]: w_y * CE, 0 where unlabeled
        counted = weights[labels.clamp_min(0)] * labelled  # [B]: w_y, 0 where unlabeled
        return per_image.sum() / counted.sum().clamp_min(1e-12)

    def targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the decoder predicts per patch: [B, C, H, W] -> [B, L, p*p*C] (`mae_targets`)."""
        return mae_targets(self.patchify(pixel_values), self.config.norm_pix_loss)

    def reconstruction_loss(
        self, pixel_values: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """`mae_loss` of `logits` [B, L, p*p*C] against the images' targets, over the patches with weight 1."""
        return mae_loss(logits, self.targets(pixel_values), weight)

    def reconstruct(self, pixel_values: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images with the predicted patches in masked places and the original visible patches pasted back.

        Undoes `norm_pix_loss` with each target patch's own mean and variance, as the MAE paper's figures do.
        """
        patches = self.patchify(pixel_values)
        pred = targets_to_pixels(logits, patches, self.config.norm_pix_loss)
        mixed = torch.where(mask[..., None].bool(), pred, patches)  # [B, L, p*p*C]
        return self.unpatchify(mixed, tuple(pixel_values.shape[2:]))

    @torch.no_grad()
    def cls_attention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLS-to-patch attention of the last encoder block on *all* patches (MSMAE). [B,C,H,W] -> [B, L].

        Computed from the public layer modules with sdpa-free arithmetic for the last block only, so
        it works with any attention implementation. Heads are min-max normalised, then averaged.
        """
        emb = self.vit.embeddings
        tokens = emb.patch_embeddings(pixel_values) + emb.position_embeddings[:, 1:]
        cls = (emb.cls_token + emb.position_embeddings[:, :1]).expand(tokens.shape[0], -1, -1)
        return last_block_cls_attention(self.vit.layers, torch.cat([cls, tokens], dim=1))  # from [B, 1+L, D]

    attention_map = cls_attention  # the name both MAEs share (the 3D one has no CLS token)


AutoConfig.register(MedMAEConfig.model_type, MedMAEConfig)
AutoModelForPreTraining.register(MedMAEConfig, MedMAEForPreTraining)


MASKING_DEFAULTS = dict(
    norm_pix_loss=True, mask_ratio=0.75, mask_generator="random", mask_generator_kwargs=None, throw_ratio=0.0
)


def fresh_masking(model_args) -> dict:
    """The masking fields of a new MAE: the arguments, with MASKING_DEFAULTS where unset."""
    return {
        k: MASKING_DEFAULTS[k] if getattr(model_args, k) is None else getattr(model_args, k) for k in RECIPE_FIELDS
    }


def apply_recipe(model, model_args) -> None:
    """A continued pre-training keeps the checkpoint's masking except where this run's arguments set it (logged)."""
    changed = model.set_masking(
        **{k: getattr(model_args, k) for k in RECIPE_FIELDS if getattr(model_args, k) is not None}
    )
    if changed:
        logger.warning(
            "continuing from %s with this run's %s (the checkpoint was pre-trained with %s)",
            model_args.model_name_or_path,
            {k: new for k, (_, new) in changed.items()},
            {k: old for k, (old, _) in changed.items()},
        )


__all__ = [
    "MASKING_DEFAULTS",
    "mae_loss",
    "mae_targets",
    "patch_moments",
    "targets_to_pixels",
    "apply_recipe",
    "fresh_masking",
    "MaskingMixin",
    "MedMAEForPreTraining",
    "MedMAEForPreTrainingOutput",
    "VISIBLE",
    "MASKED",
]
