#!/usr/bin/env python
"""Which MAE pre-training recipe gives WBC features a task can use? A frozen-feature probe per recipe.

The cheap signal of the label-efficiency study (issue: "a pre-training recipe that pays"): each recipe
pre-trains one MAE with `run_mae.py`'s task on unlabeled cells, then its frozen, mean-pooled patch
tokens go through `frozen_probe.py`'s protocol (logistic regression on 5 stratified 70/30 splits of
WBC Dataset 1, and on a stratified 10% of each training part; macro-F1 over the classes present).
Every recipe changes one lever of the `base` recipe; the `random` row is the same ViT untrained.

Caveat, by design: to rank recipes cheaply, every MAE here sees all 299 WBC images without labels,
also those of the probe's test parts (transductive). The label-efficiency study itself pre-trains
on each seed's training images only.

Results are written after each recipe and recipes already in the JSON are skipped, so the search can
be run in parts:

    python studies/mae_recipe.py                                  # every recipe, ~5 min each on 1 CPU thread
    python studies/mae_recipe.py --recipes base norm_pix mask50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from frozen_probe import features, probe, wbc
from transformers import ViTModel

from hf_medmae import load_encoder
from hf_medmae.data.boxes import square_crop, voc_boxes
from hf_medmae.data.io import read_image
from hf_medmae.data.transforms import resize
from hf_medmae.evaluation.results import record
from hf_medmae.tasks import pretrain as pretrain_task
from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT.parent / "shared" / "data" / "bccd" / "BCCD"

BASE = dict(
    image_size=64,
    patch_size=8,
    mask_ratio=0.75,
    norm_pix_loss=False,
    mask_generator="random",
    steps=800,
    learning_rate=1.5e-3,
    pool="wbc",
)
RECIPES = {
    "base": {},
    "norm_pix": {"norm_pix_loss": True},
    "mask50": {"mask_ratio": 0.5},
    "mask90": {"mask_ratio": 0.9},
    "foreground": {"mask_generator": "foreground"},
    "patch4": {"patch_size": 4},
    "lr5e-4": {"learning_rate": 5e-4},
    "steps3200": {"steps": 3200},
    "pool_bccd": {"pool": "wbc+bccd"},
    "size96": {"image_size": 96},
    # the two single levers that helped at both fractions, together
    "norm_pix_foreground": {"norm_pix_loss": True, "mask_generator": "foreground"},
    # levers on top of the best single one (foreground): longer (the small-data literature's hundreds of epochs),
    # sparser
    "foreground_steps3200": {"mask_generator": "foreground", "steps": 3200},
    "foreground_mask90": {"mask_generator": "foreground", "mask_ratio": 0.9},
    # the same recipe, another pre-training seed: how far apart two runs of one recipe land (the ranking's noise floor)
    "foreground_seed1": {"mask_generator": "foreground", "seed": 1},
    "steps3200_seed1": {"steps": 3200, "seed": 1},
    # pre-training length: 800 / 3200 / 6400 / 12800 steps x 64 on 299 images are ~170 / 690 / 1370 / 2740 epochs
    "steps6400": {"steps": 6400},
    "steps12800": {"steps": 12800},
}


def bccd_cells(side: int) -> list[np.ndarray]:
    """Every box labelled WBC in the BCCD smears (another lab, another stain), squared with a margin: [3, side, side]
    each."""
    cells = []
    for xml in sorted((BCCD / "Annotations").glob("*.xml")):
        boxes = voc_boxes(xml, ("WBC",))
        image = read_image(BCCD / "JPEGImages" / f"{xml.stem}.jpg") if boxes else None
        for _, box in boxes:
            crop = square_crop(image, box, margin=1.2, min_side=32)  # the cell with some surrounding, as WBC's
            if crop is not None:
                cells.append(resize(torch.from_numpy(np.ascontiguousarray(crop)).float(), side).numpy())
    return cells


def pretrain(recipe: dict, pool: np.ndarray, out: Path) -> float:
    """One MAE with the pre-training task; returns its final training loss."""
    np.save(out.parent / f"{out.name}_pool.npy", pool)
    pretrain_task.main(
        [
            "--train_data",
            str(out.parent / f"{out.name}_pool.npy"),
            "--validation_fraction",
            "0.05",
            "--output_dir",
            str(out),
            "--image_size",
            str(recipe["image_size"]),
            "--patch_size",
            str(recipe["patch_size"]),
            "--hidden_size",
            "192",
            "--num_hidden_layers",
            "6",
            "--num_attention_heads",
            "6",
            "--intermediate_size",
            "768",
            "--decoder_hidden_size",
            "128",
            "--decoder_num_hidden_layers",
            "2",
            "--decoder_num_attention_heads",
            "4",
            "--decoder_intermediate_size",
            "512",
            "--mask_ratio",
            str(recipe["mask_ratio"]),
            "--mask_generator",
            recipe["mask_generator"],
            "--norm_pix_loss",
            str(recipe["norm_pix_loss"]).lower(),
            "--max_steps",
            str(recipe["steps"]),
            "--per_device_train_batch_size",
            "64",
            "--learning_rate",
            str(recipe["learning_rate"]),
            "--warmup_steps",
            "0.05",
            "--lr_scheduler_type",
            "cosine",
            "--weight_decay",
            "0.05",
            "--adam_beta2",
            "0.95",
            "--crop_scale",
            "[0.4, 1.0]",
            "--rot90",
            "true",
            "--save_strategy",
            "no",
            "--eval_strategy",
            "no",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--logging_steps",
            "100",
            "--seed",
            str(recipe.get("seed", 0)),
        ]
    )
    return json.loads((out / "all_results.json").read_text()).get("train_loss")


def scores(x: np.ndarray, labels: np.ndarray, splits: int) -> dict:
    row = {}
    for fraction in (0.1, 1.0):
        values = [probe(x, labels, fraction, seed) for seed in range(splits)]
        row[f"f1_{int(fraction * 100)}"] = dict(
            mean=round(float(np.mean(values)), 3),
            std=round(float(np.std(values)), 3),
            scores=[round(v, 3) for v in values],
        )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "mae_recipe"))
    p.add_argument("--output", default="studies/results/mae_recipe.json")
    p.add_argument(
        "--table", default=None, help="only print the README table, differences paired against this recipe (e.g. base)"
    )
    p.add_argument(
        "--plot-steps",
        default=None,
        help="only draw probe macro-F1 vs pre-training steps (random masking, seed 0) to this PNG",
    )
    args = p.parse_args()
    if args.plot_steps:
        return plot_steps(json.loads(Path(args.output).read_text()), Path(args.plot_steps))
    if args.table:
        return print_table(json.loads(Path(args.output).read_text()), args.table)
    out, work = Path(args.output), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = (
        json.loads(out.read_text())
        if out.is_file()
        else {"hardware": hardware_description(), "base": BASE, "splits": args.splits, "rows": []}
    )
    done = {r["recipe"] for r in results["rows"]}
    for name in ["random", *args.recipes]:
        if name in done:
            continue
        recipe = {**BASE, **RECIPES.get(name, {})}
        images, labels = wbc(recipe["image_size"])
        start = time.time()
        if name == "random":
            torch.manual_seed(0)
            encoder = ViTModel(load_encoder_config(recipe), add_pooling_layer=False)
            mean, std, loss = images.mean((0, 2, 3)).tolist(), images.std((0, 2, 3)).tolist(), None
        else:
            pool = list(images) + (bccd_cells(recipe["image_size"]) if "bccd" in recipe["pool"] else [])
            loss = pretrain(recipe, np.stack(pool).astype(np.float32), work / name)
            encoder = load_encoder(str(work / name), image_size=recipe["image_size"])
            mean, std = encoder.image_mean, encoder.image_std
        row = dict(
            recipe=name,
            **recipe,
            train_loss=loss,
            pool_images=None if name == "random" else len(pool),
            minutes=round((time.time() - start) / 60, 1),
            **scores(features(encoder, images, mean, std), labels, args.splits),
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        results = record(out, results, row, key=lambda r: r["recipe"], field="rows")
        print(
            f"{name:>12}: macro-F1 10% {row['f1_10']['mean']:.3f} ± {row['f1_10']['std']:.3f}, "
            f"100% {row['f1_100']['mean']:.3f} ± {row['f1_100']['std']:.3f} ({row['minutes']} min)",
            flush=True,
        )
    print(f"\n{'recipe':>12} {'10% labels':>15} {'100% labels':>15} {'loss':>7} {'min':>5}")
    for r in results["rows"]:
        loss = f"{r['train_loss']:.3f}" if r["train_loss"] is not None else "-"
        print(
            f"{r['recipe']:>12} {r['f1_10']['mean']:>7.3f} ± {r['f1_10']['std']:.3f} {r['f1_100']['mean']:>7.3f} ± "
            f"{r['f1_100']['std']:.3f} "
            f"{loss:>7} {r['minutes']:>5}"
        )
    print(f"hardware: {results['hardware']}; wrote {out}")


def print_table(results: dict, reference: str) -> None:
    """Markdown rows: macro-F1 mean ± std over the splits, and the mean per-split difference to `reference` ± its
    standard error."""
    rows = {r["recipe"]: r for r in results["rows"]}

    def versus(row, key):
        if row["recipe"] == reference:
            return "—"
        diff = np.subtract(row[key]["scores"], rows[reference][key]["scores"]) * 100
        return f"{diff.mean():+.1f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.1f}"

    print(f"| recipe | steps | macro-F1, 10% labels | vs {reference} | macro-F1, 100% | vs {reference} | minutes |")
    print("|---|---|---|---|---|---|---|")
    for row in results["rows"]:
        print(
            f"| {row['recipe']} | {row['steps'] if row['recipe'] != 'random' else 0} | {row['f1_10']['mean']:.3f} ± "
            f"{row['f1_10']['std']:.3f} "
            f"| {versus(row, 'f1_10')} | {row['f1_100']['mean']:.3f} ± {row['f1_100']['std']:.3f} | "
            f"{versus(row, 'f1_100')} | {row['minutes']} |"
        )


def plot_steps(results: dict, path: Path) -> None:
    """Probe macro-F1 (mean ± std over the splits) against pre-training steps, for the base recipe's length levers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["recipe"]: r for r in results["rows"]}
    chain = [rows[n] for n in ("base", "steps3200", "steps6400", "steps12800") if n in rows]
    epochs = [r["steps"] * 64 / r["pool_images"] for r in chain]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key, label, colour in (("f1_10", "10% of labels", "#d95f02"), ("f1_100", "100% of labels", "#1b9e77")):
        ax.errorbar(
            epochs,
            [r[key]["mean"] for r in chain],
            [r[key]["std"] for r in chain],
            marker="o",
            capsize=3,
            color=colour,
            label=label,
        )
        ax.axhline(rows["random"][key]["mean"], color=colour, ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xticks(epochs, [f"{e:.0f}\n({r['steps']} steps)" for e, r in zip(epochs, chain)], fontsize=8)
    ax.minorticks_off()  # the log axis would add its own unlabelled-looking ticks between the runs
    ax.set_xlabel("pre-training epochs of the 284-image pool")
    ax.set_ylabel("probe macro-F1 (5 splits)")
    ax.set_title(
        "WBC: frozen MAE features vs pre-training length\n(dotted: the same ViT with random weights)", fontsize=9
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def load_encoder_config(recipe: dict):
    from transformers import ViTConfig

    return ViTConfig(
        image_size=recipe["image_size"],
        patch_size=recipe["patch_size"],
        num_channels=3,
        hidden_size=192,
        num_hidden_layers=6,
        num_attention_heads=6,
        intermediate_size=768,
    )


if __name__ == "__main__":
    main()
