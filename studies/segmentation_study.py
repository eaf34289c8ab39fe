#!/usr/bin/env python
"""WBC segmentation study: MAE-initialised UNETR vs the same UNETR from scratch vs a U-Net, dense and sparse labels.

The MAE is pre-trained once with the pre-training task on the WBC Dataset 1 images (masks never shown; optionally
plus 120 px tiles of BCCD smears) and reused by every run. Each (model, labels, seed) run is one
segmentation-task call: the seed sets the train/validation/test split (70/15/15), the sparse pixels
and the initialisation; the model is selected on validation mean Dice and scored on the dense test masks.

    OMP_NUM_THREADS=1 python studies/segmentation_study.py   # 3 seeds x dense/2% x 3 models, ~1.5 h (see below)
    OMP_NUM_THREADS=1 python studies/segmentation_study.py --quick   # tiny smoke run, ~30 s
    python studies/segmentation_study.py --seeds 0 1 2 3 4 --label-fractions 1.0 0.02 0.005

Writes studies/results/segmentation_study[_quick].{csv,json}; checkpoints go to outputs/ (git-ignored).
Cost measured with one thread on the shared 2-core CPU: MAE step (bs 64) 0.65 s -> 2000 steps ~22 min;
UNETR / U-Net step (bs 16, 64 px) ~0.55 s -> 18 runs x 400 steps ~67 min. On a shared 2-core machine use
OMP_NUM_THREADS=1: two contending OpenMP threads made small steps up to 20x slower here.
Note: the MAE sees every WBC image (unlabeled, including the later test images); no mask is ever used.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hf_medmae.tasks import pretrain as pretrain_task
from hf_medmae.tasks import segment as segment_task
from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]

WBC = ROOT.parent / "shared" / "data" / "wbc_zheng2018" / "Dataset 1"
BCCD = ROOT.parent / "shared" / "data" / "bccd" / "BCCD" / "JPEGImages"
CLASSES = ["background", "cytoplasm", "nucleus"]
ARMS = {"mae-unetr": ("unetr", "mae"), "scratch-unetr": ("unetr", "scratch"), "unet": ("unet", "scratch")}

FULL = dict(
    mae=dict(
        image_size=64,
        patch_size=8,
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=768,
        decoder_hidden_size=128,
        decoder_num_hidden_layers=2,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=512,
        mask_ratio=0.5,
        crop_scale=[0.4, 1.0],
        rot90=True,
        max_steps=2000,
        per_device_train_batch_size=64,
        learning_rate=1.5e-3,
        adam_beta2=0.95,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        validation_fraction=0.05,
    ),
    seg=dict(image_size=64, feature_size=16, max_steps=400, eval_steps=50, per_device_train_batch_size=16),
)
QUICK = dict(
    mae=dict(
        FULL["mae"],
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        max_steps=30,
        per_device_train_batch_size=32,
    ),
    seg=dict(
        image_size=32, feature_size=8, max_steps=20, eval_steps=10, per_device_train_batch_size=16, max_images=60
    ),
)


def wbc_image_stack(path: Path, bccd_images: int) -> Path:
    """WBC .bmp images (no masks) plus optional 120 px BCCD tiles as one (N, 3, 120, 120) uint8 .npy for pretrain.

    The folder itself cannot be run_mae's train_data: it holds the masks (.png) beside the images. The
    76 images smaller than 120 px (88-116 px sides) are resized to 120 so they stack.
    """
    images = [
        np.asarray(Image.open(p).convert("RGB").resize((120, 120), Image.BILINEAR)) for p in sorted(WBC.glob("*.bmp"))
    ]
    for p in sorted(BCCD.glob("*.jpg"))[:bccd_images]:
        smear = np.asarray(Image.open(p).convert("RGB"))
        images += [
            smear[t : t + 120, left : left + 120]
            for t in range(0, smear.shape[0] - 119, 120)
            for left in range(0, smear.shape[1] - 119, 120)
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.stack(images).transpose(0, 3, 1, 2))  # [N, H, W, 3] -> [N, 3, H, W]
    return path


def pretrain(mae_dir: Path, settings: dict, bccd_images: int, force: bool) -> float:
    """Pre-train the MAE once (skipped when mae_dir already holds one); returns seconds spent."""
    if (mae_dir / "model.safetensors").is_file() and not force:
        print(f"reusing MAE checkpoint {mae_dir}")
        return 0.0
    stack = wbc_image_stack(mae_dir.parent / "wbc_unlabeled.npy", bccd_images)
    argv = [
        "--train_data",
        str(stack),
        "--output_dir",
        str(mae_dir),
        "--report_to",
        "none",
        "--save_strategy",
        '"no"',
        "--eval_strategy",
        '"no"',
        "--logging_steps",
        "50",
        "--dataloader_num_workers",
        "0",
        "--seed",
        "0",
        "--disable_tqdm",
        "true",
    ]
    for key, value in settings.items():
        argv += [f"--{key}", json.dumps(value)]
    start = time.perf_counter()
    metrics = pretrain_task.main(argv)
    print(f"MAE pre-training: loss {metrics.get('train_loss'):.3f}, {time.perf_counter() - start:.0f} s")
    return time.perf_counter() - start


def segment(arm: str, fraction: float, seed: int, mae_dir: Path, out_root: Path, settings: dict) -> dict:
    """One segmentation-task run; returns a flat result row."""
    model, init = ARMS[arm]
    out = out_root / f"{arm}_labels{fraction:g}_seed{seed}"
    values = dict(
        train_data=str(WBC),
        image_glob="*.bmp",
        class_map={0: 0, 128: 1, 255: 2},
        class_names=CLASSES,
        model=model,
        init=init,
        model_name_or_path=str(mae_dir),
        label_fraction_pixels=fraction,
        seed=seed,
        learning_rate=1e-3,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        layer_decay=0.75 if init == "mae" else 1.0,
        save_steps=settings["eval_steps"],
        save_total_limit=1,
        load_best_model_at_end=True,
        per_device_eval_batch_size=64,
        logging_steps=50,
        report_to="none",
        dataloader_num_workers=0,
        output_dir=str(out),
        **settings,
    )
    argv = ["--eval_strategy", '"steps"', "--save_strategy", '"steps"', "--disable_tqdm", "true"]
    for key, value in values.items():
        argv += [f"--{key}", json.dumps(value)]
    start = time.perf_counter()
    segment_task.main(argv)
    m = json.loads((out / "test_metrics.json").read_text())
    row = dict(
        arm=arm,
        label_fraction=fraction,
        seed=seed,
        seconds=round(time.perf_counter() - start, 1),
        mean_dice=m["mean_dice"],
        pixel_accuracy=m["pixel_accuracy"],
        hd95=m.get("hd95"),
    )
    row.update({f"dice_{c}": m["dice_per_class"][c] for c in CLASSES})
    row.update({f"f1_{c}": m["per_class"][c]["f1-score"] for c in CLASSES})
    return row


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (arm, label fraction)."""
    keys = ["mean_dice"] + [f"f1_{c}" for c in CLASSES]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row["label_fraction"]), []).append(row)
    out = []
    for (arm, fraction), group in groups.items():
        entry = dict(arm=arm, label_fraction=fraction, seeds=len(group))
        for key in keys:
            values = [r[key] for r in group if r[key] is not None]
            entry[key] = statistics.fmean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def markdown(summary: list[dict]) -> str:
    head = (
        "| model | labelled pixels | seeds | mean Dice | F1 background | F1 cytoplasm | F1 nucleus |\n"
        "|---|---|---|---|---|---|---|"
    )
    cell = lambda e, k: f"{e[k]:.3f} ± {e[k + '_std']:.3f}"  # noqa: E731
    lines = [
        f"| {e['arm']} | {e['label_fraction']:.1%} | {e['seeds']} | {cell(e, 'mean_dice')} | "
        + " | ".join(cell(e, f"f1_{c}") for c in CLASSES)
        + " |"
        for e in summary
    ]
    return "\n".join([head, *lines])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    parser.add_argument(
        "--label-fractions",
        type=float,
        nargs="+",
        default=[1.0, 0.02],
        help="share of pixels labelled per training image",
    )
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument(
        "--quick", action="store_true", help="tiny models and few steps: proves the pipeline, not a result"
    )
    parser.add_argument(
        "--bccd-images", type=int, default=0, help="add 120 px tiles of this many BCCD smears to MAE pre-training"
    )
    parser.add_argument(
        "--mae-dir", type=Path, default=None, help="MAE checkpoint to reuse or create (default outputs/wbc_mae)"
    )
    parser.add_argument("--force-pretrain", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="MAE steps (default 2000; quick 30)")
    parser.add_argument("--steps", type=int, default=None, help="segmentation steps per run (default 400; quick 20)")
    args = parser.parse_args()
    if not WBC.is_dir():
        raise SystemExit(f"WBC data not found at {WBC}")
    if args.threads:
        torch.set_num_threads(args.threads)
    settings, tag = (QUICK, "_quick") if args.quick else (FULL, "")
    settings = {"mae": dict(settings["mae"]), "seg": dict(settings["seg"])}
    if args.pretrain_steps:
        settings["mae"]["max_steps"] = args.pretrain_steps
    if args.steps:
        settings["seg"]["max_steps"] = args.steps
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    out_root = ROOT / "outputs" / f"segmentation_study{tag}"
    mae_dir = args.mae_dir or (out_root / "mae" if args.quick else ROOT / "outputs" / "wbc_mae")
    print(f"hardware: {hardware_description()}")
    start = time.perf_counter()
    pretrain_seconds = pretrain(mae_dir, settings["mae"], args.bccd_images, args.force_pretrain)
    rows = []
    for seed in seeds:
        for fraction in args.label_fractions:
            for arm in args.arms:
                rows.append(segment(arm, fraction, seed, mae_dir, out_root, settings["seg"]))
                print(json.dumps(rows[-1]))
    summary = summarise(rows)
    total = time.perf_counter() - start
    results = ROOT / "studies" / "results"
    results.mkdir(parents=True, exist_ok=True)
    with open(results / f"segmentation_study{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = dict(
        hardware=hardware_description(),
        torch=torch.__version__,
        seconds_total=round(total, 1),
        seconds_pretrain=round(pretrain_seconds, 1),
        seeds=seeds,
        settings=settings,
        mae_checkpoint=str(mae_dir),
        bccd_images=args.bccd_images,
        note="the MAE saw all WBC images unlabeled (test images included); no masks",
        summary=summary,
        runs=rows,
    )
    (results / f"segmentation_study{tag}.json").write_text(json.dumps(report, indent=2))
    print(markdown(summary))
    print(f"\n{hardware_description()}; total {total / 60:.1f} min (MAE pre-training {pretrain_seconds / 60:.1f} min)")


if __name__ == "__main__":
    main()
