#!/usr/bin/env python
"""MAE pre-training step throughput of MedMAEForPreTraining on a GPU: img/s and MFU against measured peaks.

Rows are config x variant: `fp32` (TF32 off, eager attention), `tf32` (TF32 matmul/conv, eager),
`bf16` (autocast bf16 + sdpa + TF32), `bf16_compile` (the same under `torch.compile(model)`); every
row trains with fused AdamW on a random on-device batch and random masking. FLOPs per image come from
`torch.utils.flop_counter.FlopCounterMode` over one fp32 forward+backward (eager attention, so the
attention matmuls are counted; the optimizer is not). MFU = achieved FLOP/s / the *measured* dense
matmul peak (median of 8192^2 matmuls): bf16 for every row, plus the row's own precision (fp32 / TF32).

    python benchmarks/gpu_pretrain.py                                  # on a CUDA GPU, all rows
    python benchmarks/gpu_pretrain.py --configs vit_b16 --variants bf16 bf16_compile
    OMP_NUM_THREADS=1 python benchmarks/gpu_pretrain.py --smoke --output /tmp/gpu_smoke.json   # anywhere

`--masking noise` (default) passes `noise=torch.rand(B, L)`, which is exactly uniform random masking and
free of host syncs; `--masking generator` times the library path (the `random` mask generator), which is
also sync-free unless `throw_ratio` > 0. On out-of-memory a row halves its batch and
retries (the batch used is recorded). The JSON is rewritten after every row, so a killed run keeps its rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from hf_medmae import MedMAEConfig, MedMAEForPreTraining
from hf_medmae.training import hardware_description

SEED001_MODEL1 = dict(  # symmetric 192-d, 6 + 6 layers (configs/seed001_model1_p8.yaml)
    hidden_size=192,
    intermediate_size=768,
    num_hidden_layers=6,
    num_attention_heads=6,
    decoder_hidden_size=192,
    decoder_intermediate_size=768,
    decoder_num_hidden_layers=6,
    decoder_num_attention_heads=6,
)

VIT_B16 = dict(
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    decoder_hidden_size=512,
    decoder_num_hidden_layers=8,
    decoder_num_attention_heads=16,
    decoder_intermediate_size=2048,
    mask_ratio=0.75,
)
MODEL1 = dict(num_channels=16, image_size=64, mask_ratio=0.5, **SEED001_MODEL1)
CONFIGS = {
    "vit_b16": (VIT_B16, 256),
    "model1_p8": (dict(MODEL1, patch_size=8), 512),
    "model1_p4": (dict(MODEL1, patch_size=4), 512),
}
# vit_b16's 3 ch / patch 16 / mask 0.75 at 64 px, Model-1 width
SMOKE_VIT = dict(VIT_B16, image_size=64, **SEED001_MODEL1)
VARIANTS = {  # name: (attention, tf32, bf16 autocast, torch.compile, peak it is measured against)
    "fp32": ("eager", False, False, False, "fp32"),
    "tf32": ("eager", True, False, False, "tf32"),
    "bf16": ("sdpa", True, True, False, "bf16"),
    "bf16_compile": ("sdpa", True, True, True, "bf16"),
}


def set_tf32(on: bool, device: torch.device) -> None:
    """TF32 for cuBLAS matmuls and cuDNN convs (patch embedding). No-op on CPU, where fp32 stays fp32."""
    if device.type == "cuda":  # legacy API only: mixing it with `fp32_precision` raises in torch >= 2.9
        torch.set_float32_matmul_precision("high" if on else "highest")
        torch.backends.cudnn.allow_tf32 = on


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, tf32: bool, device: torch.device, n: int, repeats: int) -> float:
    """Median TFLOP/s of dense n x n @ n x n matmuls in `dtype` (blocks of back-to-back matmuls)."""
    set_tf32(tf32, device)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    out, per_block = torch.empty_like(a), 50 if device.type == "cuda" else 2
    for _ in range(per_block):  # warm-up: cuBLAS heuristics, GPU clocks
        torch.mm(a, b, out=out)
    rates = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(per_block):
            torch.mm(a, b, out=out)
        sync(device)
        rates.append(2 * n**3 * per_block / (time.perf_counter() - start) / 1e12)
    return statistics.median(rates)


def build(spec: dict, attn: str, device: torch.device) -> MedMAEForPreTraining:
    config = MedMAEConfig(norm_pix_loss=True, layer_norm_eps=1e-6, mask_generator="random", **spec)
    return MedMAEForPreTraining._from_config(config, attn_implementation=attn).to(device).train()


def make_step(model, forward, batch: torch.Tensor, amp: bool, use_noise: bool):
    """One training step (forward, backward, fused AdamW) with no host sync in our code."""
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    num_patches = model.config.num_patches

    def step() -> None:
        kwargs = {"noise": torch.rand(batch.shape[0], num_patches, device=batch.device)} if use_noise else {}
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = forward(batch, **kwargs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def random_batch(spec: dict, size: int, device: torch.device) -> torch.Tensor:
    return torch.randn(size, spec["num_channels"], spec["image_size"], spec["image_size"], device=device)


def flops_per_image(spec: dict, size: int, device: torch.device) -> float:
    """fwd+bwd FLOPs of one image (fp32, eager attention so attention matmuls are counted as bmm)."""
    set_tf32(True, device)  # speed only: precision does not change the count
    model = build(spec, "eager", device)
    batch = random_batch(spec, size, device)
    with FlopCounterMode(display=False) as counter:
        model(batch, noise=torch.rand(size, model.config.num_patches, device=device)).loss.backward()
    return counter.get_total_flops() / size


def time_row(spec: dict, variant: str, size: int, args, device: torch.device) -> dict:
    attn, tf32, amp, compiled, _ = VARIANTS[variant]
    set_tf32(tf32, device)
    torch._dynamo.reset()  # drops earlier compiled models (and their weights); avoids the recompile limit
    gc.collect()
    model = build(spec, attn, device)
    step = make_step(
        model,
        torch.compile(model) if compiled else model,
        random_batch(spec, size, device),
        amp,
        args.masking == "noise",
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(max(args.warmup, 10) if compiled else args.warmup):  # compile happens in the first calls
        step()
    sync(device)
    warmup_s, rates = time.perf_counter() - start, []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        rates.append(args.steps * size / (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return dict(img_s=statistics.median(rates), img_s_all=rates, warmup_s=warmup_s, peak_gib=peak)


def is_oom(err: BaseException) -> bool:  # torch.compile wraps OOMs in its own exception types
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def with_oom_retry(fn, size: int, what: str):
    """Run fn(size); on out-of-memory halve size and retry. Returns (size used, result)."""
    while True:
        try:
            return size, fn(size)
        except Exception as err:  # noqa: BLE001 - filtered just below
            if not is_oom(err) or size == 1:
                raise
        gc.collect()  # outside `except`: the traceback (and its tensors) is released by now
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(f"  {what}: out of memory at batch {size}, retrying with {size // 2}", flush=True)
        size //= 2


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return hardware_description()


HEADER = (
    f"{'config':<10} {'variant':<13} {'batch':>5} {'img/s':>9} {'TFLOP/s':>8} {'MFU %':>6} {'vs':>4} "
    f"{'MFU bf16 %':>10} {'peak GiB':>8}"
)


def format_row(r: dict) -> str:
    gib = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
    return (
        f"{r['config']:<10} {r['variant']:<13} {r['batch']:>5} {r['img_s']:>9.1f} {r['tflop_s']:>8.2f} "
        f"{r['mfu_pct']:>6.1f} {r['peak']:>4} {r['mfu_bf16_pct']:>10.1f} {gib:>8}"
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--batch-size", type=int, help="overrides every config's default batch (vit_b16 256, model1 512)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps per row (at least 10 for bf16_compile)")
    p.add_argument("--masking", choices=["noise", "generator"], default="noise")
    p.add_argument("--matmul-size", type=int, help="n of the peak matmuls (default 8192 on CUDA, 1024 elsewhere)")
    p.add_argument("--smoke", action="store_true", help="tiny end-to-end check: batch 4, 2 steps, 1 repeat, small vit")
    p.add_argument(
        "--compile-on-cpu", action="store_true", help="also run bf16_compile without CUDA (needs a C++ compiler)"
    )
    p.add_argument("--output", default="benchmarks/results/gpu_pretrain.json")
    args = p.parse_args()
    if args.smoke:
        args.batch_size, args.steps, args.repeats, args.warmup = args.batch_size or 4, 2, 1, 1
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = [v for v in args.variants if device.type == "cuda" or v != "bf16_compile" or args.compile_on_cpu]
    torch.manual_seed(0)
    n = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    peak_repeats = 1 if args.smoke else 5
    peaks = {
        name: matmul_peak(dtype, tf32, device, n, peak_repeats)
        for name, dtype, tf32 in [
            ("bf16", torch.bfloat16, True),
            ("tf32", torch.float32, True),
            ("fp32", torch.float32, False),
        ]
    }
    print(
        f"{hardware(device)}; torch {torch.__version__}; measured {n}^2 matmul peaks (TFLOP/s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items()),
        flush=True,
    )
    result = dict(
        hardware=hardware(device),
        device=device.type,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        transformers=transformers.__version__,
        smoke=args.smoke,
        steps=args.steps,
        repeats=args.repeats,
        warmup=args.warmup,
        masking=args.masking,
        matmul_size=n,
        peaks_tflop_s=peaks,
        gflop_per_image={},
        rows=[],
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    for name in args.configs:
        spec, default_batch = CONFIGS[name]
        spec = SMOKE_VIT if args.smoke and name == "vit_b16" else spec
        requested = args.batch_size or default_batch
        flops = with_oom_retry(lambda s, spec=spec: flops_per_image(spec, s, device), requested, f"{name} flop count")[
            1
        ]
        result["gflop_per_image"][name] = flops / 1e9
        for variant in variants:
            size, timed = with_oom_retry(
                lambda s, spec=spec, variant=variant: time_row(spec, variant, s, args, device),
                requested,
                f"{name} {variant}",
            )
            peak_name = VARIANTS[variant][4]
            flop_s = timed["img_s"] * flops
            row = dict(
                config=name,
                variant=variant,
                attn=VARIANTS[variant][0],
                batch=size,
                requested_batch=requested,
                tflop_s=flop_s / 1e12,
                peak=peak_name,
                mfu_pct=100 * flop_s / 1e12 / peaks[peak_name],
                mfu_bf16_pct=100 * flop_s / 1e12 / peaks["bf16"],
                **timed,
            )
            result["rows"].append(row)
            print(format_row(row), flush=True)
            out.write_text(json.dumps(result, indent=2))
    out.write_text(json.dumps(result, indent=2))
    print("GFLOP/image (fwd+bwd): " + ", ".join(f"{k} {v:.2f}" for k, v in result["gflop_per_image"].items()))
    print(f"median of {args.repeats} x {args.steps} steps after {args.warmup} warm-up steps; wrote {out}")


if __name__ == "__main__":
    main()
