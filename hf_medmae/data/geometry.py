"""Where a volume's voxels lie in the patient, and the one voxel grid a model sees.

A scan's `Geometry` is its affine (voxel index -> RAS+ millimetres, as NIfTI stores it: index order (W, H, D) =
NIfTI's (i, j, k)) and its shape [D, H, W]. A `Grid` says how volumes are brought to the model: orientation made
canonical (RAS, MONAI's `Orientation`) and voxels resampled to one target spacing (MONAI's `Spacing`; images
linear, labels nearest), as nnU-Net plans it from the median spacing of the training volumes. `to_original`
takes a result on the model's grid back onto the scan's own voxels (MONAI's `SpatialResample`), so a label map
overlays the original scan in any viewer. Files without a stored geometry (TIFF, `.npy`, embedded arrays) have
1-unit voxels and an identity affine (`Geometry.known` False).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, DataError

ORIENTATIONS = ("RAS", None)


@dataclass(frozen=True)
class Geometry:
    """A volume's affine (index (W, H, D) -> RAS+ mm) and spatial shape (D, H, W).

    Example:
        >>> g = Geometry(np.diag([0.8, 0.8, 3.0, 1.0]), (40, 512, 512))
        >>> g.spacing, g.orientation
        ((3.0, 0.8, 0.8), 'RAS')
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    known: bool = True

    @classmethod
    def unknown(cls, shape: Sequence[int]) -> Geometry:
        """The geometry of a file that stores none: 1-unit voxels, identity affine."""
        return cls(np.eye(4), tuple(int(s) for s in shape), known=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sides (D, H, W) in mm."""
        sides = np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0))  # (i, j, k) = (W, H, D)
        return tuple(round(float(s), 6) for s in sides[::-1])

    @property
    def orientation(self) -> str:
        """Axis codes of (i, j, k), e.g. 'RAS' or 'LPS' (the direction each index grows towards)."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(np.asarray(self.affine)))

    def canonical(self) -> Geometry:
        """The geometry after reorienting to RAS (axes permuted and flipped, no interpolation)."""
        import nibabel as nib

        ornt = nib.orientations.io_orientation(np.asarray(self.affine))
        xyz = self.shape[::-1]
        affine = np.asarray(self.affine) @ nib.orientations.inv_ornt_aff(ornt, xyz)
        shape_xyz = [xyz[int(axis)] for axis in np.argsort(ornt[:, 0])]
        return Geometry(affine, tuple(shape_xyz[::-1]), self.known)

    def as_dict(self) -> dict:
        """For JSON: shape, spacing, orientation and the affine."""
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "orientation": self.orientation if self.known else None,
            "affine": np.round(np.asarray(self.affine, dtype=float), 6).tolist(),
        }


@dataclass(frozen=True)
class Grid:
    """How volumes are brought onto the model's voxel grid.

    Args:
        orientation: "RAS" (axes permuted/flipped to the closest RAS+ order) or None (stored voxel order).
        spacing: target voxel sides (D, H, W) in mm, or None (no resampling).
        mode: interpolation of images ("bilinear" = linear, 3 = cubic spline); labels always use "nearest".
    """

    orientation: str | None = "RAS"
    spacing: tuple[float, float, float] | None = None
    mode: str | int = "bilinear"

    def for_labels(self) -> Grid:
        return Grid(self.orientation, self.spacing, "nearest")

    def as_dict(self) -> dict:
        return {"orientation": self.orientation, "spacing": None if self.spacing is None else list(self.spacing)}


def _meta(volume: np.ndarray, affine: np.ndarray):
    from monai.data import MetaTensor

    xyz = np.ascontiguousarray(np.asarray(volume).transpose(0, 3, 2, 1))  # [C, D, H, W] -> MONAI's [C, X, Y, Z]
    return MetaTensor(torch.from_numpy(xyz), affine=torch.as_tensor(np.asarray(affine), dtype=torch.float64))


def _array(meta, dtype) -> np.ndarray:
    return np.ascontiguousarray(meta.detach().cpu().numpy().transpose(0, 3, 2, 1), dtype=dtype)


def to_grid(volume: np.ndarray, geometry: Geometry, grid: Grid) -> tuple[np.ndarray, Geometry]:
    """A volume [C, D, H, W] (or a label map [D, H, W]) on the model's grid, with its new geometry.

    Example:
        >>> v = np.zeros((1, 10, 64, 64), np.float32)
        >>> out, g = to_grid(v, Geometry(np.diag([2.0, 2.0, 4.0, 1.0]), (10, 64, 64)), Grid("RAS", (2.0, 2.0, 2.0)))
        >>> out.shape, g.spacing
        ((1, 19, 64, 64), (2.0, 2.0, 2.0))
    """
    from monai.transforms import Orientation, Spacing

    label = volume.ndim == 3
    if grid.orientation is None and grid.spacing is None:
        return volume, geometry
    if grid.spacing is not None and not geometry.known:
        raise DataError(
            "a volume without a stored voxel spacing (TIFF or .npy) cannot be resampled to millimetres.",
            "save it as NIfTI with its affine, or set target_spacing: null to keep every volume's voxels.",
        )
    meta = _meta(volume[None] if label else volume, geometry.affine)
    if grid.orientation is not None:
        meta = Orientation(axcodes=grid.orientation, labels=None)(meta)
    if grid.spacing is not None and not np.allclose(geometry.canonical().spacing, grid.spacing, rtol=1e-4):
        mode = "nearest" if label else grid.mode
        meta = Spacing(pixdim=tuple(grid.spacing)[::-1], mode=mode, padding_mode="border")(meta)
    out = _array(meta, volume.dtype)
    return (out[0] if label else out), Geometry(meta.affine.numpy(), tuple(out.shape[-3:]), geometry.known)


def to_original(volume: np.ndarray, model: Geometry, original: Geometry, mode: str = "bilinear") -> np.ndarray:
    """A volume [C, D, H, W] (scores: resample linearly, then take the argmax) or a label map [D, H, W] (nearest)
    on the model's grid `model`, taken back onto the scan's own voxels `original` (shape and affine)."""
    from monai.transforms import SpatialResample

    label = volume.ndim == 3
    if np.allclose(model.affine, original.affine, atol=1e-5) and tuple(model.shape) == tuple(original.shape):
        return volume
    meta = _meta(volume[None] if label else volume, model.affine)
    resample = SpatialResample(mode="nearest" if label else mode, padding_mode="border")
    out = resample(
        meta, dst_affine=torch.as_tensor(np.asarray(original.affine)), spatial_size=tuple(original.shape[::-1])
    )
    out = _array(out, volume.dtype)
    return out[0] if label else out


def plan_spacing(
    geometries: Sequence[Geometry], target: str | Sequence[float] | None
) -> tuple[float, float, float] | None:
    """The target spacing (D, H, W) mm: "median" of the volumes' spacings (after RAS reorientation, per axis, as
    nnU-Net plans it), the given sides, or None (keep each volume's voxels).

    Volumes without a stored spacing plan nothing under "median" when none has one; a mix is a named error.

    Example:
        >>> gs = [Geometry(np.diag([0.8, 0.8, s, 1.0]), (40, 64, 64)) for s in (1.0, 3.0, 5.0)]
        >>> plan_spacing(gs, "median")
        (3.0, 0.8, 0.8)
    """
    if target is None:
        return None
    if isinstance(target, str):
        if target != "median":
            raise ConfigError(f"target_spacing {target!r} is not understood.", "use median, [D, H, W] in mm, or null.")
        unknown = [i for i, g in enumerate(geometries) if not g.known]
        if len(unknown) == len(geometries):
            return None
        if unknown:
            raise DataError(
                f"{len(unknown)} of {len(geometries)} volumes store no voxel spacing (TIFF or .npy) while the others "
                "do, so no common millimetre grid can be planned.",
                "save every volume as NIfTI or DICOM, or set target_spacing: null to keep every volume's voxels.",
            )
        spacings = np.array([g.canonical().spacing for g in geometries])
        return tuple(round(float(s), 4) for s in np.median(spacings, axis=0))
    sides = tuple(float(s) for s in target)
    if len(sides) != 3 or min(sides) <= 0:
        raise ConfigError(
            f"target_spacing {list(target)} is not three positive voxel sides.",
            "give [D, H, W] in mm, e.g. [3, 1, 1].",
        )
    return sides


def check_same_grid(image: Geometry, other: Geometry, name: str, what: str = "label") -> None:
    """Raise a DataError when a label (or another channel) does not lie on its image's voxel grid."""
    if tuple(image.shape) != tuple(other.shape):
        problem = f"the volume is [D, H, W] {tuple(image.shape)} but its {what} is {tuple(other.shape)}"
    elif image.known and other.known and not np.allclose(image.affine, other.affine, atol=1e-3):
        problem = (
            f"its {what} has the volume's shape but another affine: spacing {list(other.spacing)} vs "
            f"{list(image.spacing)}, orientation {other.orientation} vs {image.orientation}, origin "
            f"{np.round(other.affine[:3, 3], 2).tolist()} vs {np.round(image.affine[:3, 3], 2).tolist()}"
        )
    else:
        return
    raise DataError(
        f"{name}: {problem}, so its voxels would not line up.",
        f"export the {what} from the same scan (same affine and shape), or resample it onto the volume's voxel grid.",
    )


def save_nifti(volume: np.ndarray, geometry: Geometry, path, dtype=np.uint8) -> None:
    """Write a label map [D, H, W] (or a volume [C, D, H, W]) as NIfTI with the geometry's affine."""
    import nibabel as nib

    data = np.asarray(volume).T if volume.ndim == 3 else np.asarray(volume).transpose(3, 2, 1, 0)
    image = nib.Nifti1Image(np.ascontiguousarray(data, dtype=dtype), np.asarray(geometry.affine))
    image.set_qform(np.asarray(geometry.affine), code=1)
    image.set_sform(np.asarray(geometry.affine), code=1)
    nib.save(image, str(path))


__all__ = [
    "Geometry",
    "Grid",
    "ORIENTATIONS",
    "check_same_grid",
    "plan_spacing",
    "save_nifti",
    "to_grid",
    "to_original",
]
