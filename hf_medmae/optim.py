"""Fine-tuning optimisation pieces of the MAE recipe: layer-wise lr decay groups and stochastic depth.

Both work on any model whose encoder is a `transformers.ViTModel` (or the 3D MAE's VideoMAE encoder) under
the attribute `vit` (our classifier and segmenters), or on a bare encoder.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import VideoMAEModel, ViTModel

from .errors import ConfigError

_BLOCK = re.compile(r"^(?:layers|encoder\.layer)\.(\d+)\.")  # ViT's blocks; VideoMAE's (3D)
# Parameters that are never weight-decayed, whatever their rank (MAE's `no_weight_decay` list).
_NO_DECAY_NAMES = ("embeddings.cls_token", "embeddings.position_embeddings", "embeddings.mask_token")


def _encoder_of(model: nn.Module) -> tuple[ViTModel | VideoMAEModel, str]:
    """The model's ViT (or 3D VideoMAE) encoder and the prefix of its parameter names."""
    if isinstance(model, (ViTModel, VideoMAEModel)):
        return model, ""
    if isinstance(getattr(model, "vit", None), (ViTModel, VideoMAEModel)):
        return model.vit, "vit."
    raise ConfigError(
        f"{type(model).__name__} has no `vit` attribute holding a transformers ViTModel.",
        "use a model built by hf_medmae (classifier / segmenter) or pass the ViTModel itself.",
    )


def layer_id(name: str, num_layers: int, prefix: str = "vit.") -> int:
    """MAE layer id of a parameter: embeddings 0, block i -> i + 1, everything else num_layers + 1.

    Args:
        name: Parameter name as in `model.named_parameters()`.
        num_layers: Number of encoder blocks.
        prefix: Prefix of the encoder's parameter names ("vit." for our models, "" for a ViTModel).

    Example:
        >>> layer_id("vit.layers.3.mlp.fc1.weight", num_layers=12)
        4
    """
    if not name.startswith(prefix):
        return num_layers + 1
    local = name[len(prefix) :]
    if local.startswith("embeddings."):
        return 0
    block = _BLOCK.match(local)
    return int(block.group(1)) + 1 if block else num_layers + 1


def default_layer_decay(layer_decay: float | None, init: str) -> float:
    """`layer_decay` as set, else 0.75 for MAE weights (the MAE fine-tuning recipe) and 1.0 from scratch,
    where every layer learns from nothing."""
    return layer_decay if layer_decay is not None else (0.75 if init == "mae" else 1.0)


def param_groups_layer_decay(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    layer_decay: float = 0.75,
    no_decay_1d: bool = True,
) -> list[dict]:
    """Optimizer parameter groups with layer-wise lr decay (MAE fine-tuning recipe).

    Group lr = base_lr * layer_decay ** (num_layers + 1 - layer_id); heads and decoders (outside
    `vit`) and the encoder's final LayerNorm get the full base_lr. Only parameters with
    `requires_grad` are included. No weight decay on cls_token, position embeddings, and (with
    `no_decay_1d`) on every 1-D parameter: biases and LayerNorm weights.

    With `Trainer`, pass the groups through `optimizer_cls_and_kwargs`; `Trainer.create_optimizer`
    (transformers 5.23) uses `params` from the kwargs as the groups, and the lr scheduler multiplies
    each group's own initial lr, so the per-layer ratios hold through warm-up and decay
    (`TrainingArguments.learning_rate` is then unused: the groups carry their lr):

        >>> groups = param_groups_layer_decay(model, base_lr=1e-3, weight_decay=0.05)  # doctest: +SKIP
        >>> trainer = Trainer(model, args, optimizer_cls_and_kwargs=(torch.optim.AdamW,
        ...     {"params": groups, "betas": (0.9, 0.999)}), ...)

    `create_optimizer` pops "params" from that dict, so build a fresh dict per `Trainer`.

    Args:
        model: A model with a `.vit` ViTModel, or a ViTModel.
        base_lr: lr of the last layer id (head).
        weight_decay: Decoupled weight decay of the decayed groups.
        layer_decay: Per-layer lr factor (0.75 MAE ViT-S/B fine-tuning; 1.0 disables it).
        no_decay_1d: Exempt 1-D parameters (biases, norms) from weight decay.

    Returns:
        One dict per (layer id, decay) pair with keys params, param_names, lr, weight_decay,
        lr_scale and layer_id.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ConfigError(f"layer_decay={layer_decay} is outside (0, 1].", "use e.g. 0.75 (MAE) or 1.0 for none.")
    encoder, prefix = _encoder_of(model)
    num_layers = encoder.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid = layer_id(name, num_layers, prefix)
        exempt = name[len(prefix) :] in _NO_DECAY_NAMES if name.startswith(prefix) else False
        decay = not (exempt or (no_decay_1d and (param.ndim <= 1 or name.endswith(".bias"))))
        scale = layer_decay ** (num_layers + 1 - lid)
        group = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "param_names": [],
                "lr": base_lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
                "layer_id": lid,
            },
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def drop_path_rates(num_layers: int, drop_path_rate: float) -> list[float]:
    """Stochastic-depth rate per block, rising linearly from 0 (first block) to `drop_path_rate` (last).

    Example:
        >>> drop_path_rates(3, 0.2)
        [0.0, 0.1, 0.2]
    """
    if not 0.0 <= drop_path_rate <= 1.0:
        raise ConfigError(f"drop_path_rate={drop_path_rate} is outside [0, 1].", "use e.g. 0.1 (MAE fine-tuning).")
    return [float(r) for r in torch.linspace(0.0, drop_path_rate, num_layers)]


class DropPathHook:
    """Forward hook that drops a ViTLayer's whole residual update per sample (stochastic depth).

    transformers' `ViTLayer` computes x + attn(LN(x)) and then + mlp(LN(.)) with no drop path. The
    hook sees only the block's input and output, so it treats the block's total update
    `out - inp` as one residual branch: with probability `rate` a sample's block becomes the
    identity, survivors' updates are scaled by 1 / (1 - rate). This is a documented
    simplification of timm/MAE, which drop the attention and MLP branches independently.
    Active only in training mode. Under gradient checkpointing torch restores the RNG state on
    recomputation, so the same samples are dropped in the backward pass.
    """

    def __init__(self, rate: float):
        self.rate = float(rate)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        if not module.training or self.rate <= 0.0:
            return None
        inputs = args[0] if args else kwargs["hidden_states"]
        keep_prob = 1.0 - self.rate
        shape = (output.shape[0],) + (1,) * (output.dim() - 1)  # [B, 1, 1]: one draw per sample
        keep = torch.rand(shape, device=output.device) < keep_prob
        scale = keep.to(output.dtype) / keep_prob if keep_prob > 0.0 else keep.to(output.dtype)
        return inputs + (output - inputs) * scale

    def __repr__(self) -> str:
        return f"DropPathHook(rate={self.rate:.3f})"


def add_drop_path(model: nn.Module, drop_path_rate: float) -> list[RemovableHandle]:
    """Add stochastic depth to every encoder block of a ViT through forward hooks.

    The hooks are registered first in line (`prepend=True`) so that hidden states recorded by
    transformers' own output hooks (`output_hidden_states=True`) already include the drop.

    Args:
        model: A model with a `.vit` ViTModel, or a ViTModel.
        drop_path_rate: Rate of the last block; earlier blocks rise linearly from 0.

    Returns:
        The hook handles (call `.remove()` on each to undo). Blocks with rate 0 get no hook.

    Example:
        >>> handles = add_drop_path(classifier, 0.1)  # doctest: +SKIP
    """
    encoder, _ = _encoder_of(model)
    handles = []
    for layer, rate in zip(encoder.layers, drop_path_rates(len(encoder.layers), drop_path_rate)):
        if rate > 0.0:
            handles.append(layer.register_forward_hook(DropPathHook(rate), prepend=True, with_kwargs=True))
    return handles


def layer_decay_adamw(model: nn.Module, args, layer_decay: float) -> tuple[type, dict]:
    """AdamW over layer-decay groups, with the run's lr, weight decay, betas and epsilon, for `Trainer`'s
    `optimizer_cls_and_kwargs` (a fresh dict per call: `Trainer.create_optimizer` pops "params").

    Args:
        model: A model with a `.vit` encoder, or the encoder itself.
        args: The run's `TrainingArguments` (learning_rate, weight_decay, adam_beta1/2, adam_epsilon).
        layer_decay: Per-layer lr factor (see `param_groups_layer_decay`).
    """
    groups = param_groups_layer_decay(model, args.learning_rate, args.weight_decay, layer_decay)
    return torch.optim.AdamW, {"params": groups, "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}


def optimizer_for(model, model_args, args):
    """AdamW over layer-decay groups for ViT segmenters (Trainer's default optimiser for the U-Net)."""
    if model_args.model != "unetr":
        return None
    return layer_decay_adamw(model, args, default_layer_decay(model_args.layer_decay, model_args.init))


__all__ = [
    "optimizer_for",
    "layer_decay_adamw",
    "default_layer_decay",
    "param_groups_layer_decay",
    "layer_id",
    "drop_path_rates",
    "add_drop_path",
    "DropPathHook",
]
