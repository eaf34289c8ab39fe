#!/usr/bin/env python
"""Fine-tuning and inference throughput of the transfer models: ViT classifier, UNETR and the U-Net baseline.

All ViT encoders are seed 001 Model 1 (192-d, 6 layers, 6 heads, MLP 768) at 64 px, randomly initialised
(weights do not change the speed). Settings follow the configs: `cls_wbc` = wbc_classification.yaml (3 ch,
patch 8 as in the WBC MAE of benchmarks/, 5 classes, mean pooling, drop path 0.1, label smoothing 0.1);
`cls_16ch` = the same on 16 ch, patch 4; `unetr_wbc` / `unet_wbc` = wbc_segmentation.yaml (3 ch, patch 8,
feature_size 16, CE, 3 classes; BasicUNet with its default features); `unetr_16ch` = nuclei_segmentation.yaml
(16 ch, patch 4, feature_size 16, 2 classes). Modes: `train` (forward + loss + backward + AdamW step),
`linear_probe` (classifiers only: `freeze(model, "linear_probe")`, no drop path, as run_classification.py
does) and `infer` (eval, inference_mode, forward only). Each row is the median img/s of `--repeats` blocks
of `--steps` steps after 2 warm-up steps. Peak memory: `torch.cuda.max_memory_allocated` per row on CUDA;
on CPU only the process's peak RSS at the end (the maximum over all rows).

    python benchmarks/transfer_throughput.py
    python benchmarks/transfer_throughput.py --models cls_wbc unetr_wbc --batch-size 16 --attn eager
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from transformers import ViTConfig, ViTModel

from hf_medmae.classification import MedClsForImageClassification, freeze
from hf_medmae.segmentation import MedSegForSegmentation, build_unet_baseline
from hf_medmae.training import hardware_description

IMAGE_SIZE = 64
ENCODER = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=6, intermediate_size=768, layer_norm_eps=1e-6)
MODELS = {  # kind, channels, patch, classes
    "cls_wbc": ("cls", 3, 8, 5),
    "cls_16ch": ("cls", 16, 4, 5),
    "unetr_wbc": ("unetr", 3, 8, 3),
    "unet_wbc": ("unet", 3, None, 3),
    "unetr_16ch": ("unetr", 16, 4, 2),
}


def build(name: str, mode: str, attn: str) -> torch.nn.Module:
    """The model `name` set up for `mode` (train | linear_probe | infer), encoder attention `attn`."""
    kind, channels, patch, classes = MODELS[name]
    if kind == "unet":
        return build_unet_baseline(channels, classes)
    vit_config = ViTConfig(image_size=IMAGE_SIZE, patch_size=patch, num_channels=channels, **ENCODER)
    encoder = ViTModel(vit_config, add_pooling_layer=False)
    if kind == "unetr":
        model = MedSegForSegmentation.from_encoder(encoder, classes, feature_size=16, loss="ce")
    else:
        drop_path = 0.0 if mode == "linear_probe" else 0.1  # run_classification.py: a frozen encoder gets none
        model = MedClsForImageClassification.from_encoder(
            encoder, classes, pooling="mean", drop_path_rate=drop_path, label_smoothing=0.1
        )
        freeze(model, "linear_probe" if mode == "linear_probe" else "full")
    # Set on the encoder itself: the segmenter's own config does not pass it down to `vit`.
    model.vit.set_attn_implementation(attn)
    return model


def make_batch(name: str, batch_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images [B, C, H, W] and labels: [B] class ids (classifiers) or [B, H, W] class maps."""
    kind, channels, _, classes = MODELS[name]
    pixels = torch.randn(batch_size, channels, IMAGE_SIZE, IMAGE_SIZE, device=device)
    shape = (batch_size,) if kind == "cls" else (batch_size, IMAGE_SIZE, IMAGE_SIZE)
    return pixels, torch.randint(0, classes, shape, device=device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_steps(model, optimizer, pixels, labels, steps: int) -> float:
    """Images per second over `steps` training steps (forward, loss, backward, AdamW)."""
    _sync(pixels.device.type)
    start = time.perf_counter()
    for _ in range(steps):
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(pixels.device.type)
    return steps * pixels.shape[0] / (time.perf_counter() - start)


def infer_steps(model, pixels, steps: int) -> float:
    """Images per second over `steps` forward passes under inference_mode."""
    _sync(pixels.device.type)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(steps):
            model(pixel_values=pixels)
    _sync(pixels.device.type)
    return steps * pixels.shape[0] / (time.perf_counter() - start)


def measure(name: str, mode: str, args, device: str) -> dict:
    """One table row: median img/s over the repeats after 2 warm-up steps, and CUDA peak memory."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(name, mode, args.attn).to(device)
    pixels, labels = make_batch(name, args.batch_size, device)
    if mode == "infer":
        model.eval()
        run = lambda steps: infer_steps(model, pixels, steps)  # noqa: E731
    else:
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]  # as Trainer builds its optimizer
        optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)
        run = lambda steps: train_steps(model, optimizer, pixels, labels, steps)  # noqa: E731
    run(2)  # warm-up: allocator, kernels, AdamW state
    rate = statistics.median(run(args.steps) for _ in range(args.repeats))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(
        model=name,
        mode=mode,
        batch=args.batch_size,
        img_s=round(rate, 1),
        trainable_params=trainable,
        peak_mem_mb=None if peak is None else round(peak, 1),
    )


def print_row(row: dict) -> None:
    mem = "-" if row["peak_mem_mb"] is None else f"{row['peak_mem_mb']:.0f} MB"
    print(f"{row['model']:>11} {row['mode']:>12} {row['batch']:>5} {row['img_s']:>9} {mem:>10}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--output", default="benchmarks/results/transfer_throughput.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    print(f"{'model':>11} {'mode':>12} {'batch':>5} {'img/s':>9} {'peak mem':>10}")
    rows = []
    for name in args.models:
        modes = ("train", "linear_probe", "infer") if MODELS[name][0] == "cls" else ("train", "infer")
        for mode in modes:
            rows.append(measure(name, mode, args, device))
            print_row(rows[-1])
    hardware = hardware_description()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    result = dict(
        hardware=hardware,
        device=device,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        attn=args.attn,
        image_size=IMAGE_SIZE,
        steps=args.steps,
        repeats=args.repeats,
        peak_rss_mb=round(peak_rss, 1),
        rows=rows,
    )
    memory = (
        "peak memory per row is torch.cuda.max_memory_allocated"
        if device == "cuda"
        else f"CPU: no per-row memory; process peak RSS over all rows {peak_rss:.0f} MB"
    )
    print(
        f"\nhardware: {hardware}, torch {torch.__version__}, attn {args.attn}; "
        f"median of {args.repeats} repeats x {args.steps} steps; {memory}"
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
