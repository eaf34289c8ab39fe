#!/usr/bin/env python
"""Peak memory and speed of `run_mae.py` as the pool grows, for each input kind (issue: "Scale").

Generated pixels (uniform uint16 noise, 16 channels): this measures memory and throughput, not quality.
For each kind and pool size, `run_mae.py` (quickstart model: 192-d x 4 encoder, 128-d x 2 decoder,
64 px, patch 8, batch 32) trains `--steps` steps in a fresh process; the table gives that process's
peak resident memory (`getrusage` of the child) and the Trainer's training img/s.

Kinds: `npy` (memory-mapped .npy), `tiff` (a folder of 16-channel TIFFs, read per item), `arrow`
(a `datasets` save_to_disk folder, memory-mapped Arrow), `stream` (the same folder streamed), and
`in_memory` (the .npy read whole into RAM first: the old behaviour, for comparison), plus `npy_tiled`:
16 x 256 x 256 images tiled on the fly into 64 x 64 tiles.

    python benchmarks/data_scale.py       # 1k, 4k, 16k images; ~15 min and ~7 GiB of disk on 2 CPU cores
    python benchmarks/data_scale.py --sizes 1024 --kinds npy in_memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]
MODEL = [
    "--image_size",
    "64",
    "--patch_size",
    "8",
    "--hidden_size",
    "192",
    "--num_hidden_layers",
    "4",
    "--num_attention_heads",
    "4",
    "--intermediate_size",
    "512",
    "--decoder_hidden_size",
    "128",
    "--decoder_num_hidden_layers",
    "2",
    "--decoder_num_attention_heads",
    "2",
    "--decoder_intermediate_size",
    "256",
    "--mask_ratio",
    "0.5",
    "--norm_pix_loss",
    "false",
]
KINDS = ("npy", "tiff", "arrow", "stream", "in_memory", "npy_tiled")


def make_npy(path: Path, n: int, side: int = 64) -> Path:
    if not path.is_file():
        out = np.lib.format.open_memmap(
            path.with_suffix(".partial.npy"), mode="w+", dtype=np.uint16, shape=(n, 16, side, side)
        )
        rng = np.random.default_rng(0)
        for start in range(0, n, 256):
            out[start : start + 256] = rng.integers(0, 4096, (min(256, n - start), 16, side, side), dtype=np.uint16)
        out.flush()
        del out
        path.with_suffix(".partial.npy").rename(path)
    return path


def make_tiffs(folder: Path, npy: Path, n: int) -> Path:
    import tifffile

    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        arr = np.load(npy, mmap_mode="r", allow_pickle=False)
        for i in range(n):
            tifffile.imwrite(folder / f"{i:05d}.tif", np.asarray(arr[i]))
        (folder / "done").write_text("")
    return folder


def make_arrow(folder: Path, npy: Path, n: int) -> Path:
    import datasets

    if not (folder / "state.json").is_file():
        arr = np.load(npy, mmap_mode="r", allow_pickle=False)
        features = datasets.Features({"image": datasets.Array3D(shape=(16, 64, 64), dtype="uint16")})
        ds = datasets.Dataset.from_generator(
            lambda: ({"image": np.asarray(arr[i])} for i in range(n)), features=features
        )
        ds.save_to_disk(str(folder))
    return folder


def measure(kind: str, source: list[str], steps: int, out: Path, threads: int = 2) -> dict:
    """One run_mae.py in a child process; its peak RSS (ru_maxrss of the waited child) and the Trainer's img/s."""
    args = [
        str(ROOT / "run_mae.py"),
        *source,
        *MODEL,
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        "32",
        "--save_strategy",
        "no",
        "--eval_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--validation_fraction",
        "0.02",
        "--dataloader_num_workers",
        "0",
        "--attn_implementation",
        "sdpa",
        "--output_dir",
        str(out),
        "--logging_steps",
        str(steps),
    ]
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(r.stderr[-3000:] if r.returncode else ''); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
    )
    code, max_rss_kib = (int(v) for v in done.stdout.split()[-2:])
    if code:
        raise SystemExit(f"{kind}: run_mae.py failed:\n{done.stderr}")
    results = json.loads((out / "all_results.json").read_text())
    return dict(
        peak_rss_mib=round(max_rss_kib / 1024),
        train_img_per_s=round(results["train_samples_per_second"], 1),
        wall_s=round(time.time() - start, 1),
        train_images=results.get("num_train_images"),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each run")
    p.add_argument(
        "--repeats", type=int, default=1, help="measure each (kind, size) this many times, alternating kinds"
    )
    p.add_argument("--work-dir", default=str(ROOT / "outputs" / "data_scale"))
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "data_scale.json"))
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, repeat in ((n, r) for n in args.sizes for r in range(args.repeats)):
        npy = make_npy(work / f"pool{n}.npy", n)
        for kind in args.kinds:
            if kind == "in_memory" and n > 4096:
                continue  # 16k images are 4 GiB as float32: the point is made at 4k
            if kind == "npy_tiled":
                tiled = make_npy(
                    work / f"pool{n // 16}x256.npy", n // 16, 256
                )  # the same pixels count as n 64-px images
                source = ["--train_data", str(tiled), "--tile_size", "64"]
            elif kind in ("npy", "in_memory"):
                source = ["--train_data", str(npy), "--in_memory", str(kind == "in_memory").lower()]
            elif kind == "tiff":
                source = ["--train_data", str(make_tiffs(work / f"tiff{n}", npy, n))]
            else:
                arrow = make_arrow(work / f"arrow{n}", npy, n)
                source = ["--train_data", f"hf:{arrow}"] + (
                    ["--streaming", "true", "--validation_data", str(make_npy(work / "val64.npy", 64))]
                    if kind == "stream"
                    else []
                )
            row = dict(
                kind=kind,
                images=n,
                repeat=repeat,
                pool_gib=round(n * 16 * 64 * 64 * 2 / 2**30, 2),
                **measure(kind, source, args.steps, work / f"run_{kind}_{n}", args.threads),
            )
            rows.append(row)
            print(
                f"{kind:>10} {n:>6} images ({row['pool_gib']:.2f} GiB uint16): peak RSS {row['peak_rss_mib']:>5} MiB, "
                f"{row['train_img_per_s']:>6.1f} img/s",
                flush=True,
            )
    info = dict(
        hardware=hardware_description(),
        threads=args.threads,
        steps=args.steps,
        batch=32,
        data="generated uint16 noise, 16 x 64 x 64 (npy_tiled: 16 x 256 x 256 cut into 64-px tiles)",
        rows=rows,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(info, indent=2))
    print("\n| kind | images | pool (uint16) | peak RSS | train img/s |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['images']} | {r['pool_gib']:.2f} GiB | {r['peak_rss_mib']} MiB | "
            f"{r['train_img_per_s']} |"
        )
    print(f"hardware: {info['hardware']}; wrote {args.output}")


if __name__ == "__main__":
    main()
