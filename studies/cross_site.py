#!/usr/bin/env python
"""Cross-site white-cell classification: train on one lab's cells, score another site's.

Source: WBC Zheng 2018 Dataset 1 (300 cells, 120 px frames, one scanner and stain), labels at 100% or 10%.
Target: the white cells of the BCCD smears (another microscope, stain and magnification): the WBC box of each smear
with one such box (`hf_medmae.data.boxes.box_crops`), labelled by `bccd/wbc_subtypes.csv`, scored with the
classification task's `--predict_only` (as a user would), as read and with Reinhard stain normalisation to the
training images (`--stain_normalisation reinhard`), and cut at the source's scale too (the cell filling as much of
the frame as the source's cells fill theirs, by their expert masks). Macro-F1 over the classes present at the target.

Arms (the classification task on `configs/wbc_classification.yaml`): `cnn` (MONAI ResNet-10), `vit_scratch`,
`mae_finetune`, `mae_frozen` (frozen features + logistic regression). Factors: augmentation off / on (`AUGMENT`:
colour, HED stain, blur and zoom-out, for the MAE and the classifier alike) and, for the MAE arms, the MAE's pool:
the seed's source training images, or those plus the target's cells without labels (self pre-training on the
target site). The full protocol shares one source split across the seeds (each seed draws its own labelled 10%,
initialisation and augmentation) and pre-trains one MAE per (augmentation, pool); the pilot drew a split and MAEs
per seed. No MAE (`configs/wbc_mae.yaml`) ever sees a source validation or test image.

Every run is merged into the JSON as it finishes (`evaluation.results.record`), runs already there are skipped, and
an interrupted run (classifier or MAE) goes on from its newest checkpoint in `--work-dir`:

    python studies/cross_site.py                                     # the full study: hours on a 2-core CPU
    python studies/cross_site.py --protocol pilot --seeds 0          # shortened schedules, to see the shape
    python studies/cross_site.py --report                            # table, paired differences, figure
    python studies/cross_site.py --rescore source                    # recorded models on cells cut at the source scale
    python studies/cross_site.py --few_target 1 3 5 10               # recorded models, a new head from k BCCD cells
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hf_medmae.data.boxes import box_crops
from hf_medmae.data.classification import ClassificationDataset, load_labelled
from hf_medmae.data.io import read_image
from hf_medmae.data.splits import stratified_split
from hf_medmae.data.transforms import resize
from hf_medmae.evaluation.classification import present_class_scores
from hf_medmae.evaluation.probe import fit_probe
from hf_medmae.evaluation.results import locked, paired_ci95, record, write_json
from hf_medmae.inference.classification import head_features, input_size, load_classifier, output_layer
from hf_medmae.tasks import classify, pretrain
from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WBC = SHARED / "wbc_zheng2018"
BCCD = SHARED / "bccd"
CLASSES = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]
ARMS = ("cnn", "vit_scratch", "mae_finetune", "mae_frozen")
# Today's recipe as the issue ran it: no augmentation, the target's cells in the MAE pool.
SHIPPED = ("mae_finetune", "off", "source+target")
DEFAULT_MARGIN = 1.2  # `box_crops`' crop side / box side: the BCCD cells as a user would cut them
# The augmentation under test: colours and stains of another lab, its focus, a smaller or larger cell in the frame.
AUGMENT = [
    "--colour_jitter",
    "0.3",
    "0.3",
    "0.3",
    "0.05",
    "--stain_jitter",
    "0.05",
    "--blur_sigma",
    "0.1",
    "1.5",
    "--crop_scale",
    "0.4",
    "2.0",
]
# Schedules: "full" is the shipped recipes' (converged, studies/finetune_convergence.py); "pilot" is short, to see
# the shape of the result on a 2-core CPU within an hour. Results of the two never mix (the protocol is the key).
# "full" shares one source split (split_seed 0) across seeds, as the few-label segmentation study does: the target
# set is fixed anyway, and one MAE per (augmentation, pool) instead of one per seed makes it 4 pre-trainings, not 20;
# the seeds still draw their own labelled 10%, initialisation and augmentation. The pilot drew a split per seed.
PROTOCOLS = {
    "full": {"mae_steps": 6400, "finetune": [], "split_seed": 0},
    "pilot": {
        "mae_steps": 800,
        "finetune": ["--min_train_steps", "400", "--num_train_epochs", "1"],
        "split_seed": None,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--augment", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--pools", nargs="+", default=["source", "source+target"], choices=["source", "source+target"])
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--protocol", default="full", choices=list(PROTOCOLS))
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "cross_site"))
    p.add_argument("--output", default=None, help="default: studies/results/cross_site_<protocol>.json")
    p.add_argument("--report", action="store_true", help="only summarise the JSON")
    p.add_argument(
        "--rescore",
        nargs="+",
        metavar="MARGIN",
        help="score the recorded runs' models on the BCCD cells cut with these margins ('source': the source's scale)",
    )
    p.add_argument(
        "--few_target",
        nargs="+",
        type=int,
        metavar="K",
        help="refit the recorded runs' output layer on K labelled BCCD cells per class and score the rest",
    )
    args = p.parse_args(argv)
    args.output = Path(args.output or ROOT / "studies" / "results" / f"cross_site_{args.protocol}.json")
    return args


def source_flags() -> list[str]:
    return ["--data_dir", str(WBC / "Dataset 1"), "--labels_csv", str(WBC / "Class Labels of Dataset 1.csv")]


def source_cell_fraction() -> float:
    """Median side of the white cell's bounding box (its expert mask, cytoplasm and nucleus) over the frame's side
    in the source's frames: how much of the frame a source cell fills."""
    sides = []
    for mask_file in sorted((WBC / "Dataset 1").glob("*.png")):
        mask = read_image(mask_file)[0]
        ys, xs = np.nonzero(mask)
        if len(ys):
            sides.append(max(np.ptp(ys), np.ptp(xs)) + 1)
    return float(np.median(sides)) / max(mask.shape)


def target_set(work: Path, margin: float = DEFAULT_MARGIN) -> Path:
    """The BCCD white cells with a subtype, written once in the source's layout (`NNN.bmp`, the same CSV columns):
    each cell's box cut out with `margin` (crop side / box side; 1.2 is `box_crops`' default)."""
    # no dot in the name: prediction outputs are named by the folder's stem
    out = work / ("bccd_wbc" if margin == DEFAULT_MARGIN else f"bccd_wbc_margin{round(100 * margin)}")
    if (out / "labels.csv").is_file():
        return out
    subtype = {r["image"]: r["subtype"] for r in csv.DictReader((BCCD / "wbc_subtypes.csv").open())}
    crops = box_crops(BCCD / "BCCD" / "JPEGImages", BCCD / "BCCD" / "Annotations", "WBC", margin, only_single=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (stem, crop) in enumerate(sorted((s, c) for s, c in crops.items() if s in subtype), start=1):
        Image.fromarray(crop.transpose(1, 2, 0).astype(np.uint8)).save(out / f"{i:03d}.bmp")
        rows.append({"image ID": i, "class label": CLASSES.index(subtype[stem]) + 1, "smear": stem})
    with (out / "labels.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image ID", "class label", "smear"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def seed_mae(args: argparse.Namespace, seed: int, augment: str, pool: str, work: Path) -> Path:
    """The MAE of the seed's source split (the shared one under `split_seed`) on its training images (and the
    target's cells, unlabeled), reused if present."""
    shared = PROTOCOLS[args.protocol]["split_seed"]
    seed = seed if shared is None else shared  # one split for every seed: one MAE for every seed
    out = (
        work
        / f"mae_{args.protocol}_{pool.replace('+', '_')}_aug{augment}_{'shared' if shared is not None else 's'}{seed}"
    )
    if (out / "model.safetensors").is_file():
        return out
    data = load_labelled(
        classify.DataArguments(
            data_dir=str(WBC / "Dataset 1"),
            labels_csv=str(WBC / "Class Labels of Dataset 1.csv"),
            id_column="image ID",
            label_column="class label",
            filename_template="{id:03d}.bmp",
            label_offset=1,
            class_names=CLASSES,
        )
    )
    split = stratified_split(data.labels, data.class_names, 0.15, 0.2, seed)  # the config's fractions
    images = [data.images[i] for i in split.train]
    if pool == "source+target":
        images += [read_image(p) for p in sorted(target_set(work).glob("*.bmp"))]
    stack = np.stack([resize(torch.from_numpy(np.ascontiguousarray(x)), 64).numpy() for x in images])
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / f"{out.name}_pool.npy", stack.astype(np.float32))
    pretrain.main(
        [
            "--config",
            str(ROOT / "configs" / "wbc_mae.yaml"),
            "--train_data",
            str(work / f"{out.name}_pool.npy"),
            "--output_dir",
            str(out),
            "--max_steps",
            str(PROTOCOLS[args.protocol]["mae_steps"]),
            "--eval_strategy",
            "no",
            "--resume_from_checkpoint",  # the config saves every 800 steps: an interrupted MAE goes on from there
            "true",
            "--disable_tqdm",
            "true",
            "--seed",
            str(seed),
            *(AUGMENT if augment == "on" else []),
        ]
    )
    (out / "pool.json").write_text(json.dumps({"source_train": [data.files[i] for i in split.train], "pool": pool}))
    return out


def run_dir(args: argparse.Namespace, arm: str, augment: str, pool: str, fraction: float, seed: int) -> Path:
    return Path(args.work_dir) / f"{arm}_{args.protocol}_{pool.replace('+', '_')}_aug{augment}_f{fraction}_s{seed}"


def run(args: argparse.Namespace, arm: str, augment: str, pool: str, fraction: float, seed: int, work: Path) -> dict:
    out = run_dir(args, arm, augment, pool, fraction, seed)
    flags = {
        "cnn": ["--architecture", "resnet10"],
        "vit_scratch": ["--init", "scratch", "--model_name_or_path", "null"],
        "mae_finetune": ["--init", "mae"],
        "mae_frozen": ["--init", "mae", "--mode", "frozen_features"],
    }[arm]
    if arm.startswith("mae"):
        flags += ["--model_name_or_path", str(seed_mae(args, seed, augment, pool, work))]
    split_seed = PROTOCOLS[args.protocol]["split_seed"]
    start = time.time()
    classify.main(
        [
            "--config",
            str(ROOT / "configs" / "wbc_classification.yaml"),
            *source_flags(),
            "--train_fraction",
            str(fraction),
            "--seed",
            str(seed),
            *([] if split_seed is None else ["--split_seed", str(split_seed)]),
            "--output_dir",
            str(out),
            "--resume_from_checkpoint",  # an interrupted run goes on from its newest complete checkpoint
            "true",
            "--disable_tqdm",
            "true",
            *flags,
            *(AUGMENT if augment == "on" else []),
            *PROTOCOLS[args.protocol]["finetune"],
        ]
    )
    own = json.loads((out / "test_metrics.json").read_text())
    if arm.startswith("mae"):  # the MAE never saw a source image the classifier is validated or tested on
        seen = set(json.loads((Path(flags[-1]) / "pool.json").read_text())["source_train"])
        splits = json.loads((out / "splits.json").read_text())
        assert not seen & (set(splits["val"]) | set(splits["test"])), "pre-training saw evaluation images"
    row = dict(arm=arm, augment=augment, pool=pool if arm.startswith("mae") else "-", fraction=fraction, seed=seed)
    row.update(own_accuracy=own["accuracy"], own_macro_f1=own["macro_f1_present"])
    for margin in (DEFAULT_MARGIN, source_margin()):
        row.update(score_target(out, work, margin))
    row["minutes"] = round((time.time() - start) / 60, 2)
    row["hardware"] = hardware_description()  # runs of one study may span machines: each says where it ran
    return row


def source_margin() -> float:
    """The crop margin at which a BCCD box fills as much of the frame as a source cell fills its frame."""
    return round(1 / source_cell_fraction(), 2)


def margin_prefix(margin: float) -> str:
    return "target" if margin == DEFAULT_MARGIN else f"target_margin{round(100 * margin)}"


def score_target(out: Path, work: Path, margin: float = DEFAULT_MARGIN) -> dict:
    """The trained classifier in `out` scored on the BCCD cells cut with `margin`, as read and Reinhard-normalised.
    Other margins than the default change the cell's scale in the frame at test time (`source_margin` matches the
    source's): how much of the site difference is magnification."""
    target = target_set(work, margin)
    prefix = margin_prefix(margin)
    row = {}
    for stain in ("none", "reinhard"):
        predicted = out / f"{prefix}_{stain}"
        classify.main(
            [
                "--config",
                str(ROOT / "configs" / "wbc_classification.yaml"),
                "--predict_only",
                "true",
                "--model_name_or_path",
                str(out),
                "--predict_data",
                str(target),
                "--predict_labels_csv",
                str(target / "labels.csv"),
                "--stain_normalisation",
                stain,
                "--output_dir",
                str(predicted),
            ]
        )
        scores = json.loads((predicted / target.name / "test_metrics.json").read_text())
        row[f"{prefix}_{stain}_accuracy"] = scores["accuracy"]
        row[f"{prefix}_{stain}_macro_f1"] = scores["macro_f1_present"]
        row[f"{prefix}_{stain}_predicted"] = scores.get("predicted_counts")
        row[f"{prefix}_{stain}_confusion"] = scores.get("confusion_matrix")
    return row


def key(r: dict) -> tuple:
    return r["arm"], r["augment"], r["pool"], r["fraction"], r["seed"]


def grid(args: argparse.Namespace) -> list[tuple]:
    """The runs asked for, as `key`s, in the order they run: by seed first, so every cell gains seeds together."""
    return [
        (arm, augment, pool, fraction, seed)
        for seed in args.seeds
        for fraction in args.fractions
        for augment in args.augment
        for arm in args.arms
        for pool in (args.pools if arm.startswith("mae") else ["-"])
    ]


def cell_order(cell: tuple) -> tuple:
    return -cell[3], ARMS.index(cell[0]), cell[1], cell[2]


def cells(runs: list[dict]) -> list[tuple]:
    return sorted({key(r)[:4] for r in runs}, key=cell_order)


def paired(runs: list[dict], cell: list[dict], reference: tuple) -> dict | None:
    """The cell's BCCD macro-F1 minus the reference cell's, in points, paired by seed, with a 95% interval."""
    base = {r["seed"]: r for r in runs if key(r)[:4] == reference}
    deltas = [
        100 * (r["target_none_macro_f1"] - base[r["seed"]]["target_none_macro_f1"]) for r in cell if r["seed"] in base
    ]
    return {"mean": statistics.mean(deltas), "ci95": paired_ci95(deltas), "seeds": len(deltas)} if deltas else None


def within(cell: list[dict], field: str, base: str) -> dict | None:
    """Mean ± std of another score of the same models, and its paired difference from `base`, in points."""
    scored = [r for r in cell if field in r]
    if not scored:
        return None
    deltas = [100 * (r[field] - r[base]) for r in scored]
    values = [r[field] for r in scored]
    return {
        "macro_f1": (statistics.mean(values), statistics.pstdev(values)),
        "vs_default": {"mean": statistics.mean(deltas), "ci95": paired_ci95(deltas), "seeds": len(deltas)},
    }


def summarise(runs: list[dict]) -> list[dict]:
    """Mean ± std per cell, and each cell's target macro-F1 minus today's shipped recipe (the MAE fine-tuned without
    augmentation, the target's cells in its pool: the issue's own measurement) and minus the ResNet-10 under the same
    augmentation (the goal's two bars)."""
    table = []
    for arm, augment, pool, fraction in cells(runs):
        cell = [r for r in runs if key(r)[:4] == (arm, augment, pool, fraction)]
        row = {"arm": arm, "augment": augment, "pool": pool, "fraction": fraction, "seeds": len(cell)}
        for m in ("own_accuracy", "target_none_macro_f1", "target_reinhard_macro_f1", "target_none_accuracy"):
            values = [r[m] for r in cell]
            row[m] = (statistics.mean(values), statistics.pstdev(values))
        # the same models on cells cut with other margins, and with a head from a few labelled target cells
        row["margins"] = {
            str(m): within(cell, f"{margin_prefix(m)}_none_macro_f1", "target_none_macro_f1") for m in margins(runs)
        }
        row["few_target"] = {
            str(k): within(cell, f"few_target_k{k}_macro_f1", f"few_target_k{k}_trained_head_macro_f1")
            for k in few_target_ks(runs)
        }
        adapted = [r["target_none_macro_f1"] for r in cell if any(k.startswith("few_target") for k in r)]
        if adapted:  # the trained layer on every cell, over the same models (the curve's k = 0)
            row["few_target_base"] = (statistics.mean(adapted), statistics.pstdev(adapted), len(adapted))
        row["vs_shipped"] = paired(runs, cell, SHIPPED + (fraction,))
        row["vs_cnn"] = None if arm == "cnn" else paired(runs, cell, ("cnn", augment, "-", fraction))
        table.append(row)
    return table


def fmt(v: tuple) -> str:
    return f"{v[0]:.3f} ± {v[1]:.3f}"


def gain(d: dict | None) -> str:
    """A paired difference as `+1.2 [-0.3, +2.7] (n=5)`."""
    if not d:
        return "-"
    interval = f" [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]" if d["ci95"] else ""
    return f"{d['mean']:+.1f}{interval} (n={d['seeds']})"


def format_table(table: list[dict]) -> str:
    lines = [
        "| labels | arm | augmentation | MAE pool | seeds | own test acc | target macro-F1 | with Reinhard | "
        "vs shipped MAE (no aug., target in pool), points (95% CI) | vs ResNet-10, same augmentation |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['fraction']:.0%} | {r['arm']} | {r['augment']} | {r['pool']} | {r['seeds']} "
            f"| {fmt(r['own_accuracy'])} | {fmt(r['target_none_macro_f1'])} | {fmt(r['target_reinhard_macro_f1'])} "
            f"| {gain(r['vs_shipped'])} | {gain(r.get('vs_cnn'))} |"
        )
    lines += within_table(
        table,
        "margins",
        "margin",
        f"BCCD macro-F1 by crop margin (crop side / box side; {DEFAULT_MARGIN} is the default above, "
        f"{source_margin()} puts a cell at the source's scale), points vs the default paired by seed:",
    )
    lines += within_table(
        table,
        "few_target",
        "k =",
        "BCCD macro-F1 with a new output layer fitted on k labelled BCCD cells per class (the other cells scored; "
        f"mean of {FEW_TARGET_DRAWS} draws per model), points vs the trained layer on the same cells paired by seed:",
    )
    return "\n".join(lines)


def within_table(table: list[dict], field: str, column: str, title: str) -> list[str]:
    """Markdown lines for the rows' `within` scores under `field` (none: no lines)."""
    others = sorted({m for r in table for m, s in r.get(field, {}).items() if s}, key=float)
    if not others:
        return []
    lines = [
        "",
        title,
        "",
        "| labels | arm | augmentation | MAE pool | " + " | ".join(f"{column} {m}" for m in others) + " |",
        "|---|---|---|---|" + "---|" * len(others),
    ]
    for r in table:
        scores = [r.get(field, {}).get(m) for m in others]
        if any(scores):
            lines.append(
                f"| {r['fraction']:.0%} | {r['arm']} | {r['augment']} | {r['pool']} | "
                + " | ".join(f"{fmt(s['macro_f1'])}, {gain(s['vs_default'])}" if s else "-" for s in scores)
                + " |"
            )
    return lines


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table if r["fraction"] == max(t["fraction"] for t in table)]
    names = [
        f"{r['arm']}\naug {r['augment']}" + (f"\n{r['pool']}" if r["pool"] != "-" else "") + f"\nn={r['seeds']}"
        for r in rows
    ]
    x = np.arange(len(rows))
    adapted = [r for r in rows if any(r.get("few_target", {}).values())]
    width = max(9, 1.1 * len(rows))
    if adapted:  # a second panel: what a few labelled cells of the new site buy
        fig, (ax, few) = plt.subplots(
            1, 2, figsize=(width + 4.5, 4.8), gridspec_kw={"width_ratios": [width, 4.5]}, sharey=True
        )
    else:
        fig, ax = plt.subplots(figsize=(width, 4.8))
    for offset, (field, label) in enumerate(
        [
            ("own_accuracy", "own test accuracy"),
            ("target_none_macro_f1", "BCCD macro-F1"),
            ("target_reinhard_macro_f1", "BCCD macro-F1, Reinhard"),
        ]
    ):
        means, stds = [r[field][0] for r in rows], [r[field][1] for r in rows]
        ax.bar(x + (offset - 1) * 0.27, means, 0.27, yerr=stds, label=label, capsize=2)
    ax.axhline(0.6, color="grey", linestyle="--", linewidth=1, label="goal: BCCD macro-F1 0.60")
    ax.set_xticks(x, names, fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("score (mean ± std over seeds)")
    ax.set_title(f"Trained on WBC Zheng 2018 ({rows[0]['fraction']:.0%} labels), scored on its test split and on BCCD")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=4, frameon=False)
    colours = plt.get_cmap("tab20").colors  # one colour per model: the default cycle repeats after ten
    for i, r in enumerate(adapted):
        ks = sorted((int(k) for k, v in r["few_target"].items() if v), key=int)
        means = [r["few_target_base"][0]] + [r["few_target"][str(k)]["macro_f1"][0] for k in ks]
        stds = [r["few_target_base"][1]] + [r["few_target"][str(k)]["macro_f1"][1] for k in ks]
        label = f"{r['arm']}, aug {r['augment']}" + (f", {r['pool']}" if r["pool"] != "-" else "")
        label += f", n={r['few_target_base'][2]}"
        few.errorbar(
            [0, *ks],
            means,
            yerr=stds,
            marker="o",
            markersize=3,
            capsize=2,
            label=label,
            color=colours[i % len(colours)],
            linestyle="-" if r["augment"] == "on" else "--",
        )
        few.set_xticks([0, *ks])
    if adapted:
        few.axhline(0.6, color="grey", linestyle="--", linewidth=1)
        few.set_xlabel("labelled BCCD cells per class (0: as trained)")
        few.set_title("New output layer from a few BCCD cells", fontsize=9)
        few.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # keeps the legends below the panels
    plt.close(fig)


def report(output: Path) -> None:
    with locked(output):  # a run another process records meanwhile is kept
        results = json.loads(output.read_text())
        results["summary"] = summarise(results["runs"])
        write_json(output, results)
    plot(results["summary"], output.with_suffix(".png"))
    print(format_table(results["summary"]))
    # runs of one study may span machines: name each, not only the one that wrote the header
    machines = sorted({r.get("hardware", results["hardware"]) for r in results["runs"]})
    print(f"protocol {results['protocol']}; hardware: {' | '.join(machines)}; {len(results['runs'])} runs; {output}")
    done = {key(r) for r in results["runs"]}
    todo = [k for k in grid(parse_args([])) if k not in done]
    missing: dict[tuple, list[int]] = {}
    for k in todo:
        missing.setdefault(k[:4], []).append(k[4])
    print(f"the full grid: {len(done)} of {len(done) + len(todo)} runs; to run (arm, augment, pool, fraction: seeds):")
    for cell in sorted(missing, key=cell_order):
        print(f"  {', '.join(map(str, cell))}: {' '.join(map(str, missing[cell]))}")


def few_target_ks(runs: list[dict]) -> list[int]:
    """The numbers of labelled target cells per class some run's head was refitted with (`few_target`)."""
    return sorted({int(k.split("_")[2][1:]) for r in runs for k in r if k.startswith("few_target_k")})


def margins(runs: list[dict]) -> list[float]:
    """The crop margins other than the default that some run was scored at."""
    found = {k.split("_")[1] for r in runs for k in r if k.startswith("target_margin") and k.endswith("none_macro_f1")}
    return sorted(int(m.removeprefix("margin")) / 100 for m in found)


def study_header(args: argparse.Namespace) -> dict:
    """What a new results file starts with: the protocol, the machine writing it and the augmentation under test."""
    return {"protocol": args.protocol, "hardware": hardware_description(), "augment": AUGMENT}


def revisit(args: argparse.Namespace, missing: Callable[[dict], list], score: Callable[[Path, list], dict]) -> None:
    """Add scores to the recorded runs whose model is still in the work dir: `missing(row)` lists what a run lacks
    (crop margins, numbers of labelled target cells), `score(out, todo)` computes it from the model in `out`."""
    header = study_header(args)
    for row in json.loads(args.output.read_text())["runs"]:
        out = run_dir(args, *key(row))
        todo = missing(row)
        if not todo or not (out / "config.json").is_file():
            continue
        new = score(out, todo)
        row.update(new)
        record(args.output, header, row, key)
        print(key(row), json.dumps({k: round(v, 3) for k, v in new.items() if k.endswith("macro_f1")}), flush=True)
    report(args.output)


FEW_TARGET_DRAWS = 10  # draws of the labelled cells per trained model; their mean is the model's score


def few_target(out: Path, work: Path, ks: list[int]) -> dict:
    """The trained model in `out` with a new output layer for the target site: a logistic regression on what its
    layer reads (`head_features`), fitted on k labelled BCCD cells per class (all but one where a class has fewer),
    scored on the other cells beside the unchanged model on the same cells. What labelling a few cells at the new
    site buys, and whether the features already separate the classes the trained head confuses."""
    model, processor = load_classifier(str(out))
    target = target_set(work)
    rows = list(csv.DictReader((target / "labels.csv").open()))
    labels = np.asarray([int(r["class label"]) - 1 for r in rows])
    images = [read_image(target / f"{int(r['image ID']):03d}.bmp") for r in rows]
    data = ClassificationDataset(
        images, labels, processor["image_mean"], processor["image_std"], input_size(model, processor)
    )
    feats = head_features(model, data)
    layer = output_layer(model)
    trained = feats @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
    row = {}
    for k in ks:
        new, old, recall = [], [], []
        for draw in range(FEW_TARGET_DRAWS):
            rng = np.random.default_rng(draw)  # the same cells for every model: paired across arms and seeds
            chosen = np.concatenate(
                [rng.permutation(np.flatnonzero(labels == c))[: min(k, (labels == c).sum() - 1)] for c in set(labels)]
            )
            rest = np.setdiff1d(np.arange(len(labels)), chosen)
            probe = fit_probe({"train": feats[chosen]}, {"train": labels[chosen]}, len(CLASSES), grid=(1.0,))
            predicted = probe.proba(feats[rest])
            new.append(present_class_scores(predicted, labels[rest])["macro_f1_present"])
            recall.append([(predicted.argmax(1)[labels[rest] == c] == c).mean() for c in range(len(CLASSES))])
            old.append(present_class_scores(trained[rest], labels[rest])["macro_f1_present"])
        row[f"few_target_k{k}_macro_f1"] = float(np.mean(new))
        row[f"few_target_k{k}_trained_head_macro_f1"] = float(np.mean(old))
        row[f"few_target_k{k}_recall"] = dict(zip(CLASSES, np.mean(recall, 0).round(3).tolist()))  # which classes
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        return report(args.output)
    work = Path(args.work_dir)
    if args.rescore:  # the recorded models on the BCCD cells cut at other scales
        wanted = [source_margin() if m == "source" else float(m) for m in args.rescore]
        return revisit(
            args,
            lambda row: [m for m in wanted if f"{margin_prefix(m)}_none_macro_f1" not in row],
            lambda out, todo: {k: v for m in todo for k, v in score_target(out, work, m).items()},
        )
    if args.few_target:  # the recorded models with a new output layer from k labelled BCCD cells per class
        return revisit(
            args,
            lambda row: [k for k in args.few_target if f"few_target_k{k}_recall" not in row],
            lambda out, todo: few_target(out, work, todo),
        )
    header = study_header(args)
    done = {key(r) for r in json.loads(args.output.read_text()).get("runs", [])} if args.output.is_file() else set()
    for arm, augment, pool, fraction, seed in grid(args):
        if (arm, augment, pool, fraction, seed) in done:
            continue
        row = run(args, arm, augment, pool, fraction, seed, work)
        record(args.output, header, row, key)
        print(json.dumps({k: v for k, v in row.items() if "confusion" not in k}), flush=True)
    report(args.output)


if __name__ == "__main__":
    main()
