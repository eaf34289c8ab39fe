"""Checkpoint format shared by every model of ours."""

from __future__ import annotations


class CurrentKeyNamesMixin:
    """Save weights under the key names the model uses now.

    transformers 5.x `save_pretrained` defaults to `save_original_format=True`, which writes ViT
    blocks under their pre-5.0 names (`encoder.layer.N.attention.attention.query`, ...). The Trainer
    restores checkpoints (resume, best-model reload) with a non-strict `load_state_dict` that does
    not rename, so every renamed weight would silently keep its stale value. With current names both
    `from_pretrained` and the Trainer load every weight.
    """

    def save_pretrained(self, *args, save_original_format: bool = False, **kwargs):
        return super().save_pretrained(*args, save_original_format=save_original_format, **kwargs)
