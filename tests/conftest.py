"""Shared fixtures: tiny model configs, the local test Hub, and the real data beside the repo (../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# `hub_server` / `hub_endpoint` (tests/hub_server.py) are fixtures for every test file, requested by name.
pytest_plugins = ["hub_server"]

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HF_MEDMAE_SHARED_DATA", ROOT.parent / "shared" / "data"))
BCCD = SHARED_DATA / "bccd" / "BCCD" / "JPEGImages"
WBC = SHARED_DATA / "wbc_zheng2018" / "Dataset 1"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (CI has ../shared/data beside the repo)")
    return path


@pytest.fixture
def bccd_dir() -> Path:
    return require(BCCD)


@pytest.fixture
def wbc_dir() -> Path:
    return require(WBC)


def tiny_config(**overrides):
    """The style guide's tiny config: image 32, patch 4, hidden 32, 2 layers."""
    from hf_medmae import MedMAEConfig

    values = dict(
        num_channels=3,
        image_size=32,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        mask_ratio=0.75,
        norm_pix_loss=True,
    )
    values.update(overrides)
    return MedMAEConfig(**values)


@pytest.fixture
def one_thread():
    """Two threads on two shared cores stall each other (steps vary 20x); one thread is steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def ink_runs(flags: np.ndarray, min_len: int) -> list[int]:
    """Lengths of the runs of True in a 1-D array that are at least `min_len` long."""
    edges = np.flatnonzero(np.diff(np.r_[0, flags.astype(int), 0]))
    return [int(n) for n in edges[1::2] - edges[::2] if n >= min_len]


def panel_grid(path) -> tuple[list[int], list[int]]:
    """Heights of the rows and widths of the columns of image panels in a grid figure, read from the PNG's ink:
    panels are separated by white margins; titles and legends are thinner than the 40-pixel minimum."""
    ink = (np.asarray(Image.open(path).convert("RGB")) < 250).any(-1)  # [H, W]: any non-white pixel
    heights = ink_runs(ink.any(1), 40)
    edges = np.flatnonzero(np.diff(np.r_[0, ink.any(1).astype(int), 0]))  # start, stop, start, stop, ...
    start = next(a for a, b in zip(edges[::2], edges[1::2]) if b - a >= 40)
    band = ink[start + heights[0] // 4 : start + 3 * heights[0] // 4]  # the middle of the first panel row
    return heights, ink_runs(band.any(0), 40)


def assert_panel_grid(path, rows: int, cols: int) -> None:
    """The PNG at `path` is a grid of `rows` x `cols` equal square image panels."""
    heights, widths = panel_grid(path)
    assert (len(heights), len(widths)) == (rows, cols)
    sizes = heights + widths  # square images shown square, every panel the same size (edges antialiased)
    assert max(sizes) - min(sizes) <= 4
