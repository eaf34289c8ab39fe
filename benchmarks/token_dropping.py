#!/usr/bin/env python
"""Fine-tuning cost of MSMAE's attention-driven token dropping (`MedClsConfig.throw_ratio`), with and without it.

One ViT-S-like classifier (hidden 384, 12 layers, 6 heads, MLP 1536, patch 16, 3 channels, 5 classes, mean
pooling, drop path 0.1, layer-decay AdamW groups as run_classification.py builds them) trains on the same
batch of *generated* pixels: speed does not depend on what the pixels show. Variants:

* `throw 0.0`  - every token (the baseline);
* `throw 0.3`, `throw 0.5` - the least attended 30% / 50% of patch tokens dropped, read from a filled
  attention bank (the maps are random: which tokens are dropped does not change the cost);
* `throw 0.3 + map per batch` - the alternative to a bank refreshed every few epochs: an extra all-token
  forward pass (`attention_map`) on every training batch, so that the map fits exactly the augmented view.

A step is forward + loss + backward + optimizer step. Steps alternate between the variants (round robin), so
background load on a shared machine falls on all of them alike; each row is the median img/s over
`--repeats` steps after `--warmup` rounds; `best img/s` (from the fastest step) is the less load-sensitive
figure on a busy machine. FLOPs per image are counted once per variant by
`torch.utils.flop_counter.FlopCounterMode` over one forward + backward, with eager attention (sdpa's fused CPU
kernel hides part of its backward from the counter); the optimizer step is not counted.

    python benchmarks/token_dropping.py --image-size 128 --repeats 5
    python benchmarks/token_dropping.py --image-size 224 --batch-size 16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_medmae.classification import MedClsConfig, MedClsForImageClassification
from hf_medmae.optim import param_groups_layer_decay
from hf_medmae.training import hardware_description

ENCODER = dict(
    hidden_size=384,
    num_hidden_layers=12,
    num_attention_heads=6,
    intermediate_size=1536,
    patch_size=16,
    num_channels=3,
    layer_norm_eps=1e-6,
)
VARIANTS = {
    "throw 0.0": (0.0, False),
    "throw 0.3": (0.3, False),
    "throw 0.5": (0.5, False),
    "throw 0.3 + map per batch": (0.3, True),
}


def build(
    throw_ratio: float, image_size: int, batch_size: int, attn: str
) -> tuple[MedClsForImageClassification, torch.optim.Optimizer]:
    """The classifier in training mode with a full attention bank for sample ids 0..batch-1, and its AdamW."""
    torch.manual_seed(0)
    config = MedClsConfig(
        vit_config=dict(image_size=image_size, **ENCODER), num_labels=5, drop_path_rate=0.1, throw_ratio=throw_ratio
    )
    model = MedClsForImageClassification(config).train()
    model.vit.set_attn_implementation(attn)
    num_patches = (image_size // ENCODER["patch_size"]) ** 2
    model.attention_bank = {i: torch.rand(num_patches) for i in range(batch_size)}
    groups = param_groups_layer_decay(model, 1e-3, 0.05, 0.75)
    return model, torch.optim.AdamW(groups, betas=(0.9, 0.999))


def step(model, optimizer, batch: dict, map_per_batch: bool) -> None:
    if map_per_batch:  # the map of exactly this batch's views, instead of the bank's
        maps = model.attention_map(batch["pixel_values"])
        model.attention_bank = {i: m for i, m in enumerate(maps)}
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def flops_per_image(throw_ratio: float, map_per_batch: bool, batch: dict, image_size: int) -> float:
    model, _ = build(throw_ratio, image_size, len(batch["labels"]), "eager")
    with FlopCounterMode(display=False) as counter:
        if map_per_batch:
            model.attention_map(batch["pixel_values"])
        model(**batch).loss.backward()
    return counter.get_total_flops() / len(batch["labels"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=1, help="rounds over all variants before timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--attn", default="sdpa", choices=["sdpa", "eager"], help="attention kernel of the timed steps"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "token_dropping.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen),
        "labels": torch.randint(0, 5, (args.batch_size,), generator=gen),
        "sample_ids": torch.arange(args.batch_size),
    }
    models = {name: build(ratio, args.image_size, args.batch_size, args.attn) for name, (ratio, _) in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.warmup + args.repeats):
        for name, (_, per_batch) in VARIANTS.items():
            start = time.perf_counter()
            step(*models[name], batch, per_batch)
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
    num_patches = (args.image_size // ENCODER["patch_size"]) ** 2
    rows = []
    for name, (ratio, per_batch) in VARIANTS.items():
        seconds = statistics.median(times[name])
        rows.append(
            dict(
                variant=name,
                throw_ratio=ratio,
                map_per_batch=per_batch,
                tokens_in_blocks=1 + num_patches - round(ratio * num_patches),
                img_per_s=args.batch_size / seconds,
                img_per_s_best=args.batch_size / min(times[name]),
                step_s_median=seconds,
                step_s_all=times[name],
                gflops_per_image=flops_per_image(ratio, per_batch, batch, args.image_size) / 1e9,
            )
        )
    base = rows[0]
    print(
        f"{'variant':<28}{'tokens':>7}{'img/s':>9}{'speed-up':>10}{'best img/s':>12}{'speed-up':>10}"
        f"{'GFLOPs/img':>12}{'FLOPs':>8}"
    )
    for row in rows:
        row["speedup"], row["speedup_best"] = (
            row["img_per_s"] / base["img_per_s"],
            row["img_per_s_best"] / base["img_per_s_best"],
        )
        row["flops_fraction"] = row["gflops_per_image"] / base["gflops_per_image"]
        print(
            f"{row['variant']:<28}{row['tokens_in_blocks']:>7}{row['img_per_s']:>9.2f}{row['speedup']:>9.2f}x"
            f"{row['img_per_s_best']:>12.2f}{row['speedup_best']:>9.2f}x{row['gflops_per_image']:>12.2f}{row['flops_fraction']:>7.0%}"
        )
    result = dict(
        hardware=hardware_description(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        attn=args.attn,
        image_size=args.image_size,
        batch_size=args.batch_size,
        warmup=args.warmup,
        repeats=args.repeats,
        encoder=ENCODER,
        pixels="generated (torch.randn): speed only, no accuracy",
        rows=rows,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
