"""Large pools: lazy sources read per item, tiles as an index, sampled statistics, streaming, and 2-process sharding.

Generated pixels: these tests check reading, indexing and sharding, not what a model learns.
"""

from __future__ import annotations

import json
import mmap
import os
import re

import numpy as np
import pytest
import tifffile
import torch
from conftest import ROOT, assert_panel_grid
from PIL import Image

from hf_medmae import MedMAEForPreTraining
from hf_medmae.data.pretraining import PretrainingDataset, load_source, tile_image
from hf_medmae.data.sources import ArraySource, FileSource, TiledSource, folder_source, sample_stats
from hf_medmae.data.transforms import Augment, channel_stats
from hf_medmae.errors import ConfigError, DataError
from hf_medmae.tasks import pretrain

TINY = [
    "--image_size",
    "32",
    "--patch_size",
    "8",
    "--hidden_size",
    "32",
    "--num_hidden_layers",
    "1",
    "--num_attention_heads",
    "2",
    "--intermediate_size",
    "64",
    "--decoder_hidden_size",
    "32",
    "--decoder_num_hidden_layers",
    "1",
    "--decoder_num_attention_heads",
    "2",
    "--decoder_intermediate_size",
    "64",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--save_strategy",
    "no",
    "--attn_implementation",
    "sdpa",
    "--precision",
    "fp32",
    "--per_device_train_batch_size",
    "4",
]


def stack(n: int = 6, channels: int = 16, side: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4000, (n, channels, side, side)).astype(np.uint16)


def test_npy_is_memory_mapped_and_read_per_item(tmp_path):
    arr = stack()
    np.save(tmp_path / "pool.npy", arr)
    source, skipped = load_source(str(tmp_path / "pool.npy"))
    assert isinstance(source, ArraySource) and isinstance(source.mapping, mmap.mmap) and skipped == []
    assert len(source) == 6 and source.shape(2) == (16, 64, 64)
    assert source[2].dtype == np.float32 and np.array_equal(source[2], arr[2].astype(np.float32))
    assert np.array_equal(source.crop(3, 32, 0, 32), arr[3, :, 32:, :32].astype(np.float32))
    bad = arr.astype(np.float32)
    bad[4, 0, 1, 1] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    source = ArraySource(tmp_path / "bad.npy")
    source[3]  # a lazy source finds a NaN when it reads that image, and names it
    with pytest.raises(DataError, match=r"bad.npy\[4\] has 1 NaN"):
        source[4]


def mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = str(path) in line
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's per-mapping memory")
def test_reading_a_mapped_pool_does_not_keep_it_resident(tmp_path):
    np.save(tmp_path / "pool.npy", stack(200))  # 25 MiB
    source = ArraySource(tmp_path / "pool.npy")
    for i in np.random.default_rng(0).permutation(200):
        source[int(i)]
    plain = np.load(tmp_path / "pool.npy", mmap_mode="r")
    kept = mapped_kib(tmp_path / "pool.npy")
    for i in range(200):
        np.array(plain[i])
    assert kept < 2048 and mapped_kib(tmp_path / "pool.npy") - kept > 20_000  # a plain memmap keeps what it read


def test_npz_member_is_converted_once_to_a_memory_mapped_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    arr = stack(5, 3, 16)
    np.savez_compressed(tmp_path / "pool.npz", images=arr, labels=np.arange(5))
    source = ArraySource(tmp_path / "pool.npz")
    assert isinstance(source.mapping, mmap.mmap) and np.array_equal(source[4], arr[4].astype(np.float32))
    cached = list((tmp_path / "cache" / "hf_medmae_npz").glob("*.npy"))
    assert len(cached) == 1
    written = cached[0].stat().st_mtime_ns
    assert (
        np.array_equal(ArraySource(tmp_path / "pool.npz")[0], arr[0]) and cached[0].stat().st_mtime_ns == written
    )  # reused
    with pytest.raises(DataError, match="no array 'x'"):
        ArraySource(tmp_path / "pool.npz", key="x")


def test_folder_is_indexed_from_headers_and_bad_files_are_counted(tmp_path):
    arr = stack(4)
    for i, image in enumerate(arr):
        tifffile.imwrite(tmp_path / f"{i}.tif", image)
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "rgb.png")
    (tmp_path / "notes.tif").write_text("not an image")
    with pytest.raises(DataError, match="notes.tif"):
        folder_source(tmp_path)
    source = folder_source(tmp_path, on_bad_file="skip")
    assert source.skipped == [str(tmp_path / "notes.tif")] and len(source) == 5
    assert [source.shape(i) for i in range(5)] == [(16, 64, 64)] * 4 + [(3, 64, 64)]
    assert np.array_equal(source[1], arr[1].astype(np.float32))
    # a file whose header reads but whose pixels do not: skipped when read, replaced by the next image, counted
    png = (tmp_path / "rgb.png").read_bytes()
    (tmp_path / "rgb.png").write_bytes(png[: len(png) // 2])
    assert np.array_equal(source[4], arr[0].astype(np.float32)) and source.skipped_at_read == [
        str(tmp_path / "rgb.png")
    ]
    strict = FileSource(source.files, on_bad_file="error")
    with pytest.raises(DataError, match="rgb.png"):
        strict[4]


def test_tiles_are_an_index_with_the_materialised_tiles_values(tmp_path):
    arr = stack(3, 2, 96)
    np.save(tmp_path / "pool.npy", arr)
    tiles = TiledSource(ArraySource(tmp_path / "pool.npy").subset([0, 2]), 32)
    expected = [t for i in (0, 2) for t in tile_image(arr[i].astype(np.float32), 32)]
    assert len(tiles) == len(expected) == 18 and tiles.index.dtype == np.int64
    assert all(np.array_equal(tiles[k], expected[k]) for k in range(18))


def test_statistics_from_a_seeded_sample(tmp_path):
    images = [np.random.default_rng(i).normal(i % 7, 2.0, (2, 8, 8)).astype(np.float32) for i in range(50)]
    np.save(tmp_path / "pool.npy", np.stack(images))
    source = ArraySource(tmp_path / "pool.npy")
    mean, std, n = sample_stats(source, None, 0)
    assert n == 50 and np.allclose(mean, channel_stats(images)[0]) and np.allclose(std, channel_stats(images)[1])
    sampled = sample_stats(source, 10, 0)
    assert sampled[2] == 10 and sampled == sample_stats(source, 10, 0) and sampled[0] != mean


def test_lazy_dataset_gives_the_in_memory_items(tmp_path):
    arr = stack(4)
    np.save(tmp_path / "pool.npy", arr)
    images = [a.astype(np.float32) for a in arr]
    mean, std = channel_stats(images)
    augment = Augment(32, (0.2, 1.0), rot90=True)
    lazy = PretrainingDataset(
        ArraySource(tmp_path / "pool.npy"), mean, std, 32, augment, seed=3, mask_noise_patches=16
    )
    memory = PretrainingDataset(images, mean, std, 32, augment, seed=3, mask_noise_patches=16)
    for i in range(4):
        a, b = lazy[i], memory[i]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["noise"], b["noise"])


def test_run_mae_on_a_memory_mapped_npy_records_the_sample(tmp_path):
    np.save(tmp_path / "pool.npy", stack(12, 4, 128))
    metrics = pretrain.main(
        [
            "--train_data",
            str(tmp_path / "pool.npy"),
            "--tile_size",
            "64",
            "--stats_sample_size",
            "8",
            "--max_steps",
            "2",
            "--output_dir",
            str(tmp_path / "out"),
            *TINY,
        ]
    )
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert (
        results["normalisation_sample_images"] == 8 and metrics["num_train_images"] == 4 * 11
    )  # 11 train images x 4 tiles
    saved = MedMAEForPreTraining.from_pretrained(tmp_path / "out", use_safetensors=True).config
    assert (saved.num_channels, saved.image_size, saved.patch_size) == (4, 32, 8)  # the pool's channels, TINY's sizes


def local_dataset(path, n: int = 32):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]
    datasets.Dataset.from_dict(
        {"image": images}, features=datasets.Features({"image": datasets.Image()})
    ).save_to_disk(str(path))
    return path


def test_streaming_trains_on_a_local_dataset_and_refuses_what_it_cannot_do(tmp_path):
    data = local_dataset(tmp_path / "ds")
    base = ["--train_data", f"hf:{data}", "--streaming", "true", "--output_dir", str(tmp_path / "out"), *TINY]
    with pytest.raises(ConfigError, match="set max_steps"):
        pretrain.main([*base, "--validation_fraction", "0"])
    with pytest.raises(ConfigError, match="validation_data"):
        pretrain.main([*base, "--max_steps", "2"])
    with pytest.raises(ConfigError, match="hf: source"):
        pretrain.main(
            [
                "--train_data",
                str(tmp_path),
                "--streaming",
                "true",
                "--max_steps",
                "2",
                "--output_dir",
                str(tmp_path / "o"),
                *TINY,
            ]
        )
    metrics = pretrain.main(
        [*base, "--max_steps", "3", "--validation_data", f"hf:{data}", "--stats_sample_size", "16"]
    )
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert metrics["global_step"] == 3 and results["normalisation_sample_images"] == 16 and "eval_loss" in results
    assert_panel_grid(tmp_path / "out" / "reconstruction.png", rows=4, cols=3)  # 4 images: original, masked, recon


def test_an_interrupted_stream_resumes_where_it_stopped(tmp_path, caplog):
    data = local_dataset(tmp_path / "ds")
    base = [
        *TINY,
        "--train_data",
        f"hf:{data}",
        "--streaming",
        "true",
        "--validation_fraction",
        "0",
        "--output_dir",
        str(tmp_path / "out"),
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--record_sample_ids",
        "true",
    ]
    pretrain.main([*base, "--max_steps", "4"])
    first = json.loads((tmp_path / "out" / "sample_ids_rank0.json").read_text())
    (tmp_path / "out" / "checkpoint-4").rename(tmp_path / "later")  # as if killed after step 2
    with caplog.at_level("WARNING"):
        metrics = pretrain.main([*base, "--max_steps", "4", "--resume_from_checkpoint", "true"])
    resumed = json.loads((tmp_path / "out" / "sample_ids_rank0.json").read_text())
    assert metrics["global_step"] == 4 and "resuming a stream" in caplog.text
    assert resumed == first[len(first) // 2 :]  # steps 3-4 saw the images the uninterrupted run saw there


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lazy_folder", "stream"])
def test_two_processes_read_disjoint_shards_that_make_up_the_pool(tmp_path, kind):
    """2 CPU processes: each sees its own images, and together every image of the pool once (one epoch)."""
    import subprocess
    import sys

    if kind == "stream":
        source = [
            "--train_data",
            f"hf:{local_dataset(tmp_path / 'ds')}",
            "--streaming",
            "true",
            "--validation_fraction",
            "0",
        ]
    else:
        (tmp_path / "tifs").mkdir()
        for i, image in enumerate(stack(32, 16, 32)):
            tifffile.imwrite(tmp_path / "tifs" / f"{i:02d}.tif", image)
        source = ["--train_data", str(tmp_path / "tifs"), "--validation_fraction", "0"]
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "run_mae.py",
        *source,
        "--max_steps",
        "4",
        "--record_sample_ids",
        "true",
        "--output_dir",
        str(out),
        "--dataloader_num_workers",
        "0",
        *TINY,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = [json.loads((out / f"sample_ids_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 16  # 4 steps x batch 4 per process
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(32))
