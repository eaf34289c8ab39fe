#!/usr/bin/env python
"""Frozen-feature probe on WBC: does an MAE pre-trained on the unlabeled cells give features a task can use?

The cheap signal before any fine-tuning study. An MAE is pre-trained once with the pre-training task on
the WBC Dataset 1 images (labels never shown; resized to `--image-size`). Then each encoder turns every
image into its mean-pooled patch tokens, and scikit-learn's logistic regression (standardised features,
balanced class weights) is fitted on a stratified 70% split, or a stratified 10% of it, and scored on
the other 30% (macro-F1 over the classes present; the single basophil is left out). Compared on the
same splits: the MAE encoder, the same ViT with random weights, and raw pixels. Mean ± std over splits.

    python studies/frozen_probe.py                      # ~10 min on 2 CPU cores
    python studies/frozen_probe.py --pretrain-steps 3000 --mae-checkpoint outputs/frozen_probe/mae
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from transformers import ViTModel

from hf_medmae import load_encoder
from hf_medmae.data.classification import ClassificationDataset
from hf_medmae.data.io import read_image
from hf_medmae.data.transforms import channel_stats, resize
from hf_medmae.evaluation.probe import fit_probe, pooled_features
from hf_medmae.tasks import pretrain as pretrain_task
from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]
WBC = ROOT.parent / "shared" / "data" / "wbc_zheng2018"


def wbc(size: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, 3, size, size] float images and [N] labels 0..3 (basophil, a single image, left out)."""
    rows = list(csv.DictReader((WBC / "Class Labels of Dataset 1.csv").open(encoding="utf-8-sig")))
    keep = [(int(r["image ID"]), int(r["class label"]) - 1) for r in rows if int(r["class label"]) != 5]
    images = np.stack(
        [resize(torch.from_numpy(read_image(WBC / "Dataset 1" / f"{i:03d}.bmp")), size).numpy() for i, _ in keep]
    )
    return images.astype(np.float32), np.array([label for _, label in keep])


def features(encoder: ViTModel, images: np.ndarray, mean, std) -> np.ndarray:
    """Mean-pooled patch tokens [N, D] of `images` [N, C, S, S] (the library's `pooled_features`)."""
    dataset = ClassificationDataset(list(images), np.zeros(len(images), int), mean, std, images.shape[-1])
    return pooled_features(encoder, dataset)


def probe(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> float:
    """The library's logistic-regression probe (C=0.1) on a stratified 70% (or `fraction` of it), macro-F1 on 30%."""
    train, test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=seed)
    if fraction < 1:
        train, _ = train_test_split(train, train_size=fraction, stratify=y[train], random_state=seed)
    fitted = fit_probe({"train": x[train]}, {"train": y[train]}, int(y.max()) + 1, "logistic", grid=(0.1,))
    predicted = fitted.proba(x[test]).argmax(1)
    return float(f1_score(y[test], predicted, labels=np.unique(y[test]), average="macro"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--pretrain-steps", type=int, default=800)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument(
        "--norm-pix-loss", action="store_true", help="per-patch normalised targets (discard colour and brightness)"
    )
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--mae-checkpoint", default=None, help="skip pre-training: probe this MAE")
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "frozen_probe"))
    p.add_argument("--output", default="studies/results/frozen_probe.json")
    args = p.parse_args()
    start, work = time.time(), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    images, labels = wbc(args.image_size)
    mae = args.mae_checkpoint
    if mae is None:
        np.save(work / "unlabeled.npy", images)  # the same images, labels never shown
        mae = str(work / "mae")
        pretrain_task.main(
            [
                "--train_data",
                str(work / "unlabeled.npy"),
                "--validation_fraction",
                "0.05",
                "--output_dir",
                mae,
                "--image_size",
                str(args.image_size),
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
                str(args.mask_ratio),
                "--norm_pix_loss",
                str(args.norm_pix_loss).lower(),
                "--max_steps",
                str(args.pretrain_steps),
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
                "0",
            ]
        )
    pretrained_seconds = time.time() - start
    encoder = load_encoder(mae, image_size=args.image_size)
    torch.manual_seed(0)
    random = ViTModel(encoder.config, add_pooling_layer=False)
    mean, std = (
        encoder.image_mean or channel_stats(list(images))[0],
        encoder.image_std or channel_stats(list(images))[1],
    )
    feats = {
        "MAE encoder": features(encoder, images, mean, std),
        "same ViT, random weights": features(random, images, mean, std),
        "raw pixels": images.reshape(len(images), -1),
    }
    rows = []
    for name, x in feats.items():
        for fraction in (0.1, 1.0):
            scores = [probe(x, labels, fraction, seed) for seed in range(args.splits)]
            rows.append(
                dict(
                    features=name,
                    fraction=fraction,
                    macro_f1_mean=round(float(np.mean(scores)), 3),
                    macro_f1_std=round(float(np.std(scores)), 3),
                    scores=[round(s, 3) for s in scores],
                )
            )
            print(
                f"{name:>26}  {fraction:>4.0%} of labels  "
                f"macro-F1 {rows[-1]['macro_f1_mean']:.3f} ± {rows[-1]['macro_f1_std']:.3f}",
                flush=True,
            )
    info = dict(
        hardware=hardware_description(),
        torch=torch.__version__,
        image_size=args.image_size,
        pretrain_steps=args.pretrain_steps,
        mask_ratio=args.mask_ratio,
        norm_pix_loss=args.norm_pix_loss,
        splits=args.splits,
        mae=mae,
        mae_train_loss=json.loads(Path(mae, "all_results.json").read_text()).get("train_loss")
        if Path(mae, "all_results.json").is_file()
        else None,
        pretraining_minutes=round(pretrained_seconds / 60, 1),
        rows=rows,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(info, indent=2))
    print(f"hardware: {info['hardware']}; pre-training {info['pretraining_minutes']} min; wrote {args.output}")


if __name__ == "__main__":
    main()
