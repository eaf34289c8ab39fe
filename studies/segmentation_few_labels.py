#!/usr/bin/env python
"""Few-label segmentation curve on the WBC masks: Dice vs the number of labelled training images, per arm.

Seed 003's "performance vs amount of labelled data", for masks (issue: "Segmentation that pays for its
pre-training"). One fixed split (`split_seed` 0: 210 train / 45 validation / 45 test images of WBC Zheng 2018
Dataset 1, 3 classes: background, cytoplasm, nucleus); each seed draws which training images are labelled (one
seed's 1 image lies inside its 3, its 3 inside its 10, ...), the initialisation and the augmentation. Every run
trains the same schedule, selects on validation mean Dice and is scored on the dense test masks, which no model
ever saw, the MAE included: the MAE pre-trains on the 210 training images (no masks) plus 120 px tiles of the
BCCD smears, never on validation or test images.

Arms: `unet` (MONAI BasicUNet from scratch), `scratch-unetr` (UNETR, random ViT), `mae-unetr` (UNETR on the MAE's
encoder, layer decay 0.75), and the levers, each one change to `mae-unetr`. Of the fine-tuning: `mae-light`
(`decoder: light`, the last block upsampled with a few convolutions), `mae-warmup` (`freeze_encoder_steps: 100`),
`mae-nodecay` (`layer_decay: 1.0`). Of the MAE (each its own pre-training, `MAES`): `mae-p4` (4 px patches, 256
tokens instead of 64), `mae-r0.125` and `mae-r0.75` (mask ratio 12.5% / 75% instead of 50%), `mae-wbconly` (the
210 WBC training images without the BCCD tiles); `scratch-p4` is `mae-p4`'s UNETR from random weights.
`--pixels 0.02` runs the sparse variant (2% of each training mask's pixels, as seed 001). Results merge run by run
into `studies/results/segmentation_few_labels.json`
(resumable; several processes may fill it together), and `--report` writes the table and the PNG.

    OMP_NUM_THREADS=1 python studies/segmentation_few_labels.py --arms mae-unetr            # process 1
    OMP_NUM_THREADS=1 python studies/segmentation_few_labels.py --arms unet scratch-unetr   # process 2
    python studies/segmentation_few_labels.py --report
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from segmentation_study import FULL

from hf_medmae.data.segmentation import load_labelled
from hf_medmae.data.splits import split_three
from hf_medmae.evaluation.results import paired_ci95, record
from hf_medmae.tasks import pretrain as pretrain_task
from hf_medmae.tasks import segment as segment_task
from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]
WBC = ROOT.parent / "shared" / "data" / "wbc_zheng2018" / "Dataset 1"
BCCD = ROOT.parent / "shared" / "data" / "bccd" / "BCCD" / "JPEGImages"
RESULTS = ROOT / "studies" / "results" / "segmentation_few_labels.json"
CLASSES = ["background", "cytoplasm", "nucleus"]
CLASS_MAP = {0: 0, 128: 1, 255: 2}
ARMS = {
    "unet": ("unet", "scratch", {}),
    "scratch-unetr": ("unetr", "scratch", {}),
    "mae-unetr": ("unetr", "mae", {}),
    # the levers, each one change to mae-unetr: of the fine-tuning ...
    "mae-light": ("unetr", "mae", {"decoder": "light"}),
    "mae-warmup": ("unetr", "mae", {"freeze_encoder_steps": 100}),
    "mae-nodecay": ("unetr", "mae", {"layer_decay": 1.0}),
    # ... or of the MAE (MAES): smaller tokens, other mask ratios, a pool without the BCCD tiles
    "mae-p4": ("unetr", "mae", {"mae": "p4"}),
    "mae-r0.125": ("unetr", "mae", {"mae": "r0.125"}),
    "mae-r0.75": ("unetr", "mae", {"mae": "r0.75"}),
    "mae-wbconly": ("unetr", "mae", {"mae": "wbconly"}),
    "scratch-p4": ("unetr", "scratch", {"mae": "p4"}),  # mae-p4's architecture from random weights
}
PRETRAINED = [a for a, (_, init, _) in ARMS.items() if init == "mae"]
CURVE = ["unet", "scratch-unetr", "mae-unetr", "mae-nodecay"]  # the baselines, MAE-UNETR and the best lever
CURVE_NAMES = {
    "unet": "U-Net",
    "scratch-unetr": "UNETR scratch",
    "mae-unetr": "MAE-UNETR",
    "mae-nodecay": "MAE-UNETR, no layer decay",
}
LEVER_NAMES = {  # the levers table's rows: plain MAE-UNETR first, each lever one change to it
    "mae-unetr": "MAE-UNETR (MAE: patch 8, mask 50%, WBC + BCCD pool; layer decay 0.75)",
    "mae-nodecay": "no layer decay (1.0)",
    "mae-warmup": "frozen-encoder warm-up, 100 steps",
    "mae-light": "light decoder",
    "mae-r0.75": "MAE mask ratio 75%",
    "mae-r0.125": "MAE mask ratio 12.5%",
    "mae-wbconly": "MAE pool: the 210 WBC images only",
    "mae-p4": "patch 4 (MAE and UNETR; its scratch: UNETR at patch 4)",
}
SIZES = [1, 3, 10, 30, 210]
PROTOCOL = "few-labels-v1: split_seed 0, 64 px, 300 steps bs 16, eval every 50, MAE 1500 steps"
MAE = dict(FULL["mae"], max_steps=1500)  # the earlier WBC segmentation study's MAE, 1,500 steps
# MAE variants (one change each to MAE) and the BCCD smears in their pool (0: the WBC training images only)
MAES = {
    "mae": ({}, None),
    "p4": ({"patch_size": 4}, None),
    "r0.125": ({"mask_ratio": 0.125}, None),
    "r0.75": ({"mask_ratio": 0.75}, None),
    "wbconly": ({}, 0),
}
SEG = dict(image_size=64, feature_size=16, max_steps=300, eval_steps=50, per_device_train_batch_size=16)


def as_argv(values: dict) -> list[str]:
    argv = []
    for key, value in values.items():
        argv += [f"--{key}", json.dumps(value)]
    return argv


def mae_pool(path: Path, bccd_images: int) -> Path:
    """The training split's WBC images (no masks; never validation or test) and 120 px BCCD tiles, [N, 3, 120, 120]."""
    pairs, *_ = load_labelled(str(WBC), CLASS_MAP, CLASSES, 255, None, "*.bmp", "{stem}.png", None)
    train_idx, _, _ = split_three(len(pairs), 0.15, 0.15, 0)
    rgb = lambda a: np.asarray(Image.fromarray(a).resize((120, 120), Image.BILINEAR))  # noqa: E731
    images = [rgb(np.asarray(pairs.images[i]).transpose(1, 2, 0).astype(np.uint8)) for i in train_idx]
    for p in sorted(BCCD.glob("*.jpg"))[:bccd_images]:
        smear = np.asarray(Image.open(p).convert("RGB"))
        images += [smear[t : t + 120, x : x + 120] for t in range(0, 361, 120) for x in range(0, 521, 120)]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.stack(images).transpose(0, 3, 1, 2))
    return path


def pretrain(work: Path, bccd_images: int, variant: str = "mae") -> Path:
    """The study's MAE (`variant` of MAES), pre-trained once and reused by every run."""
    mae_dir = work / variant
    if (mae_dir / "model.safetensors").is_file():
        return mae_dir
    changes, bccd = MAES[variant]
    bccd = bccd_images if bccd is None else bccd
    pool = work / ("mae_pool.npy" if bccd == bccd_images else f"mae_pool_bccd{bccd}.npy")
    pool = pool if pool.is_file() else mae_pool(pool, bccd)
    settings = dict(MAE, **changes, train_data=str(pool), output_dir=str(mae_dir), seed=0, report_to="none")
    settings.update(save_strategy="steps", save_steps=250, save_total_limit=1, logging_steps=50)
    settings.update(resume_from_checkpoint="true")  # an interrupted pre-training goes on from its last checkpoint
    settings.update(dataloader_num_workers=0, disable_tqdm=True)
    pretrain_task.main(["--eval_strategy", '"no"', *as_argv(settings)])
    return mae_dir


def run_name(arm: str, size: int, seed: int, pixels: float) -> str:
    return f"{arm}_n{size}_seed{seed}" if pixels == 1.0 else f"{arm}_n{size}_px{pixels:g}_seed{seed}"


def segment(arm: str, size: int, seed: int, mae_dir: Path | None, work: Path, pixels: float = 1.0) -> dict:
    model, init, lever = ARMS[arm]
    lever = {k: v for k, v in lever.items() if k != "mae"}
    out = work / run_name(arm, size, seed, pixels)
    values = dict(
        SEG,
        train_data=str(WBC),
        image_glob="*.bmp",
        class_map=CLASS_MAP,
        class_names=CLASSES,
        model=model,
        init=init,
        split_seed=0,
        train_images=size,
        seed=seed,
        learning_rate=1e-3,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        layer_decay=0.75 if init == "mae" else 1.0,
        save_steps=SEG["eval_steps"],
        save_total_limit=1,
        load_best_model_at_end=True,
        per_device_eval_batch_size=64,
        logging_steps=50,
        report_to="none",
        dataloader_num_workers=0,
        output_dir=str(out),
        num_overlays=0,
        label_fraction_pixels=pixels,
    )
    values.update(lever)  # a lever may override a value above (layer_decay)
    if model == "unetr":  # the MAE's encoder: its weights (mae) or only its architecture (scratch)
        values["model_name_or_path"] = str(mae_dir)
    argv = ["--eval_strategy", '"steps"', "--save_strategy", '"steps"', "--disable_tqdm", "true", *as_argv(values)]
    start = time.perf_counter()
    segment_task.main(argv)
    metrics = json.loads((out / "test_metrics.json").read_text())
    return dict(
        arm=arm,
        labelled_images=size,
        pixels=pixels,
        seed=seed,
        seconds=round(time.perf_counter() - start, 1),
        precision=json.loads((out / "all_results.json").read_text()).get("precision"),  # "auto": measured per run
        mean_dice=metrics["mean_dice"],
        **{f"dice_{c}": metrics["dice_per_class"][c] for c in CLASSES},
    )


KEY = lambda r: (r["arm"], r["labelled_images"], r.get("pixels", 1.0), r["seed"])  # noqa: E731


def finished() -> set[tuple]:
    """The runs already in the results file (of this protocol), whichever process wrote them."""
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    return {KEY(r) for r in data.get("runs", [])} if data.get("protocol") == PROTOCOL else set()


def claim(out: Path) -> bool:
    """Take run folder `out` for this process, unless a live process holds it (two processes filling one study
    from both ends of the plan meet in the middle). A claim left by a dead process is taken over."""
    out.mkdir(parents=True, exist_ok=True)
    marker = out / ".claimed_by"
    if marker.is_file():
        try:
            os.kill(int(marker.read_text()), 0)
            return int(marker.read_text()) == os.getpid()
        except (ProcessLookupError, ValueError):
            pass
    marker.write_text(str(os.getpid()))
    return True


def run(args) -> None:
    header = {"protocol": PROTOCOL, "hardware": hardware_description(), "classes": CLASSES, "runs": []}
    work = Path(args.work_dir)
    unetr = [a for a in args.arms if ARMS[a][0] == "unetr"]
    maes = {a: pretrain(work, args.bccd_images, ARMS[a][2].get("mae", "mae")) for a in unetr}
    plan = [(a, n, s) for s in args.seeds for n in args.sizes for a in args.arms]
    for arm, size, seed in plan[::-1] if args.reverse else plan:
        folder = work / run_name(arm, size, seed, args.pixels)
        if (arm, size, args.pixels, seed) in finished() or not claim(folder):
            continue
        row = segment(arm, size, seed, maes.get(arm), work, args.pixels)
        record(RESULTS, header, row, KEY)
        print(row, flush=True)


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3f}{spread} (n={len(values)})"


def paired(deltas: list[float]) -> str:
    ci = paired_ci95(deltas)
    if not ci:
        return "—"
    return f"{100 * statistics.mean(deltas):+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] (n={len(deltas)})"


def report() -> str:
    """The tables and the PNG of the WBC curve (`curve_report`)."""
    runs = json.loads(RESULTS.read_text())["runs"]
    dice = {KEY(r): r["mean_dice"] for r in runs}
    for pixels in sorted({r.get("pixels", 1.0) for r in runs}, reverse=True):
        print(f"### Levers, {variant_name(pixels)}")
        print(levers_report(runs, pixels) + "\n")
    return curve_report(
        dice,
        CURVE,
        PRETRAINED,
        RESULTS.with_suffix(".png"),
        items="images",
        ylabel="test mean Dice (background, cytoplasm, nucleus)",
        title="WBC masks",
        names=CURVE_NAMES,
    )


def variant_name(share: float, unit: str = "pixels") -> str:
    """A label variant's heading: dense masks, or the kept share of each mask's pixels (voxels)."""
    return "dense masks" if share == 1.0 else f"{100 * share:g}% of each mask's {unit}"


def levers_report(runs: list[dict], pixels: float = 1.0, sizes: tuple[int, ...] = (1, 3, 10)) -> str:
    """The levers table: per lever (one change to MAE-UNETR) test Dice at the few-label sizes, and its paired
    differences to the U-Net and to UNETR from scratch of the same architecture (patch 4's own scratch UNETR)."""
    dice = {KEY(r): r["mean_dice"] for r in runs if r.get("pixels", 1.0) == pixels}

    def seeds(arm: str, n: int) -> dict[int, float]:
        return {k[3]: v for k, v in dice.items() if k[0] == arm and k[1] == n}

    def versus(arm: str, base: str, n: int) -> str:
        x, y = seeds(arm, n), seeds(base, n)
        return paired([x[s] - y[s] for s in sorted(x.keys() & y.keys())])

    rows = [a for a in LEVER_NAMES if any(seeds(a, n) for n in sizes)]
    head = [f"{n} image{'s' * (n > 1)}" for n in sizes]
    head += [f"− U-Net, {n}" for n in sizes] + [f"− UNETR scratch, {n}" for n in sizes]
    text = ["| arm (one change to MAE-UNETR) | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for arm in rows:
        scratch = "scratch-p4" if arm == "mae-p4" else "scratch-unetr"  # same tokens, random weights
        cells = [mean_std(list(seeds(arm, n).values())) for n in sizes]
        cells += [versus(arm, "unet", n) for n in sizes] + [versus(arm, scratch, n) for n in sizes]
        text.append(f"| {LEVER_NAMES[arm]} | " + " | ".join(cells) + " |")
    for arm, name in (
        ("unet", "U-Net"),
        ("scratch-unetr", "UNETR from scratch"),
        ("scratch-p4", "UNETR from scratch, patch 4"),
    ):
        if any(seeds(arm, n) for n in sizes):  # the scratch UNETRs against the U-Net too: the architecture alone
            cells = [mean_std(list(seeds(arm, n).values())) for n in sizes]
            cells += [versus(arm, "unet", n) if arm != "unet" else "" for n in sizes] + [""] * len(sizes)
            text.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(text)


def curve_report(
    dice: dict[tuple, float],
    arms: list[str],
    pretrained: list[str],
    png: Path,
    items: str,
    ylabel: str,
    title: str,
    baselines: tuple[str, ...] = ("scratch-unetr", "unet"),
    unit: str = "pixels",
    names: dict[str, str] | None = None,
) -> str:
    """Per label variant (dense, sparse): mean ± std test Dice per arm and labelled-set size; each pre-trained arm
    minus each baseline arm, in Dice points, paired by seed with 95% intervals; one curve per arm in `png`.

    `dice` maps (arm, labelled items, kept share of each mask, seed) to the test Dice; the 2D and 3D few-label
    studies both report through here. `names` are the arms' names in the tables and the legend (default: keys)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name_of = (names or {}).get
    variants = sorted({k[2] for k in dice}, reverse=True)
    fig, axes = plt.subplots(1, len(variants), figsize=(6.4 * len(variants), 4.6), squeeze=False)
    text = []
    for ax, share in zip(axes[0], variants):
        present = [a for a in arms if any(k[0] == a and k[2] == share for k in dice)]
        sizes = sorted({k[1] for k in dice if k[2] == share})

        def seeds(arm: str, n: int) -> dict[int, float]:
            return {k[3]: v for k, v in dice.items() if k[0] == arm and k[1] == n and k[2] == share}  # noqa: B023

        name = variant_name(share, unit)
        text += [f"### {name}", "", f"| labelled {items} | " + " | ".join(name_of(a, a) for a in present) + " |"]
        text.append("|---" * (len(present) + 1) + "|")
        for n in sizes:
            text.append(f"| {n} | " + " | ".join(mean_std(list(seeds(a, n).values())) for a in present) + " |")
        pairs = [(a, b) for a in present if a in pretrained for b in baselines if b in present]
        differences = " | ".join(f"{name_of(a, a)} − {name_of(b, b)}" for a, b in pairs)
        text += ["", f"| labelled {items} | {differences} |"]
        text.append("|---" * (len(pairs) + 1) + "|")
        for n in sizes:
            cells = []
            for a, b in pairs:
                x, y = seeds(a, n), seeds(b, n)
                cells.append(paired([x[s] - y[s] for s in sorted(x.keys() & y.keys())]))
            text.append(f"| {n} | " + " | ".join(cells) + " |")
        text.append("")
        for arm in present:
            points = [(n, list(seeds(arm, n).values())) for n in sizes if seeds(arm, n)]
            xs = [n for n, _ in points]
            means = np.array([statistics.mean(v) for _, v in points])
            spread = np.array([statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points])
            ax.plot(xs, means, marker="o", label=name_of(arm, arm))
            ax.fill_between(xs, means - spread, means + spread, alpha=0.12)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel(f"labelled training {items}")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, {name}: mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    table = "\n".join(text)
    print(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--sizes", nargs="+", type=int, default=SIZES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--pixels", type=float, default=1.0, help="share of each training mask's pixels kept")
    parser.add_argument("--bccd-images", type=int, default=100)
    parser.add_argument("--work-dir", default=str(ROOT / "outputs" / "segmentation_few_labels"))
    parser.add_argument("--reverse", action="store_true", help="take the plan from its end (a second process)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.report:
        report()
    else:
        run(args)


if __name__ == "__main__":
    main()
