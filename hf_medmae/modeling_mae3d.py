"""The 3D MAE: transformers' VideoMAE with volumes as clips, our mask generators and fixed 3D sin-cos positions.

A volume [B, C, D, H, W] is a clip of D frames: VideoMAE's tubelet is the patch depth, its Conv3d is the
3D patch embedding, and its `bool_masked_pos` takes any mask, so the 2D registry's generators drive it on
the (D/t, H/p, W/p) patch grid. Two things change (docs/design.md says why):
positions are MONAI's separable 3D sin-cos instead of VideoMAE's 1-D table over the flattened grid, and
the loss is ours (any channel count, `norm_pix_loss` on or off, thrown patches left out), computed on
the tubelet layout VideoMAE's decoder head predicts.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from transformers import AutoConfig, AutoModelForPreTraining, VideoMAEConfig, VideoMAEForPreTraining, VideoMAEModel
from transformers import initialization as init
from transformers.models.videomae.modeling_videomae import VideoMAEForPreTrainingOutput

from .attention_maps import attention_received
from .configuration import PatchGridMixin
from .errors import ConfigError, DataError
from .loading import CurrentKeyNamesMixin
from .masking import MASKED, VISIBLE
from .modeling_mae import MaskingMixin, mae_loss, mae_targets, targets_to_pixels
from .validation import as_pair, check_pixels

# The encoder's architecture fields, the ones a 3D segmenter copies from an MAE checkpoint.
ENCODER_FIELDS = tuple(
    "hidden_size num_hidden_layers num_attention_heads intermediate_size hidden_act hidden_dropout_prob "
    "attention_probs_dropout_prob initializer_range layer_norm_eps image_size patch_size num_channels num_frames "
    "tubelet_size qv_bias use_mean_pooling".split()
)


@strict
class MedMAE3DConfig(PatchGridMixin, VideoMAEConfig):
    r"""Configuration of [`MedMAE3DForPreTraining`]: every `VideoMAEConfig` field plus the 2D MAE's masking fields.

    Volumes are `num_frames` (depth) x `image_size` (height, width); patches are `tubelet_size` (depth) x
    `patch_size` x `patch_size` voxels, so anisotropic voxels can get flatter patches.

    Args:
        mask_generator (`str`, defaults to `"random"`): a name in `hf_medmae.masking.MASK_GENERATORS`.
        mask_generator_kwargs (`dict`, *optional*): that generator's settings.
        mask_ratio (`float`, defaults to 0.75): fraction of patches the encoder does not see.
        throw_ratio (`float`, defaults to 0.0): part of `mask_ratio` neither encoded nor reconstructed
            (`attention` generator only).
        use_mean_pooling (`bool`, defaults to `False`): False keeps the final LayerNorm on the encoder
            output, as the MAE does.

    Example:
        >>> config = MedMAE3DConfig(num_channels=1, num_frames=16, image_size=32, patch_size=8, tubelet_size=4,
        ...     hidden_size=48, num_attention_heads=2, decoder_hidden_size=48, decoder_num_attention_heads=2)
        >>> config.grid_size, config.num_patches
        ((4, 4, 4), 64)
    """

    model_type = "medmae3d"

    mask_ratio: float = 0.75
    mask_generator: str = "random"
    mask_generator_kwargs: dict | None = None
    throw_ratio: float = 0.0
    use_mean_pooling: bool = False

    @property
    def volume_size(self) -> tuple[int, int, int]:
        return (self.num_frames, *as_pair(self.image_size))

    input_size = volume_size

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        return (self.tubelet_size, self.patch_size, self.patch_size)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not isinstance(self.patch_size, int):
            raise ConfigError(
                f"patch_size={self.patch_size}: the 3D MAE takes one in-plane patch side.",
                "give patch_size as an int and the depth of a patch as tubelet_size.",
            )
        for name in ("hidden_size", "decoder_hidden_size"):
            if getattr(self, name) % 6:  # 3D sin-cos: a sin and a cos per axis
                raise ConfigError(
                    f"{name}={getattr(self, name)} is not divisible by 6.",
                    "3D sin-cos positions need widths divisible by 6, e.g. 96, 192, 384 or 768.",
                )
        self.check_architecture("volume", "the patch", " (num_frames x image_size over tubelet_size x patch_size^2)")


def sincos_3d(grid_size: tuple[int, int, int], dim: int) -> torch.Tensor:
    """[1, gd*gh*gw, dim] fixed 3D sin-cos positions (MONAI's, as SelfMedMAE's 3D MAE), depth-major order."""
    # On the CPU explicitly: `from_pretrained` builds modules under a meta-device context, and this table
    # is computed, never loaded. MONAI's meshgrid call predates torch's `indexing` argument (its default is ours).
    with torch.device("cpu"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.meshgrid")
        return build_sincos_position_embedding(list(grid_size), dim, spatial_dims=3).detach().clone()


def patchify_3d(volumes: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, C, D, H, W] -> [B, L, t*p*p*C] in VideoMAE's token (depth-major) and within-patch (t, p, p, C) order."""
    b, c, d, h, w = volumes.shape
    t, ph, pw = patch
    x = volumes.reshape(b, c, d // t, t, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (d // t) * (h // ph) * (w // pw), t * ph * pw * c)


def unpatchify_3d(patches: torch.Tensor, patch: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
    """The inverse of `patchify_3d`: [B, L, t*p*p*C] -> [B, C, D, H, W] for a volume of `size` (D, H, W)."""
    (t, ph, pw), (d, h, w) = patch, size
    b = patches.shape[0]
    x = patches.reshape(b, d // t, h // ph, w // pw, t, ph, pw, -1)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, -1, d, h, w)


class MedMAE3DModel(CurrentKeyNamesMixin, VideoMAEModel):
    """VideoMAE's encoder on volumes [B, C, D, H, W] with 3D sin-cos positions: the 3D backbone.

    `load_encoder` returns this class for 3D checkpoints. Weight names are VideoMAEModel's.

    Example:
        >>> config = MedMAE3DConfig(num_channels=1, num_frames=8, image_size=16, patch_size=4, tubelet_size=4,
        ...     hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96)
        >>> MedMAE3DModel(config)(torch.randn(2, 1, 8, 16, 16)).last_hidden_state.shape  # [B, L, D]
        torch.Size([2, 32, 48])
    """

    config_class = MedMAE3DConfig

    def __init__(self, config: MedMAE3DConfig):
        super().__init__(config)
        use_sincos_3d(self, config)

    def check_size(self, size: tuple[int, int, int]) -> None:
        """Fixed 3D positions are made for one crop size: name it when another arrives."""
        expected = self.config.volume_size
        if tuple(size) != tuple(expected):
            raise DataError(
                f"the volumes are {'x'.join(map(str, size))} but the 3D encoder was built for "
                f"{'x'.join(map(str, expected))}.",
                "feed crops of the training size; whole volumes go "
                "through sliding-window inference (hf_medmae.segmentation.predict).",
            )

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None, **kwargs):
        """pixel_values [B, C, D, H, W]; bool_masked_pos [B, L] True where a patch is not encoded."""
        check_pixels(pixel_values, self.config.num_channels, "the 3D encoder", spatial_dims=3)
        self.check_size(tuple(pixel_values.shape[2:]))
        return super().forward(pixel_values.transpose(1, 2), bool_masked_pos=bool_masked_pos, **kwargs)


def use_sincos_3d(encoder: VideoMAEModel, config: MedMAE3DConfig) -> None:
    # VideoMAE keeps its table as a plain attribute (not a parameter or buffer): a swap, nothing to load.
    encoder.embeddings.position_embeddings = sincos_3d(config.grid_size, config.hidden_size)


@dataclass
class MedMAE3DOutput(VideoMAEForPreTrainingOutput):
    r"""VideoMAE's output plus `mask`: [B, L] codes (0 visible, 1 masked and reconstructed, 2 thrown).
    `logits` [B, L_masked, t*p*p*C] are the predictions for the masked patches, in patch order."""

    mask: torch.Tensor | None = None


class MedMAE3DForPreTraining(MaskingMixin, CurrentKeyNamesMixin, VideoMAEForPreTraining):
    r"""3D masked autoencoder whose masking strategy is part of its config.

    Example:
        >>> config = MedMAE3DConfig(num_channels=2, num_frames=8, image_size=16, patch_size=4, tubelet_size=4,
        ...     hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
        ...     decoder_hidden_size=48, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        ...     decoder_intermediate_size=96, mask_generator="block")
        >>> out = MedMAE3DForPreTraining(config)(torch.randn(2, 2, 8, 16, 16))
        >>> out.logits.shape  # [B, masked patches, t*p*p*C]
        torch.Size([2, 24, 128])
    """

    config_class = MedMAE3DConfig
    config: MedMAE3DConfig

    def __init__(self, config: MedMAE3DConfig):
        super().__init__(config)
        self.videomae.__class__ = MedMAE3DModel  # the forward on [B, C, D, H, W]; same parameters and names
        use_sincos_3d(self.videomae, config)
        self.position_embeddings = sincos_3d(config.grid_size, config.decoder_hidden_size)
        self.build_masking(config)

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        if module is self:  # a normal mask token, as the MAE and VideoMAE papers (stock zeroes it)
            init.normal_(self.mask_token, std=self.config.initializer_range)

    def _check_input(self, pixel_values: torch.Tensor) -> None:
        d, h, w = self.config.volume_size
        check_pixels(
            pixel_values,
            self.config.num_channels,
            "the 3D model",
            size=(d, h, w),
            channel_fix=f"set num_channels: {pixel_values.shape[1]} when pre-training from scratch, or convert "
            f"the volumes to {self.config.num_channels} channels for this checkpoint.",
            size_fix=f"crop the volumes to {d}x{h}x{w} (the model's crop size).",
            spatial_dims=3,
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        sample_ids: torch.Tensor | None = None,
        mask_codes: torch.Tensor | None = None,
        return_loss: bool = True,
        **kwargs,
    ) -> MedMAE3DOutput:
        r"""
        Args:
            pixel_values: [B, C, D, H, W] normalised volumes.
            sample_ids: [B] dataset indices, for the `attention` generator's per-sample maps.
            mask_codes: [B, L] explicit codes (0 visible, 1 masked, 2 thrown); bypasses the generator.
            return_loss: always computed; declaring it tells `Trainer` this label-free model has an eval loss.
        """
        self._check_input(pixel_values)
        if mask_codes is None:
            mask_codes = self.generate_codes(pixel_values, sample_ids, self.eval_generator(pixel_values.shape[0]))
        else:
            self.check_codes(mask_codes, pixel_values.shape[0])
        hidden = self.videomae(pixel_values, bool_masked_pos=mask_codes != VISIBLE, **kwargs).last_hidden_state
        hidden = self.encoder_to_decoder(hidden)  # [B, L_visible, Dd]
        batch, _, width = hidden.shape
        position = self.position_embeddings.to(hidden).expand(batch, -1, -1)
        masked = mask_codes == MASKED
        # Thrown patches get no decoder token at all: neither encoded nor reconstructed (MSMAE).
        visible_pos = position[mask_codes == VISIBLE].reshape(batch, -1, width)
        masked_pos = position[masked].reshape(batch, -1, width)
        tokens = torch.cat([hidden + visible_pos, self.mask_token + masked_pos], dim=1)
        logits = self.decoder(tokens, masked_pos.shape[1]).logits  # [B, L_masked, t*p*p*C]
        target = self.targets(pixel_values)[masked].reshape(batch, masked_pos.shape[1], -1)
        loss = mae_loss(logits.float(), target.float())  # every gathered patch is a masked one
        return MedMAE3DOutput(loss=loss, logits=logits, mask=mask_codes)

    def targets(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the decoder predicts per patch: [B, L, t*p*p*C], normalised per patch if `norm_pix_loss`."""
        return mae_targets(patchify_3d(pixel_values, self.config.patch_shape), self.config.norm_pix_loss)

    @torch.no_grad()
    def reconstruct(self, pixel_values: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Volumes with the predicted patches in masked places, visible ones pasted back; thrown patches are 0.

        Undoes `norm_pix_loss` with each patch's own mean and variance, as the MAE paper's figures do.
        """
        patches = patchify_3d(pixel_values, self.config.patch_shape)
        pred = logits.to(patches.dtype)
        pred = targets_to_pixels(pred, patches[mask == MASKED].reshape(pred.shape), self.config.norm_pix_loss)
        mixed = torch.where((mask == VISIBLE)[..., None], patches, torch.zeros_like(patches))
        mixed[mask == MASKED] = pred.reshape(-1, pred.shape[-1])
        return unpatchify_3d(mixed, self.config.patch_shape, tuple(pixel_values.shape[2:]))

    @torch.no_grad()
    def attention_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Where the last encoder block looks, on all patches: [B, C, D, H, W] -> [B, L].

        VideoMAE has no CLS token, so a patch's score is the attention it receives, averaged over all
        queries; heads are min-max normalised, then averaged (MSMAE's recipe for the CLS map). Plain
        arithmetic on the public modules, so every attention implementation gives the same map.
        """
        emb = self.videomae.embeddings
        hidden = emb(pixel_values.transpose(1, 2), None)  # [B, L, D] with positions
        layers = self.videomae.encoder.layer
        for layer in layers[:-1]:
            hidden = layer(hidden)
        last = layers[-1]
        attn = last.attention.attention
        hidden = last.layernorm_before(hidden)
        b, n, _ = hidden.shape
        q = attn.query(hidden).view(b, n, -1, attn.attention_head_size).transpose(1, 2)  # [B, h, L, d]
        k = attn.key(hidden).view(b, n, -1, attn.attention_head_size).transpose(1, 2)
        return attention_received(q, k, attn.scaling)  # every patch a query: no CLS token


AutoConfig.register(MedMAE3DConfig.model_type, MedMAE3DConfig)
AutoModelForPreTraining.register(MedMAE3DConfig, MedMAE3DForPreTraining)

__all__ = [
    "ENCODER_FIELDS",
    "MedMAE3DConfig",
    "MedMAE3DForPreTraining",
    "MedMAE3DModel",
    "MedMAE3DOutput",
    "patchify_3d",
    "sincos_3d",
    "unpatchify_3d",
]
