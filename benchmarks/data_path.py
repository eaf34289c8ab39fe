#!/usr/bin/env python
"""How fast the CPU side of the pre-training data path is: images per second per CPU core, before and after the
light data path (issue: "Feed the GPU"), and where the time goes.

Cases (the issue's three):
  (a) RGB, 224 px views for a ViT-B/16 (196 mask-noise draws), from a folder of JPEGs: the real BCCD smears
      (640 x 480) in `../shared/data`, random resized crop (0.2-1 of the area), flips;
  (b) seed 001's 16 x 64 x 64 uint16 tiles cut from 16 x 256 x 256 images in a memory-mapped `.npy` pool of
      *generated* uint16 noise (speed does not depend on what the pixels show), crop, flips, 90-degree turns,
      256 mask-noise draws (patch 4);
  (c) 3D crops 96^3 from NIfTI: the real MNI152 T1 template (1 mm) that nilearn ships, MONAI crops, flips, turns.

Paths: `full` (before: decode to float32, normalise the whole image, crop and resize, flip / turn in the loader),
`light` (after: decode as stored, crop, convert only the crop, resize, then normalise / flip / turn in the loader),
`light_deferred` (after, as on a GPU: the loader stops after the resize; normalisation, flips and turns run
batched on the training device, `finish_views`, timed separately here on this CPU as `device_half`). 3D has one
path. Each row: a torch DataLoader (batch `--batch`) with 0 workers (the main process, 1 core) or 1-2 worker
processes, one torch thread each; images/s over `--batches` batches after one warm-up; per core = images/s divided
by the processes that do the loading (workers, or 1). A profile gives milliseconds per image per stage.

    python benchmarks/data_path.py              # ~3 min on 2 cores -> benchmarks/results/data_path.json and a table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from hf_medmae.data.pretraining import PretrainingDataset
from hf_medmae.data.sources import ArraySource, TiledSource, folder_source
from hf_medmae.data.transforms import Augment, Normalize, resize, view_copy
from hf_medmae.data.volumes import VolumeDataArguments, load_volumes, volume_crops
from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]
BCCD = ROOT.parent / "shared" / "data" / "bccd" / "BCCD" / "JPEGImages"


def one_thread(_=None) -> None:
    torch.set_num_threads(1)


def rate(dataset, batch: int, workers: int, batches: int) -> float:
    """Images per second of a DataLoader over `batches` batches, after one warm-up batch (workers started)."""
    draws = RandomSampler(dataset, num_samples=batch * (batches + 1), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(
        dataset, batch_size=batch, sampler=draws, num_workers=workers, worker_init_fn=one_thread if workers else None,
        prefetch_factor=4 if workers else None,
    )  # fmt: skip
    it = iter(loader)
    next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)["pixel_values"])
    return n / (time.perf_counter() - start)


def device_half(dataset: PretrainingDataset, batch: int, repeats: int = 5) -> float:
    """Images per second of `finish_batch` (normalise, flip, turn a collated batch) on this CPU, one thread."""
    from torch.utils.data import default_collate

    items = default_collate([dataset[i] for i in range(batch)])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dataset.finish_batch(dict(items))
        best = min(best, time.perf_counter() - start)
    return batch / best


def profile(source, augment: Augment, normalize: Normalize, noise: int, n: int = 100) -> dict:
    """Milliseconds per image of each stage, full path and light path, in this process."""
    stages: dict[str, float] = {}

    def add(key: str, since: float) -> float:
        now = time.perf_counter()
        stages[key] = stages.get(key, 0.0) + now - since
        return now

    for i in range(min(n, len(source))):
        gen = torch.Generator().manual_seed(i)
        t = time.perf_counter()
        image = torch.from_numpy(source[i])
        t = add("full: read as float32", t)
        image = normalize(image)
        t = add("full: normalise whole image", t)
        _, h, w = image.shape
        top, left, ch, cw = augment.crop_box(h, w, gen)
        image = resize(image[:, top : top + ch, left : left + cw], augment.image_size)
        t = add("full: crop + resize (float)", t)
        gen = torch.Generator().manual_seed(i)
        t = time.perf_counter()
        raw = source.raw(i)
        t = add("light: read as stored", t)
        crop, code = augment.draw(raw, gen)
        t = add("light: crop, convert the crop, resize", t)
        view_copy(normalize(crop), code)
        t = add("light: normalise + flip/turn (in the loader)", t)
        torch.rand(noise, generator=gen)
        add("mask noise", t)
    return {k: round(1000 * v / min(n, len(source)), 3) for k, v in stages.items()}


def rgb_case(tmp: Path) -> tuple:
    if not BCCD.is_dir():
        sys.exit(f"case (a) needs the BCCD JPEGs at {BCCD} (../shared/data beside the repo)")
    source = folder_source(str(BCCD))
    return source, Augment(224, scale=(0.2, 1.0)), 196, "BCCD smears, 640 x 480 JPEG (real), 364 files"


def tile_case(tmp: Path, images: int = 64) -> tuple:
    pool = np.random.default_rng(0).integers(0, 4096, (images, 16, 256, 256), dtype=np.uint16)
    np.save(tmp / "pool.npy", pool)
    source = TiledSource(ArraySource(tmp / "pool.npy"), 64)
    what = f"{images} x 16 x 256 x 256 uint16 (generated noise) in a memory-mapped .npy, {len(source)} tiles of 64 px"
    return source, Augment(64, scale=(0.2, 1.0), rot90=True), 256, what


def volume_case(batch: int, workers: int, batches: int) -> float:
    path = resources.files("nilearn") / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    data = load_volumes(str(path), target_spacing=None, lazy=True)
    args = VolumeDataArguments(roi_size=[96, 96, 96], samples_per_volume=64)
    crops, _ = volume_crops(data, None, args, seed=0)
    return rate(crops, batch, workers, batches)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "data_path.json"))
    args = parser.parse_args(argv)
    one_thread()
    rows, profiles = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, build in (("a_rgb224_jpeg", rgb_case), ("b_uint16_tiles", tile_case)):
            source, augment, noise, what = build(Path(tmp))
            sample = [source[i] for i in range(0, len(source), max(1, len(source) // 32))]
            stack = np.concatenate([s.reshape(s.shape[0], -1) for s in sample], axis=1)
            mean, std = stack.mean(axis=1).tolist(), stack.std(axis=1).tolist()
            profiles[case] = profile(source, augment, Normalize(mean, std), noise)
            for path in ("full", "light", "light_deferred"):
                dataset = PretrainingDataset(
                    source, mean, std, augment.image_size, augment, seed=0, mask_noise_patches=noise,
                    light=path != "full", defer_views=path == "light_deferred",
                )  # fmt: skip
                for workers in args.workers:
                    per_s = rate(dataset, args.batch, workers, args.batches)
                    rows.append(
                        dict(case=case, data=what, path=path, workers=workers, images_per_s=round(per_s, 1),
                             images_per_s_per_core=round(per_s / max(1, workers), 1))
                    )  # fmt: skip
                    print(rows[-1], flush=True)
                if path == "light_deferred":
                    per_s = round(device_half(dataset, args.batch), 1)
                    rows.append(
                        dict(case=case, data=what, path="device_half (on this CPU, 1 thread)", workers=0,
                             images_per_s=per_s, images_per_s_per_core=per_s)
                    )  # fmt: skip
                    print(rows[-1], flush=True)
    what = "MNI152 T1 1 mm NIfTI (real), 197 x 233 x 189, lazily read, 64 crops of 96^3 per volume"
    for workers in args.workers:
        per_s = volume_case(max(1, args.batch // 16), workers, args.batches)
        rows.append(
            dict(case="c_volume96_nifti", data=what, path="3D crops (MONAI)", workers=workers,
                 images_per_s=round(per_s, 1), images_per_s_per_core=round(per_s / max(1, workers), 1))
        )  # fmt: skip
        print(rows[-1], flush=True)
    result = {
        "hardware": hardware_description(),
        "cores": os.cpu_count(),
        "torch_threads_per_process": 1,
        "batch": args.batch,
        "batches": args.batches,
        "seed": 0,
        "goals_per_core": {"a_rgb224_jpeg": 400, "b_uint16_tiles": 2000},
        "profile_ms_per_image": profiles,
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(table(result))
    return result


def table(result: dict) -> str:
    lines = ["| case | path | workers | images/s | per core |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        speed = f"{r['images_per_s']:.0f} | {r['images_per_s_per_core']:.0f}"
        lines.append(f"| {r['case']} | {r['path']} | {r['workers']} | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
