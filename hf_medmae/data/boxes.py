"""Objects cut out of whole images by their box annotations (Pascal VOC XML), e.g. white cells of blood smears.

A detection data set (BCCD's smears with RBC / WBC / Platelets boxes) becomes a classification or pre-training
set of one object per image, framed as a crop-level data set frames it: square, centred on the box, with some
surrounding (`margin`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import DataError
from .io import read_image


def voc_boxes(xml: str | Path, names: tuple[str, ...] | None = None) -> list[tuple[str, list[int]]]:
    """(class name, [xmin, ymin, xmax, ymax]) of every object of a Pascal VOC annotation (of `names`, if given)."""
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as err:
        raise DataError(f"cannot read the annotation {xml} ({err}).", "replace or remove the XML file.") from None
    boxes = []
    for obj in root.iter("object"):
        name = obj.findtext("name")
        if names is None or name in names:
            boxes.append(
                (name, [int(float(obj.find("bndbox").findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")])
            )
    return boxes


def square_crop(image: np.ndarray, box: list[int], margin: float = 1.2, min_side: int = 32) -> np.ndarray | None:
    """The square of side `margin` x the box's longer side, centred on the box and shifted inside the image;
    None when it would be smaller than `min_side` pixels."""
    x0, y0, x1, y1 = box
    side = int(max(x1 - x0, y1 - y0) * margin)
    h, w = image.shape[1:]
    side = min(side, h, w)
    if side < min_side:
        return None
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    left, top = min(max(0, cx - side // 2), w - side), min(max(0, cy - side // 2), h - side)
    return image[:, top : top + side, left : left + side]


def box_crops(
    images_dir: str | Path,
    annotations_dir: str | Path,
    name: str,
    margin: float = 1.2,
    only_single: bool = False,
    suffix: str = ".jpg",
) -> dict[str, np.ndarray]:
    """{image stem: crop [C, s, s]} of the boxes of class `name` (the first box when an image has several).

    Args:
        images_dir, annotations_dir: the VOC `JPEGImages` and `Annotations` folders (XML named as the image).
        name: the object class to cut out, e.g. "WBC".
        margin: crop side as a multiple of the box's longer side.
        only_single: skip images with more than one box of `name` (which one a per-image label means is unknown).
        suffix: the images' extension.

    Example:
        >>> cells = box_crops("BCCD/JPEGImages", "BCCD/Annotations", "WBC", only_single=True)  # doctest: +SKIP
        >>> len(cells), next(iter(cells.values())).shape  # doctest: +SKIP
        (341, (3, 211, 211))
    """
    crops = {}
    for xml in sorted(Path(annotations_dir).glob("*.xml")):
        boxes = voc_boxes(xml, (name,))
        if not boxes or (only_single and len(boxes) > 1):
            continue
        crop = square_crop(read_image(Path(images_dir) / f"{xml.stem}{suffix}"), boxes[0][1], margin)
        if crop is not None:
            crops[xml.stem] = np.ascontiguousarray(crop)
    return crops


__all__ = ["box_crops", "square_crop", "voc_boxes"]
