#!/usr/bin/env python
"""Pre-training step throughput: MedMAEForPreTraining vs stock ViTMAEForPreTraining, same config and weights.

Each repeat times `--steps` AdamW training steps of stock, then of ours, alternating so that machine
noise hits both alike; the table reports the median img/s over repeats, the ratio ours/stock, each
mask generator's own cost as a share of a training step, and eager vs sdpa attention.

    python benchmarks/pretrain_throughput.py                 # seed 001 Model 1, 16 ch, 64 px, patch 8 and 4
    python benchmarks/pretrain_throughput.py --patches 2 4 8 --mask-ratios 0.5 0.75 0.9 --models 1 2
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import ViTMAEForPreTraining

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_medmae import MASK_GENERATORS, MedMAEConfig, MedMAEForPreTraining  # noqa: E402

MODELS = {  # seed 001, tables 2 and 3
    1: dict(hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
            decoder_hidden_size=192, decoder_intermediate_size=768, decoder_num_hidden_layers=6, decoder_num_attention_heads=6),
    2: dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            decoder_hidden_size=128, decoder_intermediate_size=256, decoder_num_hidden_layers=2, decoder_num_attention_heads=2),
}


def make_pair(model_id: int, patch: int, ratio: float, attn: str, generator: str = "random"):
    config = MedMAEConfig(num_channels=16, image_size=64, patch_size=patch, mask_ratio=ratio, norm_pix_loss=True,
                          layer_norm_eps=1e-6, mask_generator=generator, **MODELS[model_id])
    ours = MedMAEForPreTraining._from_config(config, attn_implementation=attn)
    stock = ViTMAEForPreTraining._from_config(config, attn_implementation=attn)
    stock.load_state_dict(ours.state_dict())
    return ours.train(), stock.train()


def time_steps(model, optimizer, batch: torch.Tensor, steps: int) -> float:
    """Images per second over `steps` full training steps (forward, backward, AdamW)."""
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if batch.is_cuda:
        torch.cuda.synchronize()
    return steps * batch.shape[0] / (time.perf_counter() - start)


def compare(ours, stock, batch, steps: int, repeats: int) -> tuple[float, float]:
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95)) for m in (ours, stock)]
    for model, opt in zip((ours, stock), opts):  # warm-up: allocator, kernels, lazy init
        time_steps(model, opt, batch, 2)
    rates = {"ours": [], "stock": []}
    for _ in range(repeats):
        rates["stock"].append(time_steps(stock, opts[1], batch, steps))
        rates["ours"].append(time_steps(ours, opts[0], batch, steps))
    return statistics.median(rates["ours"]), statistics.median(rates["stock"])


def generator_cost(model, batch: torch.Tensor, repeats: int = 20) -> float:
    """Seconds the mask generator takes for one batch (median), measured on its own."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate_codes(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, nargs="+", default=[1])
    parser.add_argument("--patches", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--mask-ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--attn", nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default="benchmarks/results/pretrain_throughput.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    rows = []
    for model_id in args.models:
        for patch in args.patches:
            for ratio in args.mask_ratios:
                batch = torch.randn(args.batch_size, 16, 64, 64, device=device)
                for attn in args.attn:
                    ours, stock = (m.to(device) for m in make_pair(model_id, patch, ratio, attn))
                    ours_rate, stock_rate = compare(ours, stock, batch, args.steps, args.repeats)
                    step_s = args.batch_size / ours_rate
                    costs = {}
                    for name in sorted(MASK_GENERATORS):
                        gen_model = make_pair(model_id, patch, ratio, attn, name)[0].to(device)
                        costs[name] = 100 * generator_cost(gen_model, batch) / step_s
                    rows.append(dict(model=model_id, patch=patch, mask_ratio=ratio, attn=attn, stock_img_s=round(stock_rate, 1),
                                     ours_img_s=round(ours_rate, 1), ratio=round(ours_rate / stock_rate, 3),
                                     generator_cost_pct={k: round(v, 2) for k, v in costs.items()}))
                    print_row(rows[-1])
    hardware = torch.cuda.get_device_name(0) if device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    result = dict(hardware=hardware, torch=torch.__version__, batch_size=args.batch_size, steps=args.steps, repeats=args.repeats,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rows=rows)
    print(f"\nhardware: {hardware}; batch {args.batch_size}; median of {args.repeats} repeats x {args.steps} steps; "
          f"process peak RSS {result['peak_rss_mb']:.0f} MB")
    for patch in args.patches:
        best = {r["attn"]: r["ours_img_s"] for r in rows if r["patch"] == patch}
        print(f"patch {patch}: faster attention on this machine = {max(best, key=best.get)} ({best})")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


def print_row(row: dict) -> None:
    if not hasattr(print_row, "header"):
        print(f"{'model':>5} {'patch':>5} {'mask':>5} {'attn':>6} {'stock img/s':>11} {'ours img/s':>10} {'ours/stock':>10}  generator cost (% of a step)")
        print_row.header = True
    costs = " ".join(f"{k}={v:.1f}" for k, v in row["generator_cost_pct"].items())
    print(f"{row['model']:>5} {row['patch']:>5} {row['mask_ratio']:>5} {row['attn']:>6} {row['stock_img_s']:>11} {row['ours_img_s']:>10} {row['ratio']:>10}  {costs}")


if __name__ == "__main__":
    main()
