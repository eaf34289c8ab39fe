"""CLS attention maps (MSMAE) and what reads them: a per-sample bank, and token dropping in fine-tuning.

MSMAE ranks patches by how much the CLS token of the last encoder block attends to them. The MAE masks
the most attended ones (`masking.AttentionMaskGenerator`); the classifier drops the least attended ones
from the encoder's input in training, so its blocks run on fewer tokens (`TokenDropper`). Both read maps
that `training.AttentionRefreshCallback` recomputes every few epochs into `model.attention_bank`
({sample id: [L] map}); images without a map (before the first refresh) are handled at random.

    >>> import torch
    >>> scores = torch.tensor([[0.9, 0.1, 0.5, 0.3]])
    >>> kept_patches(scores, num_thrown=2).tolist()  # the two least attended (1 and 3) are dropped
    [[0, 2]]
"""

from __future__ import annotations

import torch
from torch import nn

from .data.transforms import apply_view
from .errors import DataError


@torch.no_grad()
def last_block_cls_attention(layers: nn.ModuleList, hidden: torch.Tensor) -> torch.Tensor:
    """CLS-to-patch attention of the last block, heads min-max normalised then averaged. [B, 1+L, D] -> [B, L].

    `hidden` is the embeddings' output (CLS first, positions added). Every block but the last runs as
    usual; the last one's attention weights are computed with plain arithmetic from its public
    `layernorm_before` and `attention.{q,k}_proj`, so the map is the same under every attention
    implementation (sdpa and flash attention never materialise the weights).
    """
    for layer in layers[:-1]:
        hidden = layer(hidden, None)
    last = layers[-1]
    hidden = last.layernorm_before(hidden)
    attn = last.attention
    b, n, _ = hidden.shape
    q = attn.q_proj(hidden[:, :1]).view(b, 1, -1, attn.head_dim).transpose(1, 2)  # [B, h, 1, d]
    k = attn.k_proj(hidden[:, 1:]).view(b, n - 1, -1, attn.head_dim).transpose(1, 2)  # [B, h, L, d]
    return attention_received(q, k, attn.scaling)


def attention_received(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """The attention map both MAEs bank (MSMAE's recipe): [B, h, Q, d] queries, [B, h, L, d] keys -> [B, L].

    The softmax attention over the L keys, averaged over the queries (one query: the CLS token's map), each
    head min-max normalised, then the heads averaged. In float32, whatever the model's precision.
    """
    weights = torch.softmax((queries.float() @ keys.float().transpose(-1, -2)) * scaling, dim=-1)  # [B, h, Q, L]
    weights = weights.mean(dim=2)  # [B, h, L]
    lo, hi = weights.amin(-1, keepdim=True), weights.amax(-1, keepdim=True)
    return ((weights - lo) / (hi - lo + 1e-12)).mean(dim=1)


def bank_scores(
    bank: dict[int, torch.Tensor], sample_ids: torch.Tensor | None, num_patches: int, device: torch.device | str
) -> torch.Tensor | None:
    """The banked maps of a batch, [B, L], or None unless every sample has one (then the caller draws at random).

    A map of another length than `num_patches` (a bank filled for another image size) is an error.
    """
    if sample_ids is None or not bank:
        return None
    maps = [bank.get(int(i)) for i in sample_ids]
    if any(m is None for m in maps):
        return None
    scores = torch.stack(maps).to(device)
    if scores.shape[1] != num_patches:
        raise DataError(
            f"the attention bank holds maps of {scores.shape[1]} patches, the images have {num_patches}.",
            "refresh the maps (AttentionRefreshCallback) at the training image size, or clear model.attention_bank.",
        )
    return scores


def kept_patches(
    scores: torch.Tensor | None,
    num_thrown: int,
    batch_size: int | None = None,
    num_patches: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Indices of the patches to keep, [B, L - num_thrown] in grid order: all but the `num_thrown` least attended.

    Args:
        scores: [B, L] attention maps (higher = more attended), or None to drop uniformly at random (MSMAE's
            warm-up), drawn from torch's global RNG, which the Trainer seeds and restores.
        num_thrown: patches dropped per image.
        batch_size, num_patches, device: the batch's shape when `scores` is None.
    """
    if scores is None:
        scores = torch.rand(batch_size, num_patches, device=device)
    keep = scores.shape[1] - num_thrown
    return scores.topk(keep, dim=1).indices.sort(dim=1).values


def align_to_views(scores: torch.Tensor, grid_size: tuple[int, int], view_ids: torch.Tensor) -> torch.Tensor:
    """Maps of un-augmented images moved along with their training views' flips and rotations. [B, L] -> [B, L].

    `view_ids` are `Augment.with_view` codes. On a square patch grid each view permutes the patches exactly,
    so the map of the view is a gather by one of 16 fixed permutations, on the device, without a host sync.
    """
    gh, gw = grid_size
    if gh != gw:
        raise DataError(
            f"views (flips, rotations) of a {gh}x{gw} patch grid cannot be aligned with its maps.",
            "use square images and patches, or train without augmentation (no view_ids).",
        )
    grid = torch.arange(gh * gw, device=scores.device).reshape(gh, gw)
    table = torch.stack(
        [apply_view(grid, code).reshape(-1) for code in range(16)]
    )  # [16, L]: new position -> old patch
    return scores.gather(1, table[view_ids.long()])


class TokenDropper:
    """Forward hook on a ViT's embeddings that keeps the CLS token and the patch tokens named in `keep`.

    The embeddings have already added each token's position embedding, so the kept tokens carry their
    positions into the blocks. The model sets `keep` ([B, K] patch indices, per device so DataParallel
    replicas do not share it) for one encoder call and clears it after; without it the hook does nothing.
    """

    def __init__(self):
        self.keep: dict[torch.device, torch.Tensor] = {}

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor | None:
        keep = self.keep.get(output.device)
        if keep is None:
            return None
        patches = output[:, 1:].gather(1, keep[..., None].expand(-1, -1, output.shape[-1]))  # [B, K, D]
        return torch.cat([output[:, :1], patches], dim=1)  # [B, 1 + K, D]


__all__ = [
    "TokenDropper",
    "align_to_views",
    "attention_received",
    "bank_scores",
    "kept_patches",
    "last_block_cls_attention",
]
