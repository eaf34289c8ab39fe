#!/usr/bin/env python
"""Label efficiency on WBC (seed 000's study): fraction of labels x four arms x seeds, each run to convergence.

Arms, all through `run_classification.py`'s task on `configs/wbc_classification.yaml` (so they share the
split, augmentation, schedule, selection on validation and metrics):
- `cnn`: the MONAI CNN a practitioner would otherwise train (`--architecture`, from scratch);
- `vit_scratch`: the ViT from random weights;
- `mae_finetune`: the same ViT initialised from an MAE, fully fine-tuned;
- `mae_frozen`: that MAE's frozen mean-pooled features + logistic regression (`mode: frozen_features`).

Each seed draws its own stratified train / validation / test split (the task's own `stratified_split`) and
its own label subsets. The seed's MAE is pre-trained (recipe from `mae_recipe.py`) on that seed's
training images only, without labels, plus the external BCCD white-cell crops when the recipe says so:
it never sees a validation or test image.

Every run's result is written to the JSON as it finishes and runs already there are skipped, so the
study can be completed over several sessions:

    python studies/label_efficiency.py                                   # all arms, fractions, seeds 0-4
    python studies/label_efficiency.py --arms mae_frozen cnn --seeds 0 1  # a part
    python studies/label_efficiency.py --report                          # table, curve and confidence from the JSON

Macro precision / recall / F1 are over the classes present in the test split: WBC's single basophil
stays in train (too rare to stratify).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from mae_recipe import BASE, RECIPES, bccd_cells, pretrain

from hf_medmae.data.classification import load_labelled
from hf_medmae.data.splits import stratified_split
from hf_medmae.data.transforms import resize
from hf_medmae.evaluation.results import locked, record, write_json
from hf_medmae.plots import plot_label_efficiency
from hf_medmae.tasks import classify
from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]
WBC = ROOT.parent / "shared" / "data" / "wbc_zheng2018"
CONFIG = ROOT / "configs" / "wbc_classification.yaml"
# v2: at most 50 evaluations per run (`max_evaluations`); v1 evaluated and saved every epoch, 2,000 times at 1% labels.
PROTOCOL = "converged-4-arms-v2"
DEFAULT_RECIPE = "steps6400"  # the recipe search's winner, as configs/wbc_mae.yaml
ARMS = ("cnn", "vit_scratch", "mae_finetune", "mae_frozen")
METRICS = ("accuracy", "macro_precision_present", "macro_recall_present", "macro_f1_present")
HEADERS = ("accuracy", "precision", "recall", "F1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 0.5, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument(
        "--recipe",
        default=None,
        choices=list(RECIPES),
        help=f"the MAE pre-training recipe (mae_recipe.py); default: the JSON's, or {DEFAULT_RECIPE} for a new study",
    )
    p.add_argument("--cnn", default="resnet10", help="the CNN arm's --architecture")
    p.add_argument(
        "--extra",
        default="",
        help="flags added to every run_classification call, one string (--extra='--max_steps 20': a smoke run)",
    )
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the recipe's steps (smoke runs)")
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "label_efficiency"))
    p.add_argument("--output", default=str(ROOT / "studies" / "results" / "label_efficiency.json"))
    p.add_argument("--report", action="store_true", help="only summarise the JSON")
    args = p.parse_args(argv)
    args.extra = shlex.split(args.extra)
    return args


def wbc_args() -> list[str]:
    return ["--data_dir", str(WBC / "Dataset 1"), "--labels_csv", str(WBC / "Class Labels of Dataset 1.csv")]


def seed_mae(args: argparse.Namespace, seed: int, work: Path) -> Path:
    """The seed's MAE, pre-trained on its training images (and the recipe's external pool), reused if present."""
    out = work / (
        f"mae_seed{seed}" if args.recipe == "foreground" else f"mae_{args.recipe}_seed{seed}"
    )  # foreground: the first study's
    if (out / "model.safetensors").is_file():
        return out
    recipe = {**BASE, **RECIPES[args.recipe]}
    if args.pretrain_steps:
        recipe["steps"] = args.pretrain_steps
    data_args = classify.DataArguments(
        data_dir=str(WBC / "Dataset 1"),
        labels_csv=str(WBC / "Class Labels of Dataset 1.csv"),
        id_column="image ID",
        label_column="class label",
        filename_template="{id:03d}.bmp",
        label_offset=1,
        class_names=["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"],
    )
    data = load_labelled(data_args)
    split = stratified_split(
        data.labels, data.class_names, 0.15, 0.2, seed
    )  # as the config's validation/test fractions
    size = recipe["image_size"]
    pool = [resize(torch.from_numpy(data.images[i]).float(), size).numpy() for i in split.train]
    pool += bccd_cells(size) if "bccd" in recipe["pool"] else []
    work.mkdir(parents=True, exist_ok=True)
    pretrain(recipe, np.stack(pool).astype(np.float32), out)
    (out / "pretraining_pool.json").write_text(
        json.dumps(
            {
                "recipe": args.recipe,
                **recipe,
                "wbc_train_files": [data.files[i] for i in split.train],
                "images": len(pool),
            },
            indent=1,
        )
    )
    return out


def run_arm(args: argparse.Namespace, arm: str, fraction: float, seed: int, work: Path) -> dict:
    named = (
        arm.startswith("mae") and args.recipe != "foreground"
    )  # the first study's MAE runs carry no recipe in their name
    out = work / (f"{arm}_{args.recipe}_f{fraction}_s{seed}" if named else f"{arm}_f{fraction}_s{seed}")
    flags = {
        "cnn": ["--architecture", args.cnn],
        "vit_scratch": ["--init", "scratch", "--model_name_or_path", "null"],
        "mae_finetune": ["--init", "mae", "--model_name_or_path", str(seed_mae(args, seed, work))]
        if arm == "mae_finetune"
        else [],
        "mae_frozen": [
            "--init",
            "mae",
            "--mode",
            "frozen_features",
            "--model_name_or_path",
            str(seed_mae(args, seed, work)),
        ]
        if arm == "mae_frozen"
        else [],
    }[arm]
    if arm.startswith("mae"):
        pool = json.loads((seed_mae(args, seed, work) / "pretraining_pool.json").read_text())
        flags += ["--image_size", str(pool["image_size"])]
    start = time.time()
    metrics = classify.main(
        [
            "--config",
            str(CONFIG),
            *wbc_args(),
            "--train_fraction",
            str(fraction),
            "--seed",
            str(seed),
            "--output_dir",
            str(out),
            "--disable_tqdm",
            "true",
            *flags,
            *args.extra,
        ]
    )
    report = json.loads((out / "test_metrics.json").read_text())
    if arm.startswith("mae"):  # the MAE never saw an evaluation image
        splits = json.loads((out / "splits.json").read_text()) if (out / "splits.json").is_file() else None
        if splits is not None:
            assert not set(pool["wbc_train_files"]) & (set(splits["val"]) | set(splits["test"])), (
                "pre-training saw evaluation images"
            )
    return dict(
        arm=arm,
        fraction=fraction,
        seed=seed,
        model=args.cnn if arm == "cnn" else "vit",
        **{m: report[m] for m in METRICS},
        train_images=sum(report["class_counts"]["train"].values()),
        steps=metrics.get("global_step"),
        minutes=round((time.time() - start) / 60, 2),
        confidence=report.get("confidence"),
    )


def arm_name(arm: str, results: dict) -> str:
    """The arm as a reader would name it."""
    cnn = results.get("cnn", "resnet10").replace("resnet", "ResNet-").replace("densenet", "DenseNet-")
    return {
        "cnn": f"{cnn} from scratch",
        "vit_scratch": "ViT from scratch",
        "mae_finetune": "ViT from MAE, fine-tuned",
        "mae_frozen": "MAE frozen + logistic regression",
    }[arm]


def summarise(runs: list[dict]) -> list[dict]:
    table = []
    for fraction in sorted({r["fraction"] for r in runs}):
        for arm in ARMS:
            cell = [r for r in runs if r["arm"] == arm and r["fraction"] == fraction]
            if cell:
                row = {"fraction": fraction, "arm": arm, "seeds": len(cell)}
                for m in METRICS:
                    values = [r[m] for r in cell]
                    row[f"{m}_mean"], row[f"{m}_std"] = statistics.mean(values), statistics.pstdev(values)
                row["confidence"] = pooled_confidence(cell)
                for ref in ("vit_scratch", "cnn"):
                    if arm != ref:
                        row[f"f1_vs_{ref}"] = paired(runs, arm, ref, fraction)
                table.append(row)
    return table


def paired(runs: list[dict], arm: str, ref: str, fraction: float) -> dict | None:
    """Macro-F1 of `arm` minus `ref` in points, seed by seed: seeds differ in difficulty far more than arms do,
    so arms are compared on the seeds where both ran."""
    f1 = {(r["arm"], r["seed"]): r["macro_f1_present"] for r in runs if r["fraction"] == fraction}
    seeds = sorted(s for a, s in f1 if a == arm and (ref, s) in f1)
    if not seeds:
        return None
    points = [100 * (f1[(arm, s)] - f1[(ref, s)]) for s in seeds]
    return {
        "mean": statistics.mean(points),
        "std": statistics.stdev(points) if len(points) > 1 else 0.0,
        "seeds": seeds,
        "per_seed": points,
    }


def pooled_confidence(cell: list[dict]) -> dict:
    """Seed 000's "confidence" (probability of the predicted class) for right and wrong test predictions, pooled
    over seeds: over all classes (`all`) and per true class."""
    classes = sorted({name for r in cell for name in (r.get("confidence") or {})})
    out = {}
    for name in ["all", *classes]:
        out[name] = {}
        for kind in ("correct", "wrong"):
            n = total = 0
            for r in cell:
                for label, stats in (r.get("confidence") or {}).items():
                    if (name == "all" or label == name) and stats[kind]["count"]:
                        n, total = n + stats[kind]["count"], total + stats[kind]["count"] * stats[kind]["mean"]
            out[name][kind] = {"count": n, "mean": total / n if n else None}
    return out


def format_table(table: list[dict], results: dict) -> str:
    """Seed 000's shape: one row per (labels, arm), mean ± std over seeds per metric, and the macro-F1 gain in
    points over the ViT and the CNN from scratch, paired by seed (mean ± std over the seeds both ran)."""
    cnn = arm_name("cnn", results).removesuffix(" from scratch")
    lines = [
        "| labels | arm | seeds | " + " | ".join(HEADERS) + f" | F1 vs ViT scratch, paired | F1 vs {cnn}, paired |",
        "|" + "---|" * (5 + len(HEADERS)),
    ]
    gain = lambda d: "-" if not d else f"{d['mean']:+.1f} ± {d['std']:.1f}"  # noqa: E731
    for r in table:
        cells = [f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" for m in METRICS]
        lines.append(
            f"| {r['fraction']:.0%} | {arm_name(r['arm'], results)} | {r['seeds']} | "
            + " | ".join(cells)
            + f" | {gain(r.get('f1_vs_vit_scratch'))} | {gain(r.get('f1_vs_cnn'))} |"
        )
    return "\n".join(lines)


def report(results: dict, output: Path) -> None:
    with locked(output):  # the file as it is now, and no run another process records meanwhile is lost
        if output.is_file():
            results = json.loads(output.read_text())
        table = summarise(results["runs"])
        results["summary"] = table
        write_json(output, results)
    counts = {a: sorted(Counter(r["fraction"] for r in results["runs"] if r["arm"] == a).values()) for a in ARMS}
    seeds = {
        a: "" if not c else f" ({c[0]} seed{'s' * (c[-1] > 1)})" if c[0] == c[-1] else f" ({c[0]}–{c[-1]} seeds)"
        for a, c in counts.items()
    }
    label = lambda r: arm_name(r["arm"], results) + seeds[r["arm"]]  # noqa: E731
    rows = [{"init": label(r), "fraction": r["fraction"], "macro_f1": r["macro_f1_present"]} for r in results["runs"]]
    if rows:
        plot_label_efficiency(rows, output.with_suffix(".png"), metric="macro_f1")
    print(format_table(table, results))
    print("\nmacro-F1 gain in points per seed (seeds in order):")
    for r in table:
        for ref in ("vit_scratch", "cnn"):
            if r.get(f"f1_vs_{ref}") and r["arm"] != "vit_scratch":  # its row vs the CNN is the CNN's row negated
                d = r[f"f1_vs_{ref}"]
                print(
                    f"  {r['fraction']:>5.0%} {r['arm']:>13} vs {ref:<11}: seeds {d['seeds']}: "
                    + ", ".join(f"{x:+.0f}" for x in d["per_seed"])
                )
    print("\nconfidence (mean probability of the predicted class), right / wrong test predictions, pooled over seeds:")

    def fmt(c: dict, k: str) -> str:
        return f"{c[k]['mean']:.2f}" if c[k]["mean"] is not None else "-"

    for r in table:
        parts = []
        for name, c in r["confidence"].items():
            parts.append(
                f"{name} {fmt(c, 'correct')}/{fmt(c, 'wrong')} (n={c['correct']['count']}/{c['wrong']['count']})"
            )
        print(f"  {r['fraction']:>5.0%} {r['arm']:>13}: " + "; ".join(parts))
    print(
        f"hardware: {results['hardware']}; {len(results['runs'])} runs; "
        f"wrote {output} and {output.with_suffix('.png')}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    output, work = Path(args.output), Path(args.work_dir)
    results = json.loads(output.read_text()) if output.is_file() else {}
    if (
        results.get("protocol") == "converged-4-arms"
    ):  # v1 evaluated every epoch; frozen-feature runs do not train, so they stay
        results.update(protocol=PROTOCOL, runs=[r for r in results["runs"] if r["arm"] == "mae_frozen"], cnn=args.cnn)
    if args.recipe is None:
        args.recipe = results["recipe"]["name"] if results.get("protocol") == PROTOCOL else DEFAULT_RECIPE
    if results.get("protocol") == PROTOCOL and results["recipe"]["name"] != args.recipe and not args.report:
        # Another pre-training recipe: the MAE arms are redone on it; the CNN and scratch runs do not depend on it.
        print(
            f"recipe {results['recipe']['name']} -> {args.recipe}: its MAE runs are dropped from {output}", flush=True
        )
        results.update(
            recipe={"name": args.recipe, **BASE, **RECIPES[args.recipe]},
            runs=[r for r in results["runs"] if not r["arm"].startswith("mae")],
        )
        write_json(output, results)
    if results.get("protocol") != PROTOCOL:  # an older study's file: start anew
        results = {
            "protocol": PROTOCOL,
            "hardware": hardware_description(),
            "recipe": {"name": args.recipe, **BASE, **RECIPES[args.recipe]},
            "cnn": args.cnn,
            "config": str(CONFIG.relative_to(ROOT)),
            "extra_flags": args.extra,
            "runs": [],
        }
    done = {(r["arm"], r["fraction"], r["seed"]) for r in results["runs"]}
    output.parent.mkdir(parents=True, exist_ok=True)
    for seed in [] if args.report else args.seeds:
        for fraction in args.fractions:
            for arm in args.arms:
                if (arm, fraction, seed) in done:
                    continue
                run = run_arm(args, arm, fraction, seed, work)
                results = record(output, results, run, key=lambda r: (r["arm"], r["fraction"], r["seed"]))
                print(
                    f"{arm} {fraction:.0%} seed {seed}: accuracy {run['accuracy']:.3f}, "
                    f"macro-F1 {run['macro_f1_present']:.3f}, "
                    f"{run['steps']} steps, {run['minutes']} min",
                    flush=True,
                )
    report(results, output)


if __name__ == "__main__":
    main()
