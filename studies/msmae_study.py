#!/usr/bin/env python
"""MSMAE vs plain MAE (seed 004): pre-training x fine-tuning with and without token dropping, on two real sets.

For each data set, seed and label fraction (10% / 100% of the training split's labels):

- pre-training on the seed's training images only (never a validation or test image), 6400 steps x 64, the
  recipe `mae_recipe.py` found converged on WBC and `configs/wbc_mae.yaml` ships (64 px, patch 8, ViT 192 x 6,
  plain-pixel loss; 800 steps, the first version of this study, was far from converged):
  * `mae`: random masking 0.75, no labels (one per data set and seed: it uses no labels);
  * `msmae`: the `attention` generator driven by a supervised CE head on the masked pass's CLS token
    (weight 0.1, balanced class weights), 45% most attended patches masked + 30% thrown, random masks
    during the warm-up, with labels for exactly the images the fine-tuning may use (`labels_csv` rows of
    that fraction's label subset; the rest of the pool is unlabeled);
- fine-tuning through `run_classification.py` on `configs/wbc_classification.yaml` (the converged schedule:
  >= 2000 steps, selection on validation), with `throw_ratio` 0 (all tokens) or 0.3 (MSMAE's dropping of the
  least attended tokens in training; all tokens at evaluation);
- and, in seconds, each pre-training's frozen mean-pooled features + logistic regression (`*_frozen`,
  `mode: frozen_features`): what the pre-training alone put into the features.

Data sets: WBC Zheng 2018 Dataset 1 (5 classes, 300 images) and BCCD cell crops (another lab's smears: every
WBC and platelet box, and as many red cells drawn by a seeded shuffle, squared, as PNGs with a labels CSV,
written once under the work dir from `../shared/data/bccd`).

Every result is written as it finishes and runs already in the JSON are skipped, so the study completes
over several sessions:

    python studies/msmae_study.py                               # everything: 2 sets x 3 seeds x 2 fractions x 4 arms
    python studies/msmae_study.py --datasets wbc --seeds 0      # a part
    python studies/msmae_study.py --report                      # table + figure from the JSON

Per fine-tuning run the JSON keeps test accuracy and macro-F1 (classes present), the Trainer's measured
training img/s, and the FLOPs per training image (torch's `FlopCounterMode`, forward + backward, eager
attention) of that model with its throw ratio. Per pre-training (while its folder is in the work dir) it keeps
its held-out reconstruction loss: on the seed's test images, whole views, under one set of random 75% masks
shared by every model (nothing thrown), against predicting the mean — how well it infers hidden patches
from random visible ones, whatever masks it trained on. `--figure` draws the attention maps of the seed-0 MAE and
MSMAE for a few test images and the masks the `attention` generator draws from them.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import os
import shlex
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_medmae.data.boxes import square_crop, voc_boxes
from hf_medmae.data.classification import load_labelled
from hf_medmae.data.io import read_image
from hf_medmae.data.splits import label_subset, stratified_split
from hf_medmae.evaluation.results import paired_ci95, record
from hf_medmae.inference.classification import load_classifier
from hf_medmae.masking import build_mask_generator
from hf_medmae.tasks import classify
from hf_medmae.tasks import pretrain as pretrain_task
from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HF_MEDMAE_SHARED_DATA", ROOT.parent / "shared" / "data"))  # as the tests find it
CONFIG = ROOT / "configs" / "wbc_classification.yaml"
PROTOCOL = "msmae-v2"  # v2: 6400 pre-training steps (v1: 800), frozen-feature arms
WBC = dict(
    data_dir=SHARED / "wbc_zheng2018" / "Dataset 1",
    labels_csv=SHARED / "wbc_zheng2018" / "Class Labels of Dataset 1.csv",
    id_column="image ID",
    label_column="class label",
    filename_template="{id:03d}.bmp",
    label_offset=1,
    class_names=["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"],
)
BCCD_CLASSES = ["RBC", "WBC", "Platelets"]
ARMS = (
    "mae",
    "mae_drop",
    "msmae",
    "msmae_drop",
    "mae_frozen",
    "msmae_frozen",
)  # pre-training x (fine-tuning, throw 0 / 0.3 | frozen)
PRETRAIN = [
    "--image_size",
    "64",
    "--patch_size",
    "8",
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
    "0.75",
    "--norm_pix_loss",
    "false",
    "--max_steps",
    "6400",
    "--per_device_train_batch_size",
    "64",
    "--learning_rate",
    "1.5e-3",
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
    "--validation_fraction",
    "0.05",
    "--save_strategy",
    "steps",
    "--save_steps",
    "400",
    "--save_total_limit",
    "1",
    "--eval_strategy",
    "no",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--logging_steps",
    "100",
    "--seed",
    "0",
]
MSMAE = [
    "--mask_generator",
    "attention",
    "--throw_ratio",
    "0.3",
    "--supervised_loss_weight",
    "0.1",
    "--class_weighting",
    "balanced",
    "--attention_refresh_epochs",
    "20",
]


def run_key(r: dict) -> tuple:
    return r["dataset"], r["arm"], r["fraction"], r["seed"]


def pretraining_key(r: dict) -> tuple:
    return r["dataset"], r["pretraining"], r["fraction"], r["seed"]


def bccd_cells(work: Path, seed: int = 0) -> dict:
    """BCCD's boxes as labelled crops (PNG + labels.csv), written once; returns the data-set flags."""
    out = work / "bccd_cells"
    spec = dict(
        data_dir=out / "images",
        labels_csv=out / "labels.csv",
        id_column="filename",
        label_column="label",
        filename_template=None,
        label_offset=0,
        class_names=BCCD_CLASSES,
    )
    if spec["labels_csv"].is_file():
        return spec
    from PIL import Image

    root = SHARED / "bccd" / "BCCD"
    boxes = [  # (file stem, class, box)
        (xml.stem, name, box)
        for xml in sorted((root / "Annotations").glob("*.xml"))
        for name, box in voc_boxes(xml, tuple(BCCD_CLASSES))
    ]
    rng = np.random.default_rng(seed)
    rbc = [b for b in boxes if b[1] == "RBC"]
    others = [b for b in boxes if b[1] != "RBC"]
    wbc = sum(b[1] == "WBC" for b in others)  # as many red cells as white ones: RBC would be ~85% of the boxes
    keep = others + [rbc[i] for i in sorted(rng.permutation(len(rbc))[:wbc])]
    spec["data_dir"].mkdir(parents=True, exist_ok=True)
    rows, images = [], {}
    for i, (stem, name, box) in enumerate(sorted(keep)):
        image = images.setdefault(stem, read_image(root / "JPEGImages" / f"{stem}.jpg"))
        crop = square_crop(image, box, margin=1.2, min_side=16)  # the cell with some surrounding, as WBC's crops
        if crop is None:
            continue
        crop = Image.fromarray(crop.transpose(1, 2, 0).astype(np.uint8))
        file = f"{i:05d}_{stem}_{name}.png"
        crop.save(spec["data_dir"] / file)
        rows.append({"filename": file, "label": name})
    with open(spec["labels_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, ["filename", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return spec


def data_flags(spec: dict) -> list[str]:
    template = spec["filename_template"]
    return [
        "--data_dir",
        str(spec["data_dir"]),
        "--labels_csv",
        str(spec["labels_csv"]),
        "--id_column",
        spec["id_column"],
        "--label_column",
        spec["label_column"],
        "--filename_template",
        template if template else "null",
        "--label_offset",
        str(spec["label_offset"]),
        "--class_names",
        json.dumps(spec["class_names"]),
    ]


def split_of(spec: dict, seed: int, fraction: float):
    """The fine-tuning split: (data, `Split`, labelled subset of its training indices).

    Drawn exactly as `run_classification.py` draws them.
    """
    data_args = classify.DataArguments(
        data_dir=str(spec["data_dir"]),
        labels_csv=str(spec["labels_csv"]),
        id_column=spec["id_column"],
        label_column=spec["label_column"],
        filename_template=spec["filename_template"],
        label_offset=spec["label_offset"],
        class_names=spec["class_names"],
    )
    data = load_labelled(data_args)
    split = stratified_split(
        data.labels, data.class_names, 0.15, 0.2, seed
    )  # the config's validation / test fractions
    subset = split.train[label_subset(data.labels[split.train], data.class_names, fraction, seed)]
    return data, split, subset


def pretrain(kind: str, name: str, spec: dict, seed: int, fraction: float, work: Path) -> Path:
    """The seed's MAE (`mae`) or MSMAE with labels for `fraction` of the training split; reused when present."""
    out = work / (f"pre_{name}_mae_s{seed}" if kind == "mae" else f"pre_{name}_msmae_f{fraction}_s{seed}")
    # study processes run side by side (one per core): one that needs a pre-training another is running waits for it
    with open(work / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "model.safetensors").is_file():
            run_pretraining(kind, name, spec, seed, fraction, work, out)
    return out


def run_pretraining(kind: str, name: str, spec: dict, seed: int, fraction: float, work: Path, out: Path) -> None:
    data, split, subset = split_of(spec, seed, fraction)
    train = split.train
    pool = work / f"{name}_pool_s{seed}"  # the seed's training images only, as links
    pool.mkdir(parents=True, exist_ok=True)
    for i in train:
        link = pool / Path(data.files[i]).name
        if not link.exists():
            with contextlib.suppress(FileExistsError):  # the other process's pre-training of this seed made it first
                os.symlink(Path(spec["data_dir"]).resolve() / Path(data.files[i]).name, link)
    # a 30-min run is interrupted in practice: resume from its newest complete checkpoint, if any (fresh otherwise)
    flags = ["--train_data", str(pool), "--output_dir", str(out), *PRETRAIN, "--resume_from_checkpoint", "true"]
    if kind == "msmae":
        rows = work / f"{out.name}_labels.csv"
        with open(rows, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            writer.writerows([Path(data.files[i]).name, data.class_names[data.labels[i]]] for i in subset)
        flags += [
            *MSMAE,
            "--labels_csv",
            str(rows),
            "--id_column",
            "filename",
            "--label_column",
            "label",
            "--class_names",
            json.dumps(data.class_names),
        ]
    pretrain_task.main(flags)
    (out / "pretraining_pool.json").write_text(
        json.dumps(
            {
                "train_files": [Path(data.files[i]).name for i in train],
                "labelled": len(subset) if kind == "msmae" else 0,
            },
            indent=1,
        )
    )


def flops_per_image(run_dir: Path, throw_ratio: float) -> float:
    """Forward + backward FLOPs of one training image through the fine-tuned model with its throw ratio.

    Counted with eager attention.
    """
    model, _ = load_classifier(str(run_dir))
    model.config.throw_ratio = throw_ratio
    model.train()
    model.vit.set_attn_implementation("eager")
    vit = model.config.vit_config
    size, channels = vit["image_size"], vit["num_channels"]
    num_patches = (size // vit["patch_size"]) ** 2
    torch.manual_seed(0)
    batch = {
        "pixel_values": torch.randn(4, channels, size, size),
        "labels": torch.zeros(4, dtype=torch.long),
        "sample_ids": torch.arange(4),
    }
    model.attention_bank = {i: torch.rand(num_patches) for i in range(4)}
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    return counter.get_total_flops() / 4


def run_arm(args, name: str, spec: dict, arm: str, fraction: float, seed: int, work: Path) -> dict:
    kind, throw, frozen = (
        arm.removesuffix("_drop").removesuffix("_frozen"),
        0.3 if arm.endswith("_drop") else 0.0,
        arm.endswith("_frozen"),
    )
    init = pretrain(kind, name, spec, seed, fraction, work)
    out = work / f"ft_{name}_{arm}_f{fraction}_s{seed}"
    start = time.time()
    classify.main(
        [
            "--config",
            str(CONFIG),
            *data_flags(spec),
            "--train_fraction",
            str(fraction),
            "--seed",
            str(seed),
            "--init",
            "mae",
            "--model_name_or_path",
            str(init),
            "--throw_ratio",
            str(throw),
            "--output_dir",
            str(out),
            "--disable_tqdm",
            "true",
            *(["--mode", "frozen_features"] if frozen else args.extra),
        ]
    )
    report = json.loads((out / "test_metrics.json").read_text())
    results = json.loads((out / "all_results.json").read_text())
    splits = json.loads((out / "splits.json").read_text())
    seen = set(json.loads((init / "pretraining_pool.json").read_text())["train_files"])
    assert not seen & {Path(f).name for f in splits["val"] + splits["test"]}, "pre-training saw evaluation images"
    return dict(
        dataset=name,
        arm=arm,
        fraction=fraction,
        seed=seed,
        throw_ratio=throw,
        accuracy=report["accuracy"],
        macro_f1_present=report["macro_f1_present"],
        train_images=sum(report["class_counts"]["train"].values()),
        steps=results.get("global_step"),
        train_img_per_s=results.get("train_samples_per_second"),
        flops_per_image=None if frozen else flops_per_image(out, throw),
        minutes=round((time.time() - start) / 60, 2),
        hardware=hardware_description(),
    )


def load_pretraining(folder: Path):
    """A pre-trained MAE (eval mode) and its normalisation as [C, 1, 1] mean and std."""
    from hf_medmae import MedMAEForPreTraining

    model = MedMAEForPreTraining.from_pretrained(str(folder), use_safetensors=True).eval()
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    return model, *(torch.tensor(pre[k])[:, None, None] for k in ("image_mean", "image_std"))


def shared_masks(count: int, model, seed: int) -> torch.Tensor:
    """Random 75% masks (codes, 1 = masked, nothing thrown) drawn from `seed` alone.

    They are the same for every model of a grid.
    """
    patches = (model.config.image_size // model.config.patch_size) ** 2
    order = torch.rand(count, patches, generator=torch.Generator().manual_seed(seed)).argsort(dim=1)
    return torch.zeros(count, patches, dtype=torch.uint8).scatter_(1, order[:, : int(0.75 * patches)], 1)


@torch.no_grad()
def held_out_reconstruction(init: Path, spec: dict, seed: int) -> dict:
    """The pre-trained MAE's reconstruction loss on the seed's test images (never seen in pre-training), resized
    whole, under the same random 75% masks for every model, and the loss of predicting the mean there."""
    from hf_medmae.data.transforms import resize

    model, mean, std = load_pretraining(init)
    data, split, _ = split_of(spec, seed, 1.0)
    x = torch.stack(
        [
            resize((torch.from_numpy(np.asarray(data.images[i])).float() - mean) / std, model.config.image_size)
            for i in split.test
        ]
    )
    codes = shared_masks(len(x), model, seed)
    out = model(x, mask_codes=codes)
    loss = out.reconstruction_loss if getattr(out, "reconstruction_loss", None) is not None else out.loss
    zero = model.reconstruction_loss(x, torch.zeros_like(out.logits), codes.float())
    state = json.loads((init / "all_results.json").read_text())
    return dict(
        test_reconstruction_loss=round(loss.item(), 4),
        mean_predictor_loss=round(zero.item(), 4),
        test_images=len(x),
        pretrain_steps=state.get("global_step"),
    )


def record_pretrainings(output: Path, results: dict, name: str, spec: dict, seed: int, fractions, work: Path) -> dict:
    """Add the held-out reconstruction of each of the seed's pre-trainings still in `work` and not yet in the JSON."""
    done = {pretraining_key(r) for r in results.get("pretrainings", [])}
    wanted = [("mae", None, work / f"pre_{name}_mae_s{seed}")] + [
        ("msmae", f, work / f"pre_{name}_msmae_f{f}_s{seed}") for f in fractions
    ]
    for kind, fraction, folder in wanted:
        if (name, kind, fraction, seed) in done or not (folder / "model.safetensors").is_file():
            continue
        item = dict(
            dataset=name,
            pretraining=kind,
            fraction=fraction,
            seed=seed,
            **held_out_reconstruction(folder, spec, seed),
            hardware=hardware_description(),
        )
        results = record(output, results, item, key=pretraining_key, field="pretrainings")
        print(
            f"{name} {kind}{'' if fraction is None else f' {fraction:.0%} labels'} seed {seed}: "
            "held-out reconstruction "
            f"{item['test_reconstruction_loss']:.3f} (predicting the mean: {item['mean_predictor_loss']:.3f})",
            flush=True,
        )
    return results


def summarise(runs: list[dict]) -> list[dict]:
    table = []
    for name in sorted({r["dataset"] for r in runs}, reverse=True):
        for fraction in sorted({r["fraction"] for r in runs}):
            for arm in ARMS:
                ref = (
                    "mae_frozen" if arm.endswith("_frozen") else "mae"
                )  # like with like: frozen vs frozen, fine-tuned vs fine-tuned
                base = {r["seed"]: r for r in runs if (r["dataset"], r["fraction"], r["arm"]) == (name, fraction, ref)}
                cell = [r for r in runs if (r["dataset"], r["fraction"], r["arm"]) == (name, fraction, arm)]
                if not cell:
                    continue
                # each seed has its own split and pre-training: compare arms within a seed
                diff = [r["macro_f1_present"] - base[r["seed"]]["macro_f1_present"] for r in cell if r["seed"] in base]
                mean_std = lambda v: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0)  # noqa: E731
                table.append(
                    dict(
                        dataset=name,
                        fraction=fraction,
                        arm=arm,
                        seeds=len(cell),
                        accuracy=mean_std([r["accuracy"] for r in cell]),
                        macro_f1=mean_std([r["macro_f1_present"] for r in cell]),
                        vs_mae=mean_std(diff) if arm != ref and diff else None,
                        vs_mae_ci95=paired_ci95(diff) if arm != ref else None,
                        img_per_s=None
                        if arm.endswith("_frozen")
                        else statistics.median(r["train_img_per_s"] for r in cell),
                        gflops=None
                        if arm.endswith("_frozen")
                        else statistics.mean(r["flops_per_image"] for r in cell) / 1e9,
                    )
                )
    return table


def arm_label(arm: str) -> str:
    kind = arm.removesuffix("_drop").removesuffix("_frozen").upper()
    return f"{kind}, " + (
        "drop 30%"
        if arm.endswith("_drop")
        else "frozen + logistic regression"
        if arm.endswith("_frozen")
        else "all tokens"
    )


def mean_sd(mean: float, sd: float, spec: str, seeds: int) -> str:
    """`mean ± sd` in the format `spec`; one seed has no spread, so only the mean."""
    return f"{mean:{spec}}" + (f" ± {sd:{spec.lstrip('+')}}" if seeds > 1 else "")


def report(results: dict, figure_path: Path | None = None) -> None:
    print(
        "| data | labels | pre-training, use | seeds | accuracy | macro-F1 "
        "| macro-F1 − MAE's, same seed (points) | its 95% interval "
        "| train img/s | GFLOPs / image |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in summarise(results["runs"]):
        speed = "— | —" if row["gflops"] is None else f"{row['img_per_s']:.0f} | {row['gflops']:.2f}"
        vs = mean_sd(100 * row["vs_mae"][0], 100 * row["vs_mae"][1], "+.1f", row["seeds"]) if row["vs_mae"] else "—"
        ci = "[{:+.1f}, {:+.1f}]".format(*(100 * v for v in row["vs_mae_ci95"])) if row["vs_mae_ci95"] else "—"
        print(
            f"| {row['dataset']} | {row['fraction']:.0%} | {arm_label(row['arm'])} | {row['seeds']} "
            f"| {mean_sd(*row['accuracy'], '.3f', row['seeds'])} "
            f"| {mean_sd(*row['macro_f1'], '.3f', row['seeds'])} | {vs} | {ci} | {speed} |"
        )
    print(
        "(± is the standard deviation over seeds; the MAE reference is fine-tuned with all tokens, "
        "or frozen for the frozen arms)"
    )
    if results.get("pretrainings"):
        print("\n| data | pre-training | labels | seed | steps | held-out reconstruction loss | predicting the mean |")
        print("|---|---|---|---|---|---|---|")
        for r in sorted(
            results["pretrainings"], key=lambda r: (r["dataset"], r["seed"], r["pretraining"], r["fraction"] or 0)
        ):
            labels = "—" if r["fraction"] is None else f"{r['fraction']:.0%}"
            print(
                f"| {r['dataset']} | {r['pretraining'].upper()} | {labels} | {r['seed']} | {r['pretrain_steps']} "
                f"| {r['test_reconstruction_loss']:.3f} | {r['mean_predictor_loss']:.3f} |"
            )
        print("(the seed's test images, whole views, the same random 75% masks for every model, nothing thrown)")
    for machine, roles in machines(results).items():
        print(f"hardware: {machine}: " + "; ".join(f"{role} {seeds}" for role, seeds in roles.items()))
    if figure_path is not None:
        plot_results(results["runs"], figure_path)
        print(f"wrote {figure_path}")


def machines(results: dict) -> dict[str, dict[str, str]]:
    """hardware -> {"pre-trainings" | "fine-tunings" | "frozen probes": "wbc seeds 0, 1, bccd seed 2"}: one seed's
    pre-trainings and fine-tunings may have run on different machines. Items without the field ran on the file's."""
    where: dict[str, dict[str, set]] = {}
    pretrainings = list(results.get("pretrainings", []))
    # a seed's pre-trainings are in the JSON only if their held-out reconstruction was recorded; the study's first
    # seeds ran before that, on the file's hardware
    known = {(r["dataset"], r["seed"]) for r in pretrainings}
    pretrainings += [
        dict(dataset=d, seed=s) for d, s in sorted({(r["dataset"], r["seed"]) for r in results["runs"]} - known)
    ]
    items = [("pre-trainings", r) for r in pretrainings] + [
        ("frozen probes" if r["arm"].endswith("_frozen") else "fine-tunings", r) for r in results["runs"]
    ]
    for role, r in items:
        where.setdefault(r.get("hardware", results["hardware"]), {}).setdefault(role, set()).add(
            (r["dataset"], r["seed"])
        )
    out = {}
    for machine, roles in where.items():
        out[machine] = {}
        for role in ("pre-trainings", "fine-tunings", "frozen probes"):
            cells = roles.get(role, set())
            parts = []
            for dataset in sorted({d for d, _ in cells}, key=lambda d: (d != "wbc", d)):
                seeds = sorted(s for d, s in cells if d == dataset)
                parts.append(f"{dataset} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
            if parts:
                out[machine][role] = ", ".join(parts)
    return out


def plot_results(runs: list[dict], path: Path) -> None:
    """Test macro-F1 per arm, one panel per data set and label fraction.

    A dot per seed (grey lines join one seed's runs: same split, same pre-trainings), a bar at the mean.
    The y axis is zoomed, not from zero, to at least 10 points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets, fractions = sorted({r["dataset"] for r in runs}, reverse=True), sorted({r["fraction"] for r in runs})
    fig, axes = plt.subplots(
        len(datasets), len(fractions), figsize=(4.6 * len(fractions), 4.4 * len(datasets)), squeeze=False
    )
    for ax, (name, fraction) in zip(axes.ravel(), [(d, f) for d in datasets for f in fractions]):  # a row per data set
        cell = [r for r in runs if (r["dataset"], r["fraction"]) == (name, fraction)]
        if not cell:
            ax.set_axis_off()
            continue
        for seed in sorted({r["seed"] for r in cell}):
            for frozen in (False, True):  # fine-tuned arms and frozen arms: two groups, a line within each
                points = [
                    (x, r["macro_f1_present"])
                    for x, arm in enumerate(ARMS)
                    for r in cell
                    if (r["arm"], r["seed"]) == (arm, seed) and arm.endswith("_frozen") == frozen
                ]
                if points:
                    ax.plot(*zip(*points), color="#cccccc", linewidth=0.8, zorder=1)
        ax.axvline(3.5, color="#999999", linewidth=0.6, linestyle=":")
        for x, arm in enumerate(ARMS):
            values = [r["macro_f1_present"] for r in cell if r["arm"] == arm]
            if values:
                colour = "#e6550d" if arm.startswith("msmae") else "#3182bd"
                ax.scatter([x] * len(values), values, color=colour, s=18, zorder=3)
                ax.hlines(statistics.mean(values), x - 0.3, x + 0.3, color=colour, linewidth=2)
        counts = [sum(r["arm"] == arm for r in cell) for arm in ARMS]
        names = [arm_label(a).replace(", ", "\n").replace("frozen + logistic regression", "frozen + LR") for a in ARMS]
        ax.set_xticks(range(len(ARMS)), [f"{n}\n(n={c})" for n, c in zip(names, counts)], fontsize=7)
        low, high = ax.get_ylim()
        if (
            high - low < 0.1
        ):  # a panel near the ceiling spans at least 10 points: a test image or two must not look like a gap
            top = min(1.005, low + 0.1)
            ax.set_ylim(top - 0.1, top)
        ax.set_title(f"{name.upper()}, {fraction:.0%} of the training labels", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("test macro-F1 (classes present)")
    fig.suptitle("MSMAE vs plain MAE pre-training: test macro-F1 per seed (dots), mean (bar)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure_models(work: Path, seed: int, count: int = 4):
    """The seed's WBC pre-trainings still in `work`, and `count` of its test images, one per class, resized whole."""
    from hf_medmae.data.transforms import resize

    data, split, _ = split_of(WBC, seed, 1.0)
    picks, seen = [], set()
    for i in split.test:  # one test image per class (never seen in pre-training)
        if data.labels[i] not in seen and len(picks) < count:
            picks.append(i)
            seen.add(data.labels[i])
    raw = torch.stack([resize(torch.from_numpy(np.asarray(data.images[i])).float(), 64) for i in picks])
    models = (
        ("MAE", f"pre_wbc_mae_s{seed}"),
        ("MSMAE 100% labels", f"pre_wbc_msmae_f1.0_s{seed}"),
        ("MSMAE 10% labels", f"pre_wbc_msmae_f0.1_s{seed}"),
    )
    titles = [f"{data.class_names[data.labels[i]]} ({Path(data.files[i]).name})" for i in picks]
    return raw, titles, [(n, work / f) for n, f in models if (work / f / "model.safetensors").is_file()]


def figure(work: Path, output: Path, seed: int = 0) -> None:
    """Attention maps of the seed's WBC MAE and MSMAEs (100% and 10% labels) on test images of each class.

    The masks they draw are shown alongside.
    """
    from hf_medmae.plots import plot_attention_masks

    raw, titles, models = figure_models(work, seed)
    maps, codes = {}, {}
    for name, folder in models:
        model, mean, std = load_pretraining(folder)
        x = (raw - mean) / std
        grid = model.config.image_size // model.config.patch_size
        with torch.no_grad():
            attention = model.cls_attention(x)
        generator = build_mask_generator(
            "attention", 0.75, (grid, grid), throw_ratio=0.3
        )  # MSMAE's masking, from either map
        drawn = generator(len(raw), scores=attention, generator=torch.Generator().manual_seed(0))
        maps[name], codes[name] = attention.reshape(-1, grid, grid).numpy(), drawn.reshape(-1, grid, grid).numpy()
    plot_attention_masks(raw.numpy(), titles, maps, codes, output)
    print(f"wrote {output}")


@torch.no_grad()
def reconstruction_figure(work: Path, output: Path, seed: int = 0) -> None:
    """The seed's WBC MAE and MSMAEs reconstructing the same test images under the same random 75% masks.

    Nothing is thrown.
    """
    from hf_medmae.plots import save_reconstruction_grid

    raw, _, models = figure_models(work, seed)
    recons = {}
    for name, folder in models:
        model, mean, std = load_pretraining(folder)
        x = (raw - mean) / std
        out = model(x, mask_codes=shared_masks(len(raw), model, seed))
        recons[name] = (
            model.reconstruct(x, out.logits, out.mask) * std + mean
        )  # back to intensities: one stretch for all
        mask, patch = out.mask, model.config.patch_size  # the same for every model: one seed, one grid
    save_reconstruction_grid(raw.numpy(), mask.numpy(), {k: v.numpy() for k, v in recons.items()}, patch, output)
    print(f"wrote {output}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["wbc", "bccd"], choices=["wbc", "bccd"])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--extra",
        default="",
        help="flags added to every run_classification call (--extra='--max_steps 20': a smoke run)",
    )
    p.add_argument(
        "--pretrain-extra", default="", help="flags added to every run_mae call (--pretrain-extra='--max_steps 10')"
    )
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "msmae_study"))
    p.add_argument("--output", default=str(ROOT / "studies" / "results" / "msmae_study.json"))
    p.add_argument("--report", action="store_true", help="only print the table from the JSON")
    p.add_argument(
        "--figure",
        default=None,
        help="draw the attention-map figure to this PNG (needs --figure-seed's WBC pre-trainings)",
    )
    p.add_argument(
        "--reconstruction-figure",
        default=None,
        help="draw the MAE and MSMAEs' reconstructions of the same test images to this PNG",
    )
    p.add_argument("--figure-seed", type=int, default=0, help="whose pre-trainings the figures show")
    args = p.parse_args(argv)
    args.extra = shlex.split(args.extra)
    PRETRAIN.extend(shlex.split(args.pretrain_extra))
    output, work = Path(args.output), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(output.read_text()) if output.is_file() else {}
    if results.get("protocol") != PROTOCOL:
        results = {
            "protocol": PROTOCOL,
            "hardware": hardware_description(),
            "config": str(CONFIG.relative_to(ROOT)),
            "pretrain_flags": PRETRAIN,
            "msmae_flags": MSMAE,
            "finetune_extra": args.extra,
            "runs": [],
        }
    output.parent.mkdir(parents=True, exist_ok=True)
    done = {run_key(r) for r in results["runs"]}
    for seed in [] if args.report or args.figure or args.reconstruction_figure else args.seeds:
        for name in args.datasets:
            spec = WBC if name == "wbc" else bccd_cells(work)
            for fraction in args.fractions:
                for arm in args.arms:
                    if (name, arm, fraction, seed) in done:
                        continue
                    run = run_arm(args, name, spec, arm, fraction, seed, work)
                    results = record(output, results, run, key=run_key)
                    print(
                        f"{name} {arm} {fraction:.0%} seed {seed}: accuracy {run['accuracy']:.3f}, "
                        f"macro-F1 {run['macro_f1_present']:.3f}, "
                        + (
                            ""
                            if run["flops_per_image"] is None
                            else f"{run['train_img_per_s']:.0f} img/s, {run['flops_per_image'] / 1e9:.2f} GFLOPs, "
                        )
                        + f"{run['minutes']} min",
                        flush=True,
                    )
            results = record_pretrainings(output, results, name, spec, seed, args.fractions, work)
    if args.figure or args.reconstruction_figure:
        if args.figure:
            figure(work, Path(args.figure), args.figure_seed)
        if args.reconstruction_figure:
            reconstruction_figure(work, Path(args.reconstruction_figure), args.figure_seed)
    elif results["runs"]:
        report(results, output.with_suffix(".png") if args.report else None)


if __name__ == "__main__":
    main()
