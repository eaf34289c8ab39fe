"""Labelled images for classification: class folders or folder + CSV -> stratified split -> label subset -> tensors.

Two layouts a user's own data is likely to come in:

* an image folder with one sub-folder per class (`data/neutrophil/001.png`, ...);
* an image folder plus a CSV with an id/file-name column and a label column (names or integers), or
  several 0/1 columns for multi-label data. Ids may lack an extension: `filename_template`
  ("{id:03d}.bmp") turns WBC's id `1` into `001.bmp`.

Rules that matter for honest numbers (all seeded, all logged):

* **Split** (`splits.stratified_split`): scikit-learn's stratified `train_test_split`, first test, then
  validation from the rest. A class with too few examples to be stratified into a split (fewer
  than 2 left in the pool being split) stays entirely in **train**: WBC's single basophil is
  trained on and never evaluated. The split records these classes (`train_only_classes`), so
  validation/test metrics list them with support 0 and the report says why.
* **Label fraction** (`splits.label_subset`): a seeded subset of the TRAIN split only, per class
  `max(1, floor(n_c * fraction + 0.5))` examples, so every class present in train keeps at least one
  example (rounding half up: 1 basophil x 0.5 -> 1). With `strict=True`, a class that the fraction
  would leave without examples raises a DataError naming it instead of being topped up to one.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError, DataError
from .io import IMAGE_SUFFIXES, list_image_files, progress, read_image
from .splits import class_counts, label_subset, stratified_split
from .transforms import Augment, Normalize, resize

logger = logging.getLogger(__name__)


@dataclass
class LabelledImages:
    """Images with labels: `images` [C, H, W] float arrays, `labels` [N] ints or [N, K] 0/1 floats."""

    images: list[np.ndarray]
    labels: np.ndarray
    class_names: list[str]
    files: list[str]
    multi_label: bool = False

    def __len__(self) -> int:
        return len(self.images)


# ----------------------------------------------------------------------------- reading


def read_all(paths: list[Path], on_bad_file: str) -> tuple[list[np.ndarray], list[int]]:
    """Images of `paths` and the positions that were read (unreadable files skipped only on request)."""
    images, kept = [], []
    for i, path in enumerate(progress(paths, desc="reading images", unit="image")):
        try:
            images.append(read_image(path))
            kept.append(i)
        except DataError:
            if on_bad_file != "skip":
                raise
            logger.warning("skipped unreadable file %s", path)
    return images, kept


def load_class_folders(
    folder: str | Path, class_names: list[str] | None = None, on_bad_file: str = "error"
) -> LabelledImages:
    """Images under `folder/<class>/...`: one sub-folder per class.

    Args:
        folder: root folder; each direct sub-folder is a class (searched recursively for images).
        class_names: class order; default the sorted sub-folder names. Every sub-folder must be listed.
        on_bad_file: "error" or "skip" unreadable files.

    Example:
        >>> data = load_class_folders("cells/")  # doctest: +SKIP
        >>> data.class_names  # doctest: +SKIP
        ['eosinophil', 'lymphocyte', 'neutrophil']
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(
            f"image folder {root} does not exist.", "check data_dir (relative paths start at the working directory)."
        )
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not found:
        raise DataError(
            f"{root} has no class sub-folders.", "put each class's images in its own sub-folder, or give labels_csv."
        )
    names = list(class_names) if class_names else found
    classes = match_class_folders(found, names, root)
    paths, labels = [], []
    for name in found:
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        paths += files
        labels += [names.index(classes[name])] * len(files)
    images, kept = read_all(paths, on_bad_file)
    files = [str(paths[i].relative_to(root)) for i in kept]
    return LabelledImages(images, np.asarray(labels, dtype=np.int64)[kept], names, files)


def match_class_folders(found: list[str], names: list[str], root: Path) -> dict[str, str]:
    """{sub-folder: class name}: exact names first, then ignoring case (logged), each class from one folder.

    Raises:
        DataError: a folder that matches no class, or two folders that land on the same class (e.g.
            `Neutrophil` and `neutrophil` when the classes are exact-case matches of neither or one of them).
    """
    by_case = {}
    for name in names:
        by_case.setdefault(name.casefold(), []).append(name)
    classes, unknown = {}, []
    for folder in found:
        if folder in names:
            classes[folder] = folder
        elif len(by_case.get(folder.casefold(), [])) == 1:
            classes[folder] = by_case[folder.casefold()][0]
            logger.info("class folder %s matched class %r ignoring case", root / folder, classes[folder])
        else:
            unknown.append(folder)
    if unknown:
        raise DataError(
            f"sub-folders {unknown} of {root} are not in class_names {names}.",
            "add them to class_names or move them out.",
        )
    taken = {}
    for folder, name in classes.items():
        taken.setdefault(name, []).append(folder)
    clashes = [folders for folders in taken.values() if len(folders) > 1]
    if clashes:
        raise DataError(
            f"sub-folders {clashes[0]} of {root} differ only in case and would both be class "
            f"{classes[clashes[0][0]]!r}.",
            "merge them into one folder, or rename one to a class of its own.",
        )
    return classes


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"label file {path} does not exist.", "check labels_csv.")
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's byte-order mark
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in csv.DictReader(handle)]
    if not rows:
        raise DataError(f"{path} holds no rows.", "write a header line and one row per image.")
    return rows


def _check_columns(rows: list[dict], columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise DataError(
            f"{path} has no column(s) {missing}; its columns are {list(rows[0])}.",
            "set id_column / label_column(s) to those names.",
        )


def resolve_file(folder: Path, image_id: str, template: str | None) -> Path:
    """The image file of a CSV id: `template.format(id=...)`, the id itself, or id + any image suffix.

    Numeric ids are passed to the template as ints.

    Args:
        folder: image folder.
        image_id: the CSV cell, e.g. "1" or "img_7.png".
        template: e.g. "{id:03d}.bmp"; None to use the id as the file name.

    Example:
        >>> resolve_file(Path("Dataset 1"), "1", "{id:03d}.bmp")  # doctest: +SKIP
        PosixPath('Dataset 1/001.bmp')
    """
    if template:
        value = int(image_id) if image_id.lstrip("-").isdigit() else image_id
        try:
            return folder / template.format(id=value)
        except (ValueError, KeyError, IndexError) as err:
            raise DataError(
                f"filename_template {template!r} cannot format id {image_id!r} ({err}).",
                "use {id} in the template, e.g. '{id:03d}.bmp'.",
            ) from None
    path = folder / image_id
    if path.suffix.lower() in IMAGE_SUFFIXES or path.is_file():
        return path
    matches = [folder / f"{image_id}{s}" for s in sorted(IMAGE_SUFFIXES) if (folder / f"{image_id}{s}").is_file()]
    return matches[0] if matches else path


def _name_labels(
    raw: list[str], class_names: list[str] | None, label_offset: int, label_map: dict | None
) -> tuple[np.ndarray, list[str]]:
    """Raw CSV label cells -> ([N] indices, class names).

    Integers shift by `label_offset`, names look up `class_names`.
    """
    values = [label_map.get(v, v) if label_map else v for v in raw]
    values = [str(v).strip() for v in values]
    if all(v.lstrip("-").isdigit() for v in values):
        idx = np.asarray([int(v) for v in values], dtype=np.int64) - label_offset
        names = list(class_names) if class_names else [str(i) for i in range(int(idx.max()) + 1)]
        bad = sorted({int(v) for v, i in zip(values, idx) if not 0 <= i < len(names)})
        if bad:
            raise DataError(
                f"labels {bad} are out of range: with label_offset={label_offset} they map outside "
                f"0..{len(names) - 1} ({len(names)} classes {names}).",
                "set label_offset so the smallest label maps to 0 (e.g. 1 for labels 1..K), "
                "or list every class in class_names.",
            )
        return idx, names
    names = list(class_names) if class_names else sorted(set(values))
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise DataError(
            f"label names {unknown} are not in class_names {names}.",
            "add them to class_names, or fix the CSV (names are case-sensitive).",
        )
    return np.asarray([names.index(v) for v in values], dtype=np.int64), names


def _multi_hot(rows: list[dict], columns: list[str], path: Path) -> np.ndarray:
    """[N, K] 0/1 targets from K columns; anything but 0/1 is named."""
    table = [[row[c] for c in columns] for row in rows]
    bad = sorted({v for line in table for v in line if v not in {"0", "1", "0.0", "1.0"}})
    if bad:
        raise DataError(
            f"multi-label columns {columns} of {path} hold values {bad[:10]} besides 0/1.",
            "write 0 or 1 in every label column.",
        )
    return np.asarray(table, dtype=float).astype(np.float32)


def read_labels_csv(
    image_dir: str | Path,
    labels_csv: str | Path,
    id_column: str = "filename",
    label_columns: list[str] | None = None,
    filename_template: str | None = None,
    class_names: list[str] | None = None,
    label_offset: int = 0,
    label_map: dict | None = None,
    multi_label: bool = False,
) -> tuple[list[Path], np.ndarray, list[str]]:
    """The image file, label and class names of every row of a labels CSV, without reading any pixels.

    Arguments as `load_csv_labels`, which reads the images too. Every file a row names must exist.

    Returns:
        (paths, labels [N] ints or [N, K] 0/1, class names).

    Example:
        >>> paths, labels, names = read_labels_csv("Dataset 1", "Class Labels of Dataset 1.csv", "image ID",
        ...     ["class label"], "{id:03d}.bmp", label_offset=1)  # doctest: +SKIP
    """
    folder, path = Path(image_dir), Path(labels_csv)
    columns = list(label_columns or ["label"])
    if multi_label and len(columns) < 2:
        raise DataError(
            "multi-label config with single-label data: multi_label is true but only the label column "
            f"{columns} is given.",
            "list the 0/1 columns in label_columns (one per label), or set multi_label: false.",
        )
    if not multi_label and len(columns) > 1:
        raise DataError(
            f"label_columns lists {len(columns)} columns but multi_label is false.",
            "set multi_label: true, or give one label column.",
        )
    rows = _read_csv(path)
    _check_columns(rows, [id_column] + columns, path)
    paths = [resolve_file(folder, row[id_column], filename_template) for row in rows]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"{len(missing)} images listed in {path} are missing, e.g. {missing[:3]}.",
            "check data_dir and filename_template (e.g. '{id:03d}.bmp').",
        )
    if multi_label:
        return paths, _multi_hot(rows, columns, path), columns
    labels, names = _name_labels([row[columns[0]] for row in rows], class_names, label_offset, label_map)
    return paths, labels, names


def load_csv_labels(
    image_dir: str | Path,
    labels_csv: str | Path,
    id_column: str = "filename",
    label_columns: list[str] | None = None,
    filename_template: str | None = None,
    class_names: list[str] | None = None,
    label_offset: int = 0,
    label_map: dict | None = None,
    multi_label: bool = False,
    on_bad_file: str = "error",
) -> LabelledImages:
    """Images of `image_dir` labelled by a CSV: one label column (names or ints) or several 0/1 columns (multi-label).

    Args:
        image_dir: folder holding the images.
        labels_csv: CSV with a header line.
        id_column: column with the file name or id of each image.
        label_columns: one column (single-label) or several 0/1 columns (multi-label; they name the classes).
        filename_template: turns an id into a file name, e.g. "{id:03d}.bmp"; default: the id, with any image suffix.
        class_names: class order (single-label); default the sorted distinct labels.
        label_offset: subtracted from integer labels (1 for labels 1..K).
        label_map: {raw CSV value: class name or integer} applied before everything else.
        multi_label: the config expects several 0/1 columns.
        on_bad_file: "error" or "skip" unreadable images.

    Example:
        >>> classes = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]  # doctest: +SKIP
        >>> wbc = load_csv_labels("Dataset 1", "Class Labels of Dataset 1.csv", "image ID", ["class label"],
        ...     "{id:03d}.bmp", classes, 1)  # doctest: +SKIP
    """
    paths, labels, names = read_labels_csv(
        image_dir,
        labels_csv,
        id_column,
        label_columns,
        filename_template,
        class_names,
        label_offset,
        label_map,
        multi_label,
    )
    images, kept = read_all(paths, on_bad_file)
    return LabelledImages(images, labels[kept], names, [paths[i].name for i in kept], multi_label)


class LabelLayout(Protocol):
    """How labelled images are laid out (the fields of `run_classification.py`'s data arguments)."""

    data_dir: str | None
    labels_csv: str | None
    id_column: str
    label_column: str
    label_columns: list[str] | None
    filename_template: str | None
    class_names: list[str] | None
    label_offset: int
    label_map: dict | None
    multi_label: bool
    on_bad_file: str


def _csv_labelled(folder: str | Path, labels_csv: str, layout: LabelLayout, class_names: list[str] | None):
    return load_csv_labels(
        folder,
        labels_csv,
        layout.id_column,
        layout.label_columns or [layout.label_column],
        layout.filename_template,
        class_names,
        layout.label_offset,
        layout.label_map,
        layout.multi_label,
        layout.on_bad_file,
    )


def load_labelled(layout: LabelLayout) -> LabelledImages:
    """The training images of either layout: `data_dir` with class sub-folders, or `data_dir` + `labels_csv`.

    Args:
        layout: The data arguments (see `LabelLayout`).

    Example:
        >>> data = load_labelled(classify.DataArguments(data_dir="cells/"))  # doctest: +SKIP
    """
    if layout.data_dir is None:
        raise ConfigError(
            "data_dir is not set, so there are no images to train on.",
            "set data_dir (a folder of class sub-folders, or the images labels_csv names), or use --predict_only.",
        )
    if layout.labels_csv is not None:
        return _csv_labelled(layout.data_dir, layout.labels_csv, layout, layout.class_names)
    if layout.multi_label:
        raise DataError(
            "multi-label config with single-label data: class sub-folders give one label per image.",
            "give a labels_csv with one 0/1 column per label, or set multi_label: false.",
        )
    return load_class_folders(layout.data_dir, layout.class_names, layout.on_bad_file)


def read_prediction_set(
    source: str, labels_csv: str | None, layout: LabelLayout, class_names: list[str], pattern: str = "*"
) -> LabelledImages:
    """Images to classify: a CSV-labelled folder, a folder of class sub-folders (labelled), or plain images
    (labels -1).

    Args:
        source: A folder or one image file.
        labels_csv: The folder's labels CSV (columns as in `layout`), or None.
        layout: The data arguments (see `LabelLayout`).
        class_names: The classifier's classes, in its order.
        pattern: Which files of a plain folder are images, e.g. "*.bmp".
    """
    path = Path(source)
    if labels_csv:
        return _csv_labelled(path, labels_csv, layout, class_names)
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        return load_class_folders(path, class_names, layout.on_bad_file)
    files = [path] if path.is_file() else list_image_files(path, pattern=pattern)
    if not files:
        raise DataError(
            f"no images found in {source} (pattern {pattern!r}).", "point predict_data at an image folder or file."
        )
    images, kept = read_all(files, layout.on_bad_file)
    return LabelledImages(images, np.full(len(kept), -1), class_names, [files[i].name for i in kept])


def split_labelled(
    data: LabelledImages,
    validation_fraction: float,
    test_fraction: float,
    train_fraction: float,
    seed: int,
    strict_fraction: bool = False,
    split_seed: int | None = None,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Split indices {"train" (the label subset), "val", "test"} and the classes kept in train only.

    Args:
        data: The labelled images.
        validation_fraction: Share of the images for validation (must leave it non-empty).
        test_fraction: Share of the images for test.
        train_fraction: Share of the TRAIN split's labels used (`splits.label_subset`).
        seed: Seed of the label subset (and of the split, unless `split_seed`).
        strict_fraction: Error instead of keeping one example of a class the fraction empties.
        split_seed: Seed of the split alone: several seeds then share one split and draw their own labels.
    """
    split_seed = seed if split_seed is None else split_seed
    split = stratified_split(data.labels, data.class_names, validation_fraction, test_fraction, split_seed)
    subset = label_subset(data.labels[split.train], data.class_names, train_fraction, seed, strict_fraction)
    if len(split.val) == 0:
        raise DataError(
            "the validation split is empty, so no checkpoint can be selected.",
            "set validation_fraction > 0 (e.g. 0.15).",
        )
    parts = {"train": split.train[subset], "val": split.val, "test": split.test}
    logger.info(
        "per-class counts %s; train-only classes %s",
        {name: class_counts(data.labels[idx], data.class_names) for name, idx in parts.items()},
        split.train_only_classes,
    )
    return parts, split.train_only_classes


# ----------------------------------------------------------------------------- tensors


class ClassificationDataset(Dataset):
    """Normalised images resized to `image_size`, augmented for training; items are {"pixel_values", "labels"}.

    Args:
        images: [C, H, W] float arrays (raw intensities).
        labels: [N] class indices or [N, K] 0/1.
        image_mean, image_std: per-channel statistics (the checkpoint's, or the train split's).
        image_size: side of the model input.
        augment: training augmentation (random resized crop, flips, rot90); None = plain resize (evaluation).
        with_ids: items also carry `sample_ids` (the index) and, when augmented, `view_ids` (the flips and
            rotation drawn, `Augment.with_view`): what the classifier's token dropping reads its maps by.

    Example:
        >>> augment = Augment(64, (0.5, 1), rot90=True)  # doctest: +SKIP
        >>> ds = ClassificationDataset(data.images, data.labels, mean, std, 64, augment)  # doctest: +SKIP
        >>> ds[0]["pixel_values"].shape  # doctest: +SKIP
        torch.Size([3, 64, 64])
    """

    def __init__(
        self,
        images: list[np.ndarray],
        labels: np.ndarray,
        image_mean,
        image_std,
        image_size: int,
        augment: Augment | None = None,
        with_ids: bool = False,
    ):
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels.", "give one label per image.")
        self.images = [torch.from_numpy(np.ascontiguousarray(im)) for im in images]
        self.labels = torch.as_tensor(labels)
        self.normalize = Normalize(image_mean, image_std)
        self.image_size, self.augment, self.with_ids = image_size, augment, with_ids

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        # evaluation resizes the whole image: a central crop could cut off the cell being classified
        if self.augment is None:
            image, view = resize(self.normalize(self.images[index]), self.image_size), None
        else:
            image, view = self.augment.view(self.images[index], self.normalize)
        item = {"pixel_values": image, "labels": self.labels[index]}
        if self.with_ids:
            item["sample_ids"] = index
            if view is not None:
                item["view_ids"] = view
        return item


__all__ = [
    "LabelLayout",
    "LabelledImages",
    "load_class_folders",
    "load_labelled",
    "match_class_folders",
    "read_prediction_set",
    "split_labelled",
    "load_csv_labels",
    "read_labels_csv",
    "resolve_file",
    "ClassificationDataset",
]
