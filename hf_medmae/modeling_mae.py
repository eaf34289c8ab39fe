"""`MedMAEForPreTraining`: transformers' ViT-MAE with pluggable mask generators and any channel count.

The model reuses `ViTMAEForPreTraining` and steers it through its public `noise` argument: the mask
generator's codes become noise whose argsort keeps exactly the visible patches. The one change inside
is `MedMAEEmbeddings`, which projects only the visible patches (stock projects all, then drops most).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForPreTraining, ViTMAEForPreTraining
from transformers import initialization as init
from transformers.models.vit_mae.modeling_vit_mae import (
    ViTMAEDecoder, ViTMAEEmbeddings, ViTMAEForPreTrainingOutput, build_2d_sinusoidal_position_embedding,
)

from .configuration import MedMAEConfig
from .validation import check_pixels
from .masking import MASKED, VISIBLE, MaskGenerator, build_mask_generator, codes_to_noise
from .loading import CurrentKeyNamesMixin


class MedMAEEmbeddings(ViTMAEEmbeddings):
    """Stock MAE embeddings that project only the patches the encoder will see.

    Stock transformers runs the patch convolution over every patch and then drops the masked ones, so
    at mask ratio r it spends r of the projection (forward and weight gradient) on discarded tokens.
    Here the pixels are cut into patches first, stock's own `random_masking` picks the visible ones
    (same noise, same RNG draws), and the conv weight is applied to those alone as the linear map it is.
    Same parameters, same outputs up to float summation order.
    """

    def forward(self, pixel_values: torch.Tensor, noise: torch.Tensor | None = None, interpolate_pos_encoding: bool = False):
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
    pos = build_2d_sinusoidal_position_embedding(height=grid_size[0], width=grid_size[1], embed_dim=dim, cls_token=True)
    half = pos.shape[-1] // 2
    return torch.cat([pos[..., half:], pos[..., :half]], dim=-1)[None]


class MaskingMixin:
    """The masking half of both MAEs (2D and 3D): the generator named in the config, and per-batch codes."""

    def build_masking(self, config) -> None:
        kwargs = dict(config.mask_generator_kwargs or {})
        if config.mask_generator == "attention":
            kwargs.setdefault("throw_ratio", config.throw_ratio)
        self.mask_generator: MaskGenerator = build_mask_generator(
            config.mask_generator, mask_ratio=config.mask_ratio, grid_size=config.grid_size, **kwargs)
        # Per-sample attention maps for the `attention` generator, filled by AttentionRefreshCallback.
        self.attention_bank: dict[int, torch.Tensor] = {}

    def generate_codes(self, pixel_values: torch.Tensor, sample_ids: torch.Tensor | None = None, generator=None):
        """Per-patch codes (0 visible, 1 masked, 2 thrown) for a batch. [B, C, (D,) H, W] -> [B, L]."""
        scores = None
        if self.mask_generator.uses_scores and sample_ids is not None and self.attention_bank:
            maps = [self.attention_bank.get(int(i)) for i in sample_ids]
            if all(m is not None for m in maps):
                scores = torch.stack(maps).to(pixel_values.device)
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

    def __init__(self, config: MedMAEConfig):
        super().__init__(config)
        # The encoder (a ViTMAEModel) ran its own stock init inside super().__init__, so `_init_weights`
        # below never reaches its embeddings: give them their sin-cos values here (loading overwrites them).
        embeddings = self.vit.embeddings
        init.copy_(embeddings.position_embeddings, sincos_position_embedding(config.grid_size, embeddings.position_embeddings.shape[-1]))
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
            init.copy_(module.position_embeddings, sincos_position_embedding(self.config.grid_size, module.position_embeddings.shape[-1]))
        elif isinstance(module, ViTMAEDecoder):
            init.copy_(module.decoder_pos_embed, sincos_position_embedding(self.config.grid_size, module.decoder_pos_embed.shape[-1]))
            init.normal_(module.mask_token, std=self.config.initializer_range)  # as the MAE paper (stock zeroes it)

    def _check_input(self, pixel_values: torch.Tensor) -> None:
        size, p = self.vit.embeddings.image_size, self.config.patch_size
        check_pixels(pixel_values, self.config.num_channels, "the model", size=size,
                     channel_fix=f"set num_channels: {pixel_values.shape[1]} when pre-training from scratch, or convert "
                                 f"the images to {self.config.num_channels} channels for this checkpoint.",
                     size_fix=f"set image_size: {pixel_values.shape[-2]} (a multiple of patch_size {p}), or crop/tile "
                              "the images to the model's size.")  # fmt: skip

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
        mask_codes: torch.Tensor | None = None,
        return_loss: bool = True,
        **kwargs,
    ) -> ViTMAEForPreTrainingOutput:
        r"""
        Args:
            pixel_values: [B, C, H, W] normalised images.
            noise: [B, L] explicit noise (as in transformers); bypasses the mask generator.
            sample_ids: [B] dataset indices, used by the `attention` generator's per-sample maps.
            mask_codes: [B, L] explicit codes (0 visible, 1 masked, 2 thrown); bypasses the generator.
            return_loss: always computed; declaring it tells `Trainer` this label-free model has an eval loss.

        In `eval()` mode the masks come from a generator seeded by the batch, so validation loss is
        comparable across evaluations.
        """
        self._check_input(pixel_values)
        codes = None
        if noise is None:
            generator = None
            if not self.training:
                generator = torch.Generator().manual_seed(1234 + int(pixel_values.shape[0]))
            if mask_codes is None and self.mask_generator.name == "random":
                # Uniform masking is what transformers already does with plain uniform noise: no codes and
                # no extra sort on top of stock's. In training, `noise=None` lets transformers draw it from
                # the global RNG that the Trainer seeds and restores (run_mae.py passes per-image noise).
                if generator is not None:
                    noise = torch.rand(pixel_values.shape[0], self.mask_generator.num_patches, generator=generator)
                    noise = noise.to(pixel_values.device)
            else:
                codes = mask_codes if mask_codes is not None else self.generate_codes(pixel_values, sample_ids, generator)
                noise = codes_to_noise(codes, generator)
        outputs = super().forward(pixel_values, noise=noise, **kwargs)
        # Only a throw_ratio or explicit codes can throw patches: testing for them otherwise would make
        # every GPU step wait for the device (a host sync) for nothing.
        may_throw = self.config.throw_ratio > 0 or mask_codes is not None
        if codes is not None and may_throw and bool((codes > MASKED).any()):
            # Thrown patches were removed from the encoder too; only MASKED ones count in the loss.
            outputs.loss = self.reconstruction_loss(pixel_values, outputs.logits, (codes == MASKED).float())
        return outputs

    def reconstruction_loss(self, pixel_values: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """MSE over the patches with weight 1 (per-patch normalised target if `norm_pix_loss`)."""
        target = self.patchify(pixel_values)  # [B, L, p*p*C]
        if self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((logits - target) ** 2).mean(dim=-1)  # [B, L]
        return (per_patch * weight).sum() / weight.sum().clamp_min(1.0)

    def reconstruct(self, pixel_values: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Images with the predicted patches in masked places and the original visible patches pasted back.

        Undoes `norm_pix_loss` with each target patch's own mean and variance, as the MAE paper's figures do.
        """
        target = self.patchify(pixel_values)
        pred = logits
        if self.config.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        mixed = torch.where(mask[..., None].bool(), pred, target)  # [B, L, p*p*C]
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
        hidden = torch.cat([cls, tokens], dim=1)  # [B, 1+L, D]
        for layer in self.vit.layers[:-1]:
            hidden = layer(hidden, None)
        last = self.vit.layers[-1]
        hidden = last.layernorm_before(hidden)
        attn = last.attention
        b, n, _ = hidden.shape
        q = attn.q_proj(hidden[:, :1]).view(b, 1, -1, attn.head_dim).transpose(1, 2)  # [B, h, 1, d]
        k = attn.k_proj(hidden[:, 1:]).view(b, n - 1, -1, attn.head_dim).transpose(1, 2)  # [B, h, L, d]
        weights = torch.softmax((q @ k.transpose(-1, -2)) * attn.scaling, dim=-1)[:, :, 0]  # [B, h, L]
        lo, hi = weights.amin(-1, keepdim=True), weights.amax(-1, keepdim=True)
        return ((weights - lo) / (hi - lo + 1e-12)).mean(dim=1)

    attention_map = cls_attention  # the name both MAEs share (the 3D one has no CLS token)


AutoConfig.register(MedMAEConfig.model_type, MedMAEConfig)
AutoModelForPreTraining.register(MedMAEConfig, MedMAEForPreTraining)

__all__ = ["MaskingMixin", "MedMAEForPreTraining", "VISIBLE", "MASKED"]
