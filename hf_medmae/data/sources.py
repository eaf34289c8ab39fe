"""Image pools that are read per item, so a pool far larger than memory trains in constant memory.

Every source is a sequence: `len(source)`, `source[i]` -> float32 [C, H, W] (raw intensities, read
from disk on access), and `source.shape(i)` -> (C, H, W) without reading pixels where the format
allows. Indexing a subset (`source.subset(indices)`) or tiling (`TiledSource`) builds an index, never
a copy of the pixels.

- `.npy`: `np.load(mmap_mode="r")`: the operating system pages in only what is read.
- `.npz`: a member cannot be memory-mapped inside the zip (it may be compressed), so it is copied once,
  in chunks, into a `.npy` beside the cache of `datasets` (`HF_DATASETS_CACHE`), keyed by the file's
  path, size and modification time; the copy is written to a temporary name and renamed when complete,
  so an interrupted conversion starts again instead of being used half-written.
- image folders and TIFF stacks: one file per item; shapes from the file headers.
- `hf:` datasets: Arrow tables, memory-mapped by `datasets`; items decoded on access.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError
from .crops import sliding_crops
from .io import _to_chw, check_finite, item_to_chw, list_image_files, progress, read_image
from .transforms import channel_moments

logger = logging.getLogger(__name__)


class ImageSource:
    """Base: a sequence of [C, H, W] float32 images read on access."""

    cheap_shapes = True  # shape(i) without decoding pixels

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def shape(self, index: int) -> tuple[int, int, int]:
        return tuple(self[index].shape)

    def raw(self, index: int) -> np.ndarray:
        """Image `index` as stored (uint8, uint16, ...; sources that can skip the float32 copy override this)."""
        return self[index]

    def crop(self, index: int, top: int, left: int, size: int, raw: bool = False) -> np.ndarray:
        """A size x size window of image `index` (sources that can read a window alone override this)."""
        return (self.raw(index) if raw else self[index])[:, top : top + size, left : left + size]

    def subset(self, indices) -> Subset:
        return Subset(self, np.asarray(indices, dtype=np.int64))


class Subset(ImageSource):
    def __init__(self, source: ImageSource, indices: np.ndarray):
        self.source, self.indices = source, indices
        self.cheap_shapes = source.cheap_shapes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.source[int(self.indices[index])]

    def raw(self, index: int) -> np.ndarray:
        return self.source.raw(int(self.indices[index]))

    def shape(self, index: int) -> tuple[int, int, int]:
        return self.source.shape(int(self.indices[index]))

    def crop(self, index: int, top: int, left: int, size: int, raw: bool = False) -> np.ndarray:
        return self.source.crop(int(self.indices[index]), top, left, size, raw)


class ListSource(ImageSource):
    """Images already in memory (the embedded data, a list built in Python)."""

    def __init__(self, images: list[np.ndarray]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.asarray(self.images[index], dtype=np.float32)

    def raw(self, index: int) -> np.ndarray:
        return np.asarray(self.images[index])

    def shape(self, index: int) -> tuple[int, int, int]:
        return tuple(self.images[index].shape)


class ArraySource(ImageSource):
    """An (N, C, H, W) or (N, H, W) array on disk, memory-mapped; items are checked for NaN/inf as read."""

    def __init__(self, path: str | Path, key: str | None = None):
        self.path, self.key = Path(path), key
        self.array, self.mapping = _open_array(self.path, key)
        if self.array.ndim not in (3, 4):
            raise DataError(
                f"{self.path} holds shape {self.array.shape}; expected (N, C, H, W).",
                "reshape the array to (N, C, H, W) before saving.",
            )
        self.grey = self.array.ndim == 3

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getstate__(
        self,
    ) -> dict:  # a worker process re-opens the mapping instead of receiving a pickled copy of the pool
        return {k: v for k, v in self.__dict__.items() if k not in ("array", "mapping")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.array, self.mapping = _open_array(self.path, self.key)

    def _checked(self, window: np.ndarray, index: int, raw: bool = False) -> np.ndarray:
        # a copy (in the stored dtype when raw): never hand out the mapping
        out = np.array(window[None] if self.grey else window, dtype=None if raw else np.float32)
        self._release(index)
        check_finite(out, f"{self.path}[{index}]")
        return out

    def _release(self, index: int) -> None:
        """Unmap the pages just read: they stay in the OS page cache (a re-read is fast) but leave this process's
        resident memory, which would otherwise grow with every image touched until it held the whole file."""
        if hasattr(mmap, "MADV_DONTNEED"):
            item = self.array.strides[0]
            start = self.array.ctypes.data - np.frombuffer(self.mapping, np.uint8, count=1).ctypes.data + index * item
            page, around = mmap.PAGESIZE, 1 << 16  # the kernel also maps up to 64 KiB around a fault ("fault-around")
            begin = max(0, (start - around) // page * page)
            end = min(len(self.mapping), -(-(start + item + around) // page) * page)
            self.mapping.madvise(mmap.MADV_DONTNEED, begin, end - begin)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._checked(self.array[index], index)

    def raw(self, index: int) -> np.ndarray:
        return self._checked(self.array[index], index, raw=True)

    def shape(self, index: int) -> tuple[int, int, int]:
        return (1, *self.array.shape[1:]) if self.grey else tuple(self.array.shape[1:])

    def crop(self, index: int, top: int, left: int, size: int, raw: bool = False) -> np.ndarray:
        item = self.array[index]
        window = (
            item[top : top + size, left : left + size] if self.grey else item[:, top : top + size, left : left + size]
        )
        return self._checked(window, index, raw)


def _open_array(path: Path, key: str | None) -> tuple[np.ndarray, mmap.mmap]:
    """The array, on a read-only mapping of the .npy (or of the cached copy of an .npz member) that we own."""
    try:
        target = path if path.suffix.lower() == ".npy" else _npz_member_as_npy(path, key)
        with open(target, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(handle)  # refuses object arrays: never unpickle user files
            if dtype.hasobject or fortran:
                raise DataError(
                    f"{path} holds an object or Fortran-ordered array.",
                    "save a plain C-ordered numeric array with numpy.save.",
                )
            offset = handle.tell()
            mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(
                mmap, "MADV_RANDOM"
            ):  # items are read in shuffled order: no read-ahead or fault-around of neighbours
                mapping.madvise(mmap.MADV_RANDOM)
        return np.ndarray(shape, dtype=dtype, buffer=mapping, offset=offset), mapping
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(
            f"cannot read array file {path} ({err}).", "save arrays with numpy.save/savez (no pickled objects)."
        ) from None


def _npz_member_as_npy(path: Path, key: str | None) -> Path:
    """The .npz member as a .npy in the cache (converted once, in 64 MiB chunks; resumable by restarting)."""
    with zipfile.ZipFile(path) as archive:
        names = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
        chosen = key or ("images" if "images" in names else names[0] if names else None)
        if chosen not in names:
            raise DataError(
                f"{path} has no array {chosen!r} (it has {names}).", "set array_key to one of those names."
            )
        stat = path.stat()
        tag = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{chosen}".encode()).hexdigest()[:16]
        cache = (
            Path(os.environ.get("HF_DATASETS_CACHE", Path.home() / ".cache" / "huggingface" / "datasets"))
            / "hf_medmae_npz"
        )
        target = cache / f"{path.stem}-{chosen}-{tag}.npy"
        if target.is_file():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        with archive.open(f"{chosen}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(member)
            if dtype.hasobject or fortran:
                raise DataError(
                    f"{path}[{chosen}] is an object or Fortran-ordered array.", "save a plain C-ordered numeric array."
                )
            partial = target.with_suffix(".partial")
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=shape)
            flat, step = out.reshape(-1), max(1, (64 << 20) // dtype.itemsize)
            for start in progress(range(0, flat.size, step), desc=f"caching {path.name}[{chosen}]", unit="chunk"):
                n = min(step, flat.size - start)
                flat[start : start + n] = np.frombuffer(member.read(n * dtype.itemsize), dtype=dtype, count=n)
            out.flush()
            del out, flat
            partial.rename(target)
            logger.info("converted %s[%s] once to the memory-mappable %s", path, chosen, target)
    return target


class FileSource(ImageSource):
    """One image file per item (PNG/JPEG/BMP/TIFF; a multi-page TIFF is one multi-channel image).

    Shapes come from the file headers when the source is built; pixels are decoded on access. With
    `on_bad_file="skip"`, a file whose header cannot be read is left out and counted in `skipped`, and a
    file that fails later while decoding is replaced by the next readable item (logged, counted in
    `skipped_at_read`), so one corrupt file among thousands does not end a long run.
    """

    def __init__(self, files: list[Path], on_bad_file: str = "error", root: Path | None = None):
        if on_bad_file not in {"error", "skip"}:
            raise DataError(
                f"on_bad_file={on_bad_file!r} is not an option.", "use on_bad_file: error or on_bad_file: skip."
            )
        self.on_bad_file, self.files, self.shapes, self.skipped, self.skipped_at_read = on_bad_file, [], [], [], []
        for path in progress(files, desc=f"indexing {root.name if root else 'files'}", unit="file"):
            try:
                self.shapes.append(header_shape(path))
                self.files.append(path)
            except DataError:
                if on_bad_file == "error":
                    raise
                self.skipped.append(str(path))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._read(index, np.float32)

    def raw(self, index: int) -> np.ndarray:
        return self._read(index, None)

    def _read(self, index: int, dtype) -> np.ndarray:
        for offset in range(len(self.files)):
            j = (index + offset) % len(self.files)
            path = self.files[j]
            try:
                image = read_image(path, dtype)
            except DataError:
                if self.on_bad_file == "error":
                    raise
                if str(path) not in self.skipped_at_read:
                    self.skipped_at_read.append(str(path))
                    logger.warning("skipping %s: it could not be decoded (on_bad_file: skip)", path)
                continue
            if tuple(image.shape) != self.shapes[j]:
                raise DataError(
                    f"{path} decoded to shape {image.shape}, its header said {self.shapes[j]}.",
                    "re-save the file; it may have been changed while training.",
                )
            return image
        raise DataError("no file of the pool could be decoded.", "check the image folder.")

    def shape(self, index: int) -> tuple[int, int, int]:
        return self.shapes[index]


def header_shape(path: Path) -> tuple[int, int, int]:
    """(C, H, W) of an image file from its header alone (raises DataError naming the file when unreadable)."""
    try:
        if path.suffix.lower() in {".tif", ".tiff"}:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape = tuple(series.shape)
                axes = series.axes
            if len(shape) == 2:
                return (1, *shape)
            if len(shape) == 3:
                return tuple(_to_chw(np.empty(shape, np.uint8), path).shape)
            raise DataError(
                f"{path}: expected a 2-D or 3-D image, got shape {shape} (axes {axes}).",
                "save one image per file as [C, H, W] or [H, W, C].",
            )
        from PIL import Image

        with Image.open(path) as image:
            return (len(image.getbands()), image.height, image.width)
    except DataError:
        raise
    except Exception as err:  # PIL and tifffile raise many kinds for a broken header
        raise DataError(
            f"cannot read image {path} ({type(err).__name__}: {err}).",
            "replace or delete the file, or set on_bad_file: skip to leave unreadable files out (they are counted).",
        ) from None


class HFSource(ImageSource):
    """An image column of a `datasets.Dataset` (Arrow, memory-mapped by `datasets`), decoded per item."""

    def __init__(self, dataset, column: str, name: str):
        # numpy format: one array per image instead of nested Python lists
        self.dataset, self.column, self.name = dataset.with_format("numpy", columns=[column]), column, name
        feature = dataset.features[column]
        self.fixed_shape = getattr(feature, "shape", None)  # Array2D/3D features have one shape for every row
        self.cheap_shapes = self.fixed_shape is not None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> np.ndarray:
        return item_to_chw(self.dataset[int(index)][self.column], f"{self.name}[{index}]")

    def shape(self, index: int) -> tuple[int, int, int]:
        if self.fixed_shape is not None:
            return tuple(_to_chw(np.empty(self.fixed_shape, np.uint8), self.name).shape)
        return tuple(self[index].shape)


def open_hf_dataset(name_or_path: str, split: str = "train", streaming: bool = False, with_ids: bool = False):
    """A `datasets` dataset from a local `save_to_disk` folder or by name (`load_dataset`), optionally streamed.

    A local folder streams as `num_shards` = min(64, rows) shards, so up to 64 processes read disjoint files;
    `with_ids` adds each row's index as `sample_ids` (local folders only; for the sharding check).
    """
    import datasets

    local = Path(name_or_path)
    if local.is_dir() and any((local / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        ds = datasets.load_from_disk(name_or_path)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        if with_ids:
            ds = ds.add_column("sample_ids", np.arange(len(ds)))
        return ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds)))) if streaming else ds
    if with_ids:
        raise DataError(
            f"record_sample_ids needs a local dataset folder; {name_or_path} is not one.",
            "drop record_sample_ids for Hub streams.",
        )
    return datasets.load_dataset(name_or_path, split=split, streaming=streaming)


def image_column(column_names: list[str], name: str, column: str | None = None) -> str:
    found = column or next((c for c in ("image", "img", "pixel_values") if c in column_names), None)
    if found is None or found not in column_names:
        raise DataError(
            f"dataset {name} has no image column (columns: {column_names}).",
            "set image_column to the column that holds the images.",
        )
    return found


def folder_source(
    folder: str | Path, on_bad_file: str = "error", max_images: int | None = None, pattern: str = "*"
) -> FileSource:
    files = list_image_files(folder, pattern=pattern)[:max_images]
    return FileSource(files, on_bad_file, root=Path(folder))


class TiledSource(ImageSource):
    """Tiles of side `tile_size` of every image (`crops.sliding_crops` without the flush border tile), as an index
    (image, top, left): nothing is copied.

    Tiles that would run past the border are dropped; an image smaller than one tile is one item, whole.
    """

    def __init__(self, source: ImageSource, tile_size: int):
        self.source, self.tile_size, self.cheap_shapes = source, tile_size, source.cheap_shapes
        index = []
        for i in range(len(source)):
            _, h, w = source.shape(i)
            if h < tile_size or w < tile_size:
                index.append((i, -1, -1))
            else:
                index += [
                    (i, top.start, left.start) for top, left in sliding_crops((h, w), (tile_size,) * 2, cover=False)
                ]
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> np.ndarray:
        i, top, left = (int(v) for v in self.index[index])
        return self.source[i] if top < 0 else self.source.crop(i, top, left, self.tile_size)

    def raw(self, index: int) -> np.ndarray:
        i, top, left = (int(v) for v in self.index[index])
        return self.source.raw(i) if top < 0 else self.source.crop(i, top, left, self.tile_size, raw=True)

    def shape(self, index: int) -> tuple[int, int, int]:
        i, top, _ = (int(v) for v in self.index[index])
        c, h, w = self.source.shape(i)
        return (c, h, w) if top < 0 else (c, self.tile_size, self.tile_size)


def base_items(source: ImageSource) -> tuple[ImageSource, np.ndarray]:
    """The source under every `Subset` / `TiledSource` wrapper, and the index there of each of `source`'s items."""
    if isinstance(source, TiledSource):
        root, index = base_items(source.source)
        return root, index[source.index[:, 0]]
    if isinstance(source, Subset):
        root, index = base_items(source.source)
        return root, index[source.indices]
    return source, np.arange(len(source))


def sample_stats(source: ImageSource, sample_size: int | None, seed: int) -> tuple[list[float], list[float], int]:
    """Per-channel mean/std from a seeded sample of `sample_size` items (all when None or larger): (mean, std, n)."""
    n = len(source) if not sample_size or sample_size >= len(source) else sample_size
    picks = (
        np.sort(np.random.default_rng(seed).choice(len(source), size=n, replace=False))
        if n < len(source)
        else range(len(source))
    )
    return channel_moments(source[int(i)] for i in progress(picks, desc="normalisation statistics", unit="image"))


def source_channels(source: ImageSource, where: str) -> int:
    """The one channel count of every item (from shapes, without reading pixels)."""
    # every item where shapes are cheap (headers, arrays); the first 100 where they need decoding (a varied hf: column)
    counts = sorted({source.shape(i)[0] for i in range(len(source) if source.cheap_shapes else min(100, len(source)))})
    if len(counts) > 1:
        raise DataError(
            f"{where} mixes images with {counts} channels.",
            "convert all images to one channel count (e.g. all RGB) before training.",
        )
    return counts[0]


def read_time_skips(source: ImageSource) -> list[str]:
    """Files a lazy folder source could index but not decode during training (this process's count)."""
    while not hasattr(source, "skipped_at_read") and hasattr(source, "source"):
        source = source.source
    return list(getattr(source, "skipped_at_read", []))


def skipped_files(indexed: list[str], sources: tuple[ImageSource, ...]) -> list[str]:
    """Every file skipped so far, once: those skipped while indexing, then those `sources` could not decode."""
    return list(dict.fromkeys(indexed + [f for source in sources for f in read_time_skips(source)]))


def read_hf_dataset(
    name_or_path: str, split: str = "train", column: str | None = None, max_images: int | None = None
) -> list[np.ndarray]:
    """Every image of a `datasets` dataset (a local `save_to_disk` folder or a name `load_dataset` knows), in memory.

    Pre-training reads the same datasets lazily (`HFSource`); this is that reader, read through.
    """
    ds = open_hf_dataset(name_or_path, split)
    if max_images:
        ds = ds.select(range(min(max_images, len(ds))))
    source = HFSource(ds, image_column(ds.column_names, name_or_path, column), name_or_path)
    return [source[i] for i in range(len(source))]


__all__ = [
    "read_hf_dataset",
    "ArraySource",
    "FileSource",
    "HFSource",
    "ImageSource",
    "ListSource",
    "Subset",
    "TiledSource",
    "base_items",
    "folder_source",
    "header_shape",
    "image_column",
    "open_hf_dataset",
    "read_time_skips",
    "sample_stats",
    "skipped_files",
    "source_channels",
]
