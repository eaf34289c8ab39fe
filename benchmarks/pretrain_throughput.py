#!/usr/bin/env python
"""Pre-training step throughput: MedMAEForPreTraining vs stock ViTMAEForPreTraining, same config and weights.

For each config four models share one set of weights: stock and ours, each with sdpa and with eager
attention. Each repeat times `--steps` AdamW training steps of each ours/stock pair back to back, so
machine noise hits both alike; the table reports median img/s over repeats and two ratios:
  * same kernel: ours/stock with the same attention. With random masking ours runs stock's ops except
    that it projects only the visible patches (stock projects all, then drops the masked ones), so
    it should be >= 1.0, by about the share of the step that the masked patches' projection was;
  * default: ours with `attn_implementation: auto` (what run_mae.py does: sdpa unless eager is measured
    >15% faster) over stock's default (sdpa).
Ratios are medians of per-repeat ratios (each pair timed back to back); "noise" is half their IQR.
Configs with more than --eager-max-patches patches (patch 2) time the sdpa pair only.
It also reports the activation memory saved for backward (MB, per batch), each mask generator's own
cost as a share of a step (first mask ratio only), and, with --precision bf16, CPU bf16 autocast.

    python benchmarks/pretrain_throughput.py                                    # the full grid below
    python benchmarks/pretrain_throughput.py --models 1 --patches 8 --mask-ratios 0.5 --no-vit-b16
    python benchmarks/pretrain_throughput.py --points 1/4/0.9 1/2/0.5 --repeats 25   # chosen rows, more repeats
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import ViTMAEForPreTraining

from hf_medmae import MASK_GENERATORS, MedMAEConfig, MedMAEForPreTraining
from hf_medmae.performance import choose_attention
from hf_medmae.training import hardware_description

MODELS = {  # seed 001, tables 2 and 3
    1: dict(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=6,
        decoder_hidden_size=192,
        decoder_intermediate_size=768,
        decoder_num_hidden_layers=6,
        decoder_num_attention_heads=6,
    ),
    2: dict(
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        decoder_hidden_size=128,
        decoder_intermediate_size=256,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=2,
    ),
}
VIT_B16 = dict(
    num_channels=3,
    image_size=224,
    patch_size=16,
    mask_ratio=0.75,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    decoder_hidden_size=512,
    decoder_intermediate_size=2048,
    decoder_num_hidden_layers=8,
    decoder_num_attention_heads=16,
)  # the MAE paper's ViT-B
KINDS = ("stock_sdpa", "stock_eager", "ours_sdpa", "ours_eager")


def seed001_config(model_id: int, patch: int, ratio: float, generator: str = "random") -> MedMAEConfig:
    return MedMAEConfig(
        num_channels=16,
        image_size=64,
        patch_size=patch,
        mask_ratio=ratio,
        norm_pix_loss=True,
        layer_norm_eps=1e-6,
        mask_generator=generator,
        **MODELS[model_id],
    )


def make_models(config: MedMAEConfig, kinds=KINDS) -> dict[str, torch.nn.Module]:
    """The variants in `kinds` with identical weights, in training mode."""
    torch.manual_seed(0)
    ours = MedMAEForPreTraining._from_config(config, attn_implementation="sdpa")
    models = {"ours_sdpa": ours}
    for kind in kinds:
        if kind not in models:
            cls = ViTMAEForPreTraining if kind.startswith("stock") else MedMAEForPreTraining
            models[kind] = cls._from_config(config, attn_implementation=kind.split("_")[1])
            models[kind].load_state_dict(ours.state_dict())
    return {k: models[k].train() for k in kinds}


def autocast(precision: str, device: str):
    return torch.autocast(device, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def time_steps(model, optimizer, batch: torch.Tensor, steps: int, precision: str, max_grad_norm: float = 0.0) -> float:
    """Images per second over `steps` full training steps (forward, backward, optional clipping, AdamW)."""
    start = time.perf_counter()
    for _ in range(steps):
        with autocast(precision, batch.device.type):
            loss = model(batch).loss
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if batch.is_cuda:
        torch.cuda.synchronize()
    return steps * batch.shape[0] / (time.perf_counter() - start)


def compare(
    models: dict, batch: torch.Tensor, steps: int, repeats: int, precision: str, block_seconds: float = 1.0
) -> dict[str, list[float]]:
    """img/s of each model per repeat. Each ours/stock pair runs back to back (the pair's ratio sees the
    same machine state), the side that goes first alternates, and the order of the pairs rotates."""
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95)) for k, m in models.items()}
    for k in models:  # warm-up: allocator, kernels, lazy init
        warm = time_steps(models[k], opts[k], batch, 2, precision)
    steps = max(steps, round(block_seconds * warm / batch.shape[0]))  # short steps: longer blocks, less noise
    rates = {k: [] for k in models}
    pairs = [(f"stock_{a}", f"ours_{a}") for a in ("sdpa", "eager") if f"ours_{a}" in models]
    for r in range(repeats):
        for pair in pairs[r % len(pairs) :] + pairs[: r % len(pairs)]:
            for k in pair if r % 2 == 0 else pair[::-1]:
                rates[k].append(time_steps(models[k], opts[k], batch, steps, precision))
    return rates


def paired_ratio(ours: list[float], stock: list[float]) -> tuple[float, float]:
    """Median of per-repeat ratios (each pair timed back to back) and half their interquartile range."""
    ratios = sorted(o / s for o, s in zip(ours, stock))
    q1, q3 = statistics.quantiles(ratios, n=4)[0], statistics.quantiles(ratios, n=4)[2]
    return statistics.median(ratios), (q3 - q1) / 2


def activation_mb(model, batch: torch.Tensor) -> float:
    """MB of tensors autograd keeps for the backward pass of one training forward (what bounds the batch)."""
    seen: dict[int, int] = {}

    def keep(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # count shared storage once
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


def generator_costs(config: MedMAEConfig, batch: torch.Tensor, step_s: float, repeats: int = 10) -> dict[str, float]:
    """Each mask generator's median time for one batch, as % of a training step."""
    costs = {}
    for name in sorted(MASK_GENERATORS):
        variant = copy.deepcopy(config)
        variant.mask_generator = name
        model = MedMAEForPreTraining._from_config(variant)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate_codes(batch)
            times.append(time.perf_counter() - start)
        costs[name] = round(100 * statistics.median(times) / step_s, 2)
    return costs


def run_config(name: str, config: MedMAEConfig, batch_size: int, args, with_costs: bool) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batch = torch.randn(batch_size, config.num_channels, config.image_size, config.image_size, device=device)
    # Eager attention materialises [B, heads, L, L]: at patch 2 (1025 tokens) it is ~3x slower than sdpa
    # and never chosen, so long sequences time the sdpa pair only (twice the repeats in the same time).
    kinds = KINDS if config.num_patches <= args.eager_max_patches else ("stock_sdpa", "ours_sdpa")
    models = {k: m.to(device) for k, m in make_models(config, kinds).items()}
    per_repeat = compare(models, batch, args.steps, args.repeats, args.precision)
    rates = {k: round(statistics.median(per_repeat[k]), 2) if k in per_repeat else None for k in KINDS}
    auto = choose_attention(models["ours_sdpa"], batch_size)
    models["ours_sdpa"].set_attn_implementation("sdpa")
    same = {
        k: paired_ratio(per_repeat[f"ours_{k}"], per_repeat[f"stock_{k}"])
        for k in ("sdpa", "eager")
        if f"ours_{k}" in per_repeat
    }
    default, default_iqr = (
        paired_ratio(per_repeat[f"ours_{auto}"], per_repeat["stock_sdpa"])
        if f"ours_{auto}" in per_repeat
        else (None, None)
    )
    row = dict(
        config=name,
        patch=config.patch_size,
        mask_ratio=config.mask_ratio,
        batch=batch_size,
        precision=args.precision,
        **rates,
        **{f"same_kernel_{k}": round(same[k][0], 3) if k in same else None for k in ("sdpa", "eager")},
        same_kernel_noise=round(max(v[1] for v in same.values()), 3),  # half-IQR of the per-repeat ratios
        auto_choice=auto,
        default_ratio=default and round(default, 3),
        default_noise=default_iqr and round(default_iqr, 3),
        activation_mb={k: round(activation_mb(models[k], batch), 1) for k in ("stock_sdpa", "ours_sdpa")},
    )
    if with_costs:
        row["generator_cost_pct"] = generator_costs(config, batch, batch_size / rates["ours_sdpa"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--patches", type=int, nargs="+", default=[8, 4, 2], help="patch 2 has 4x the tokens of patch 4: slow on a CPU"
    )
    parser.add_argument("--mask-ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--no-vit-b16", action="store_true", help="skip ViT-B/16 (3 ch, 224 px, mask 0.75)")
    parser.add_argument("--batch-size", type=int, default=32, help="seed 001 configs at patch 4 and 8")
    parser.add_argument(
        "--small-batch-size", type=int, default=8, help="patch 2 and ViT-B/16, whose steps are much longer"
    )
    parser.add_argument(
        "--points", nargs="+", metavar="MODEL/PATCH/MASK", help="instead of the grid, e.g. 1/4/0.9 1/2/0.5"
    )
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--eager-max-patches", type=int, default=256, help="longer sequences time sdpa only")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", default="benchmarks/results/pretrain_throughput.json")
    args = parser.parse_args()
    rows = []
    grid = [(m, p, r) for m in args.models for p in args.patches for r in args.mask_ratios]
    if args.points:
        grid = [(int(m), int(p), float(r)) for m, p, r in (point.split("/") for point in args.points)]
    for model_id, patch, ratio in grid:
        bs = args.small_batch_size if patch <= 2 else args.batch_size
        first = ratio == grid[0][2] or args.points is not None  # generator costs: once per model and patch
        rows.append(
            run_config(f"seed001_model{model_id}", seed001_config(model_id, patch, ratio), bs, args, with_costs=first)
        )
        print_row(rows[-1])
        summarise(rows, args, final=False)  # a stopped run keeps its finished rows
    if not args.no_vit_b16:
        rows.append(
            run_config(
                "vit_b16", MedMAEConfig(norm_pix_loss=True, **VIT_B16), args.small_batch_size, args, with_costs=True
            )
        )
        print_row(rows[-1])
    summarise(rows, args)


def summarise(rows: list[dict], args, final: bool = True) -> None:
    hardware = hardware_description()
    worst = min(r["default_ratio"] for r in rows if r["default_ratio"] is not None)
    same = [r[k] for r in rows for k in ("same_kernel_sdpa", "same_kernel_eager") if r[k] is not None]
    band = max(abs(x - 1) for x in same)
    if final:
        print(
            f"\nhardware: {hardware}; torch {torch.__version__}; {args.precision}; median of {args.repeats} repeats x "
            f">= {args.steps} steps"
        )
        print(
            f"default ours/stock: worst {worst:.3f}, median "
            f"{statistics.median(r['default_ratio'] for r in rows):.3f}; "
            f"same-kernel ratios: median {statistics.median(same):.3f}, all within {100 * band:.1f}% of 1.0"
        )
    result = dict(
        hardware=hardware,
        torch=torch.__version__,
        precision=args.precision,
        steps=args.steps,
        repeats=args.repeats,
        worst_default_ratio=worst,
        median_same_kernel_ratio=statistics.median(same),
        rows=rows,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    if final:
        print(f"wrote {args.output}")


def print_row(row: dict) -> None:
    if not hasattr(print_row, "header"):
        print(
            f"{'config':>15} {'patch':>5} {'mask':>5} {'bs':>3} | {'stock sdpa':>10} {'stock eager':>11} "
            f"{'ours sdpa':>9} {'ours eager':>10} | "
            f"{'same-kernel':>11} {'auto':>5} {'ours/stock':>12} | {'act MB':>7}  generator cost (% of step)"
        )
        print_row.header = True
    costs = " ".join(f"{k}={v:.1f}" for k, v in row.get("generator_cost_pct", {}).items())
    r = {k: "-" if v is None else v for k, v in row.items()}
    print(
        f"{r['config']:>15} {r['patch']:>5} {r['mask_ratio']:>5} {r['batch']:>3} | {r['stock_sdpa']:>10} "
        f"{r['stock_eager']:>11} "
        f"{r['ours_sdpa']:>9} {r['ours_eager']:>10} | {r['same_kernel_sdpa']:>5}/{r['same_kernel_eager']:<5} "
        f"{r['auto_choice']:>5} "
        f"{r['default_ratio']:>6}±{r['default_noise']:<5} | {r['activation_mb']['ours_sdpa']:>7}  {costs}",
        flush=True,
    )


if __name__ == "__main__":
    main()
