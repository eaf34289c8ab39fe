#!/usr/bin/env python
"""Label efficiency on WBC (seed 000's study): fraction of labels x {scratch, mae} x seeds.

One MAE is pre-trained once (run_mae.py's `main`) on unlabeled images and reused; every cell then
fine-tunes through run_classification.py's `main` with the same ViT either from that MAE (init mae)
or randomly initialised (init scratch): the two differ by one flag. Each seed draws its own
stratified split and label subset; checkpoints are selected on validation, scores are on test.

    python benchmarks/label_efficiency.py --quick                # smoke run, a few minutes on 2 CPU cores
    python benchmarks/label_efficiency.py                        # the study (see --help for the sizes)

Macro precision / recall / F1 are over the classes present in the test split: WBC's single basophil
stays in train (too rare to stratify), and a class with no test example would cap macro-F1 at 0.8.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

from hf_medmae.tasks import classify as classify_task  # noqa: E402
from hf_medmae.tasks import pretrain as pretrain_task  # noqa: E402
from hf_medmae.data.io import read_image  # noqa: E402
from hf_medmae.data.pretraining import tile_image  # noqa: E402
from hf_medmae.data.transforms import resize  # noqa: E402
from hf_medmae.plots import plot_label_efficiency  # noqa: E402
from hf_medmae.training import hardware_description  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
WBC = DATA / "wbc_zheng2018" / "Dataset 1"
BCCD = DATA / "bccd" / "BCCD" / "JPEGImages"
METRICS = ("accuracy", "macro_precision_present", "macro_recall_present", "macro_f1_present")
HEADERS = ("accuracy", "precision", "recall", "F1")

FULL = dict(image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=6, num_attention_heads=6, intermediate_size=768,
            decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4, decoder_intermediate_size=512,
            mask_ratio=0.5, pretrain_batch=64, finetune_steps=300, finetune_batch=32)  # fmt: skip
QUICK = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=2, decoder_intermediate_size=64,
             mask_ratio=0.5, pretrain_batch=64, finetune_steps=20, finetune_batch=32)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 0.5, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-steps", type=int, default=2000, help="MAE pre-training steps (ignored with --mae-checkpoint)")
    p.add_argument("--pretrain-data", choices=["bccd", "wbc", "both"], default="both",
                   help="unlabeled pool: BCCD smear tiles (disjoint from WBC), all WBC images (self pre-training; sees the "
                        "test pixels without labels), or both")  # fmt: skip
    p.add_argument("--mae-checkpoint", default=None, help="reuse this MAE instead of pre-training one")
    p.add_argument("--finetune-steps", type=int, default=None, help="steps per fine-tuning run (default 300; quick 20)")
    p.add_argument("--mode", default="full", help="full | linear_probe | last_k:<k>")
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "label_efficiency"))
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny sizes, 100 pre-training steps, fractions 0.1 1.0, seeds 0 1")
    args = p.parse_args(argv)
    args.sizes = dict(QUICK if args.quick else FULL)
    if args.quick:
        args.fractions, args.seeds = [0.1, 1.0], [0, 1]
        args.pretrain_steps, args.pretrain_data = 100, "wbc"
    args.sizes["finetune_steps"] = args.finetune_steps or args.sizes["finetune_steps"]
    return args


def unlabeled_pool(which: str, side: int, out: Path) -> Path:
    """WBC images and/or 160-px BCCD tiles, resized to side x side, as one (N, 3, side, side) .npy for pretrain."""
    images = []
    if which in ("wbc", "both"):
        images += [read_image(p) for p in sorted(WBC.glob("*.bmp"))]  # the .png beside them are masks
    if which in ("bccd", "both"):
        images += [t for p in sorted(BCCD.glob("*.jpg")) for t in tile_image(read_image(p), 160)]
    if not images:
        raise SystemExit(f"no unlabeled images found under {DATA}")
    stack = np.stack([resize(torch.from_numpy(np.ascontiguousarray(im)), side).numpy() for im in images])  # [N, 3, side, side]
    np.save(out, stack.astype(np.float32))
    return out


def pretrain(args: argparse.Namespace, work: Path) -> tuple[str, float]:
    """Pre-train the MAE once; returns (checkpoint, seconds)."""
    if args.mae_checkpoint:
        return args.mae_checkpoint, 0.0
    start, s = time.time(), args.sizes
    pool = unlabeled_pool(args.pretrain_data, int(s["image_size"] * 1.5), work / "unlabeled.npy")
    keys = ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "decoder_hidden_size", "decoder_num_hidden_layers", "decoder_num_attention_heads", "decoder_intermediate_size", "mask_ratio")  # fmt: skip
    argv = [f"--{k}={s[k]}" for k in keys] + [
        "--train_data", str(pool), "--validation_fraction", "0.02", "--output_dir", str(work / "mae"),
        "--max_steps", str(args.pretrain_steps), "--per_device_train_batch_size", str(s["pretrain_batch"]),
        "--learning_rate", "1.5e-3", "--warmup_steps", "0.05", "--lr_scheduler_type", "cosine", "--weight_decay", "0.05",
        "--adam_beta2", "0.95", "--save_strategy", '"no"', "--eval_strategy", '"no"', "--rot90", "true",
        "--crop_scale", "[0.4, 1.0]", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "100",
        "--dataloader_num_workers", "0", "--seed", "0",
    ]  # fmt: skip
    pretrain_task.main(argv)
    return str(work / "mae"), time.time() - start


def finetune(args: argparse.Namespace, mae: str, init: str, fraction: float, seed: int, work: Path) -> dict:
    """One cell: the classification task on the WBC config; returns the test metrics."""
    s = args.sizes
    every = max(1, s["finetune_steps"] // 10)
    argv = [
        "--config", str(ROOT / "configs" / "wbc_classification.yaml"), "--data_dir", str(WBC),
        "--labels_csv", str(WBC.parent / "Class Labels of Dataset 1.csv"), "--init", init, "--model_name_or_path", mae,
        "--image_size", str(s["image_size"]), "--mode", args.mode, "--train_fraction", str(fraction),
        "--seed", str(seed), "--split_seed", str(seed), "--output_dir", str(work / f"{init}_f{fraction}_s{seed}"),
        "--max_steps", str(s["finetune_steps"]), "--per_device_train_batch_size", str(s["finetune_batch"]),
        "--eval_strategy", "steps", "--save_strategy", "steps", "--eval_steps", str(every), "--save_steps", str(every),
        "--save_total_limit", "1", "--logging_steps", str(every), "--disable_tqdm", "true",
    ]  # fmt: skip
    metrics = classify_task.main(argv)
    return {"init": init, "fraction": fraction, "seed": seed, **{m: metrics[f"test_{m}"] for m in METRICS}}


def summarise(rows: list[dict], fractions: list[float]) -> list[dict]:
    """Mean and std over seeds per (fraction, init), and the MAE gain (difference of the means)."""
    table = []
    for fraction in fractions:
        line = {"fraction": fraction}
        for metric in METRICS:
            for init in ("scratch", "mae"):
                values = [r[metric] for r in rows if r["init"] == init and r["fraction"] == fraction]
                line[f"{init}_{metric}_mean"], line[f"{init}_{metric}_std"] = float(np.mean(values)), float(np.std(values))
            line[f"gain_{metric}"] = line[f"mae_{metric}_mean"] - line[f"scratch_{metric}_mean"]
        table.append(line)
    return table


def format_table(table: list[dict]) -> str:
    """Markdown shaped like seed 000's: per metric From Scratch | w/ MAE | MAE Gains, one row per fraction."""
    head = "| WBC labels | " + " | ".join(f"{h} scratch | {h} MAE | {h} gain" for h in HEADERS) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(HEADERS))]
    for line in table:
        cells = []
        for m in METRICS:
            cells += [f"{line[f'scratch_{m}_mean']:.3f} ± {line[f'scratch_{m}_std']:.3f}",
                      f"{line[f'mae_{m}_mean']:.3f} ± {line[f'mae_{m}_std']:.3f}", f"{100 * line[f'gain_{m}']:+.2f}%"]  # fmt: skip
        lines.append(f"| {line['fraction']:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(args, rows: list[dict], table: list[dict], info: dict) -> Path:
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "label_efficiency_quick" if args.quick else "label_efficiency"
    with open(out / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{stem}.json").write_text(json.dumps({**info, "runs": rows, "summary": table}, indent=2))
    plot_rows = [{"init": r["init"], "fraction": r["fraction"], "macro_f1": r["macro_f1_present"]} for r in rows]
    plot_label_efficiency(plot_rows, out / f"{stem}.png", metric="macro_f1")
    return out / stem


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not WBC.is_dir():
        raise SystemExit(f"WBC data not found at {WBC}")
    start, work = time.time(), Path(args.work_dir + ("_quick" if args.quick else ""))
    work.mkdir(parents=True, exist_ok=True)
    mae, pretrain_seconds = pretrain(args, work)
    rows = [finetune(args, mae, init, fraction, seed, work)
            for fraction in args.fractions for seed in args.seeds for init in ("scratch", "mae")]  # fmt: skip
    table = summarise(rows, args.fractions)
    info = {"hardware": hardware_description(), "wall_seconds": round(time.time() - start, 1),
            "pretrain_seconds": round(pretrain_seconds, 1), "mae_checkpoint": mae, "pretrain_steps": args.pretrain_steps,
            "pretrain_data": args.pretrain_data, "mode": args.mode, "sizes": args.sizes, "seeds": args.seeds}  # fmt: skip
    stem = write_results(args, rows, table, info)
    print(format_table(table))
    print(f"\nmean ± std over seeds {args.seeds}; macro scores over the classes present in each test split.")
    print(f"hardware: {info['hardware']}; wall time {info['wall_seconds'] / 60:.1f} min "
          f"(pre-training {pretrain_seconds / 60:.1f} min); results: {stem}.csv/.json/.png")  # fmt: skip
    return info


if __name__ == "__main__":
    main()
