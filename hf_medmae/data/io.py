"""Reading images from disk as float32 [C, H, W] arrays: PNG/JPEG/BMP/TIFF, .npy/.npz, `datasets`.

Every reader names the file it could not read, so one corrupt image in a folder of thousands is
found in seconds rather than by bisecting a stack trace.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from ..errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
ARRAY_SUFFIXES = {".npy", ".npz"}


def _to_chw(array: np.ndarray, path: Path | str, channels_last: bool | None = None) -> np.ndarray:
    """[H, W] -> [1, H, W]; [H, W, C<=4] -> [C, H, W]; [C, H, W] stays."""
    if array.ndim == 2:
        return array[None]
    if array.ndim != 3:
        raise DataError(
            f"{path}: expected a 2-D or 3-D image, got shape {array.shape}.",
            "save one image per file as [C, H, W] or [H, W, C].",
        )
    if channels_last is None:
        channels_last = array.shape[-1] <= 4 and array.shape[0] > 4
    return np.moveaxis(array, -1, 0) if channels_last else array


def read_image(path: str | Path, dtype: type | None = np.float32) -> np.ndarray:
    """Read one image file as float32 [C, H, W] (raw intensities; no rescaling); `dtype=None`: as stored (uint8,
    uint16, ...), for a data path that crops before it converts.

    Multi-page or multi-channel TIFFs become channels (a 16-slice z-stack is a 16-channel image).

    Args:
        path: a .png/.jpg/.jpeg/.bmp/.tif/.tiff file.

    Raises:
        DataError: the file is missing, truncated, not an image, or holds NaN/inf pixels.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in {".tif", ".tiff"}:
            import tifffile

            array = _to_chw(np.asarray(tifffile.imread(path)), path)
        else:
            with Image.open(path) as img:
                img.load()  # forces decoding now, so truncated files fail here with their name
                array = _to_chw(np.asarray(img), path, channels_last=True)
    except DataError:
        raise
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise DataError(
            f"cannot read image {path} ({type(err).__name__}: {err}).",
            "replace or delete the file, or set on_bad_file: skip to leave unreadable files out (they are counted).",
        ) from None
    array = array if dtype is None else array.astype(dtype, copy=False)
    check_finite(array, str(path))
    return array


def check_finite(array: np.ndarray, name: str) -> None:
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DataError(
            f"{name} has {bad} NaN/inf pixel values.",
            "fix or drop the image; NaN pixels would turn the loss into NaN.",
        )


def list_image_files(folder: str | Path, recursive: bool = True, pattern: str = "*") -> list[Path]:
    """Image files under `folder` whose name matches `pattern` (e.g. "*.bmp"), sorted so every
    process and every run sees the same order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"image folder {folder} does not exist.",
            "check the path in train_data (relative paths start at the working directory).",
        )
    glob = f"**/{pattern}" if recursive else pattern
    return sorted(p for p in folder.glob(glob) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def progress(items, **kwargs):
    """A tqdm progress bar on a terminal, silent in logs and tests (tqdm's own `disable=None` rule)."""
    return tqdm(items, disable=None, **kwargs)


def read_image_folder(
    folder: str | Path, on_bad_file: str = "error", max_images: int | None = None, pattern: str = "*"
) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Read every image under `folder`.

    Args:
        folder: directory searched recursively.
        on_bad_file: "error" raises on the first unreadable file; "skip" leaves it out and reports it.
        max_images: read at most this many (in sorted order).
        pattern: file-name pattern, e.g. "*.bmp" to leave out masks stored beside the images.

    Returns:
        (images, names, skipped): arrays [C, H, W], their file names, and the files that were skipped.
    """
    if on_bad_file not in {"error", "skip"}:
        raise DataError(
            f"on_bad_file={on_bad_file!r} is not an option.", "use on_bad_file: error or on_bad_file: skip."
        )
    files = list_image_files(folder, pattern=pattern)[:max_images]
    images, names, skipped = [], [], []
    for path in progress(files, desc=f"reading {Path(folder).name}", unit="image"):
        try:
            images.append(read_image(path))
            names.append(str(path.relative_to(folder)))
        except DataError:
            if on_bad_file == "error":
                raise
            skipped.append(str(path))
    return images, names, skipped


def read_array_file(path: str | Path, key: str | None = None) -> np.ndarray:
    """Read an (N, C, H, W) stack from .npy or .npz (seed 001's format); [N, H, W] gets a channel axis."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)  # never unpickle user files
        if isinstance(data, np.lib.npyio.NpzFile):
            keys = list(data.keys())
            chosen = key or ("images" if "images" in keys else keys[0])
            if chosen not in keys:
                raise DataError(
                    f"{path} has no array {chosen!r} (it has {keys}).", "set array_key to one of those names."
                )
            data = data[chosen]
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(
            f"cannot read array file {path} ({err}).", "save arrays with numpy.save/savez (no pickled objects)."
        ) from None
    if data.ndim == 3:
        data = data[:, None]
    if data.ndim != 4:
        raise DataError(
            f"{path} holds shape {data.shape}; expected (N, C, H, W).",
            "reshape the array to (N, C, H, W) before saving.",
        )
    data = data.astype(np.float32, copy=False)
    check_finite(data, str(path))
    return data


def item_to_chw(item, name: str) -> np.ndarray:
    """A `datasets` image cell as float32 [C, H, W].

    PIL images are channels-last; arrays are guessed as `read_image` does.
    """
    array = _to_chw(np.asarray(item), name, channels_last=not isinstance(item, (np.ndarray, list)) or None).astype(
        np.float32, copy=False
    )
    check_finite(array, name)
    return array
