#!/usr/bin/env python
"""What bringing clinical volumes onto the model's grid costs: seconds per volume to read, reorient and resample.

Volumes: the real MNI152 T1 template and its tissue labels that nilearn ships (1 mm, 197 x 233 x 189), as
NIfTI, written again stored LPS (so reorienting has work to do) and as a DICOM series of 189 slices; and a
CT-sized volume of *generated* values (512 x 512 x 120 at 0.8 x 0.8 x 2.5 mm, stored LPS as scanners do): speed
does not depend on what the voxels show. Each row times `data.volumes.load_volume` with one `geometry.Grid`:
the read alone (stored voxels), RAS reorientation, and resampling to a target spacing with linear, cubic and
(labels) nearest interpolation; plus taking a label map back onto the scan's voxels (`geometry.to_original`),
which every 3D prediction does. Median of `--repeats` runs, torch threads as given.

    python benchmarks/resampling.py                    # -> benchmarks/results/resampling.json and a table
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from hf_medmae.data.geometry import Grid, to_original
from hf_medmae.data.volumes import load_volume
from hf_medmae.training import hardware_description

ROOT = Path(__file__).resolve().parents[1]


def mni(kind: str) -> nib.Nifti1Image:
    path = resources.files("nilearn") / "datasets" / "data" / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
    return nib.load(str(path))


def lps(image: nib.Nifti1Image) -> nib.Nifti1Image:
    """The same scan stored with x and y reversed (L, P), as DICOM-derived files often are."""
    data = np.asarray(image.dataobj)[::-1, ::-1]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    return nib.Nifti1Image(np.ascontiguousarray(data), image.affine @ flip)


def write_dicom(image: nib.Nifti1Image, folder: Path) -> None:
    """A CT series of the image's slices with its true geometry (pydicom; LPS patient coordinates)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    cols, rows = np.linalg.norm(lps_affine[:3, 0]), np.linalg.norm(lps_affine[:3, 1])
    orientation = [*(lps_affine[:3, 0] / cols), *(lps_affine[:3, 1] / rows)]
    data, series = np.round(np.asarray(image.dataobj)).astype(np.int16), generate_uid()
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.InstanceNumber = generate_uid(), series, "CT", k + 1
        ds.ImagePositionPatient = [f"{v:.6g}" for v in lps_affine[:3, 3] + k * lps_affine[:3, 2]]
        ds.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
        ds.PixelSpacing = [f"{rows:.6g}", f"{cols:.6g}"]
        ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(data[:, :, k].T, dtype="<i2").tobytes()
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "resampling.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    ct = nib.Nifti1Image(
        rng.normal(0, 300, size=(512, 512, 120)).astype(np.int16), np.diag([0.8, 0.8, 2.5, 1.0])
    )  # generated values, CT-sized
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t1, dicom = "MNI152 T1 1 mm, NIfTI stored LPS (real)", "MNI152 T1 1 mm, DICOM series of 189 slices (real)"
        ct_name = "CT-sized 512x512x120 at 0.8x0.8x2.5 mm, stored LPS (generated)"
        for image, file in ((lps(mni("t1")), "t1.nii.gz"), (lps(mni("gm")), "labels.nii.gz"), (lps(ct), "ct.nii.gz")):
            nib.save(image, str(tmp / file))
        write_dicom(mni("t1"), tmp / "dicom")
        linear, cubic = Grid("RAS", (2.0, 1.0, 1.0)), Grid("RAS", (2.0, 1.0, 1.0), 3)
        cases = [
            (t1, "t1.nii.gz", None, "read only"),
            (t1, "t1.nii.gz", Grid("RAS"), "RAS reorientation"),
            (t1, "t1.nii.gz", linear, "to 2x1x1 mm, linear"),
            (t1, "t1.nii.gz", cubic, "to 2x1x1 mm, cubic"),
            (dicom, "dicom", None, "read only"),
            (dicom, "dicom", linear, "to 2x1x1 mm, linear"),
            (ct_name, "ct.nii.gz", None, "read only"),
            (ct_name, "ct.nii.gz", Grid("RAS", (1.5, 1.5, 1.5)), "to 1.5 mm iso, linear"),
        ]
        for volume, file, grid, what in cases:
            seconds, (array, _) = timed(lambda f=file, g=grid: load_volume(tmp / f, g), args.repeats)
            rows.append(
                {"volume": volume, "operation": what, "seconds": round(seconds, 3), "shape": list(array.shape)}
            )
        label_file = tmp / "labels.nii.gz"
        grid = Grid("RAS", (2.0, 1.0, 1.0)).for_labels()
        seconds, (labels, model) = timed(lambda: load_volume(label_file, grid), args.repeats)
        rows.append(
            {
                "volume": "MNI152 tissue labels 1 mm, stored LPS (real)",
                "operation": "to 2x1x1 mm, nearest",
                "seconds": round(seconds, 3),
                "shape": list(labels.shape),
            }
        )
        stored = load_volume(label_file)[1]
        seconds, back = timed(lambda: to_original(labels[0].astype(np.int64), model, stored), args.repeats)
        rows.append(
            {
                "volume": "MNI152 tissue labels 1 mm, stored LPS (real)",
                "operation": "prediction back onto the scan's voxels, nearest",
                "seconds": round(seconds, 3),
                "shape": list(back.shape),
            }
        )
    result = {"hardware": hardware_description(), "repeats": args.repeats, "torch_threads": args.threads, "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print("| volume | operation | seconds | shape after |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['volume']} | {r['operation']} | {r['seconds']:.2f} | {r['shape']} |")
    print(f"{result['hardware']}; median of {args.repeats}", file=sys.stderr)


if __name__ == "__main__":
    main()
