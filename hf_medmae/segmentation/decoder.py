"""The segmentation decoders on a ViT encoder, assembled from MONAI blocks for any power-of-two patch size.

`UnetrDecoder`: MONAI's own `UNETR` fixes patch 16, 12 layers and skips hs[3, 6, 9]. Here: log2(patch)
upsampling stages, one encoder skip per intermediate stage, a convolutional skip on the input image, and the final
encoder output as the deepest feature (seed 001, section 4.2). `LightDecoder`: the last block alone, upsampled
progressively with a few convolutions (as Primus does, Wald et al. 2025), so the encoder does the work. Both take
`spatial_dims` as a parameter and the same inputs.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import nn


class UnetrDecoder(nn.Module):
    """UNETR decoder from MONAI blocks for `num_stages` = log2(patch) upsampling stages.

    Level k (0 .. num_stages) lives at resolution H / 2**k with `feature_size * 2**k` channels; level 0 is a
    conv block on the image, levels 1 .. num_stages-1 are upsampled encoder skips, the deepest level is
    the final encoder output.

    Args:
        spatial_dims: 2 for images.
        in_channels: image channels.
        hidden_size: encoder width.
        num_stages: upsampling stages.
        feature_size: channels at input resolution.
        out_channels: number of classes.
        norm_name: MONAI norm name.
        res_block: residual blocks.

    Example:
        >>> dec = UnetrDecoder(2, 3, hidden_size=32, num_stages=2, feature_size=8, out_channels=4)
        >>> dec(torch.randn(1, 3, 16, 16), [torch.randn(1, 32, 4, 4)], torch.randn(1, 32, 4, 4)).shape
        torch.Size([1, 4, 16, 16])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        hidden_size: int,
        num_stages: int,
        feature_size: int,
        out_channels: int,
        norm_name: str = "instance",
        res_block: bool = True,
    ):
        super().__init__()
        dims, norm = spatial_dims, norm_name
        self.input_block = UnetrBasicBlock(
            dims, in_channels, feature_size, kernel_size=3, stride=1, norm_name=norm, res_block=res_block
        )
        # A PrUpBlock with num_layer=n upsamples by 2**(n+1): from H/patch up to level k's H/2**k.
        self.skip_blocks = nn.ModuleList(
            UnetrPrUpBlock(
                dims,
                hidden_size,
                feature_size * 2**k,
                num_layer=num_stages - k - 1,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name=norm,
                conv_block=True,
                res_block=res_block,
            )
            for k in range(1, num_stages)
        )
        # Deep to shallow: stage k takes level k+1 (the encoder output for the deepest) up to level k.
        self.up_blocks = nn.ModuleList(
            UnetrUpBlock(
                dims,
                hidden_size if k == num_stages - 1 else feature_size * 2 ** (k + 1),
                feature_size * 2**k,
                kernel_size=3,
                upsample_kernel_size=2,
                norm_name=norm,
                res_block=res_block,
            )
            for k in reversed(range(num_stages))
        )
        self.out_block = UnetOutBlock(dims, feature_size, out_channels)

    def forward(self, image: torch.Tensor, skips: list[torch.Tensor], deepest: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] image, skips [B, D, h, w] shallow to deep, deepest [B, D, h, w] -> [B, classes, H, W]."""
        levels = [self.input_block(image)] + [block(x) for block, x in zip(self.skip_blocks, skips)]
        x = deepest
        for up, skip in zip(self.up_blocks, reversed(levels)):
            x = up(x, skip)
        return self.out_block(x)


class LightDecoder(nn.Module):
    """The final encoder output, upsampled by 2 per stage with `feature_size` channels and a residual conv block
    after each step (MONAI's `UnetrPrUpBlock`), then a 1x1 conv to the classes; no skips. A few percent of the
    UNETR decoder's parameters, so a pre-trained encoder is not drowned by a decoder trained from scratch.

    Example:
        >>> dec = LightDecoder(2, hidden_size=32, num_stages=2, feature_size=8, out_channels=4)
        >>> dec(torch.randn(1, 3, 16, 16), [torch.randn(1, 32, 4, 4)], torch.randn(1, 32, 4, 4)).shape
        torch.Size([1, 4, 16, 16])
    """

    def __init__(
        self,
        spatial_dims: int,
        hidden_size: int,
        num_stages: int,
        feature_size: int,
        out_channels: int,
        norm_name: str = "instance",
        res_block: bool = True,
    ):
        super().__init__()
        # num_layer=n upsamples by 2**(n+1): the patch size in num_stages steps, a conv block after each
        self.up = UnetrPrUpBlock(
            spatial_dims,
            hidden_size,
            feature_size,
            num_layer=num_stages - 1,
            kernel_size=3,
            stride=1,
            upsample_kernel_size=2,
            norm_name=norm_name,
            conv_block=True,
            res_block=res_block,
        )
        self.out_block = UnetOutBlock(spatial_dims, feature_size, out_channels)

    def forward(self, image: torch.Tensor, skips: list[torch.Tensor], deepest: torch.Tensor) -> torch.Tensor:
        """As `UnetrDecoder.forward`; the image and the skips are not used."""
        return self.out_block(self.up(deepest))


__all__ = ["LightDecoder", "UnetrDecoder"]
