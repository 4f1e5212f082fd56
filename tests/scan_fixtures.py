"""Builders for small synthetic scan files, written at test time (never committed).

    from tests.scan_fixtures import write_dicom, write_nifti, write_mat, write_png, write_jpeg
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def write_png(path, arr: np.ndarray, mode: str | None = None) -> Path:
    """Write ``arr`` ((H, W) uint8/uint16, (H, W, 3|4) uint8) as PNG via Pillow."""
    from PIL import Image

    path = Path(path)
    arr = np.asarray(arr)
    if arr.dtype == np.uint16 and arr.ndim == 2:
        im = Image.fromarray(arr)  # mode "I;16"
    else:
        im = Image.fromarray(arr, mode) if mode else Image.fromarray(arr)
    im.save(path)
    return path


def write_jpeg(path, arr: np.ndarray, quality: int = 95) -> Path:
    """Write an (H, W) or (H, W, 3) uint8 array as JPEG."""
    from PIL import Image

    path = Path(path)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path, format="JPEG", quality=quality)
    return path


def write_dicom(path, arr: np.ndarray, *, slope: float | None = None, intercept: float | None = None,
                window: tuple[float, float] | Sequence | None = None,
                photometric: str = "MONOCHROME2", pixel_spacing: tuple[float, float] | None = None,
                modality: str = "MR", series_description: str | None = None,
                patient_id: str | None = None, pixel_data: bool = True,
                implicit_vr: bool = False) -> Path:
    """Write a minimal single-frame (or multi-frame for (F, H, W)) grayscale DICOM.

    ``arr``: (H, W) or (F, H, W) uint16 / int16.  ``window`` = (center, width); either
    value may be a list to produce a MultiValue.  ``pixel_data=False`` omits PixelData.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, MRImageStorage, generate_uid

    path = Path(path)
    arr = np.asarray(arr)
    if arr.dtype not in (np.uint16, np.int16):
        raise TypeError("write_dicom expects uint16 or int16 pixels")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = patient_id or "TEST0001"
    if series_description:
        ds.SeriesDescription = series_description
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = int(arr.shape[-2]), int(arr.shape[-1])
    if arr.ndim == 3:
        ds.NumberOfFrames = int(arr.shape[0])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if arr.dtype == np.int16 else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window[0], window[1]
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
    if pixel_data:
        ds.PixelData = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"))).tobytes()
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(str(path), enforce_file_format=True)
    else:  # pragma: no cover - pydicom 2.x
        ds.is_little_endian = True
        ds.is_implicit_VR = implicit_vr
        ds.save_as(str(path), write_like_original=False)
    return path


def write_nifti(path, vol: np.ndarray, zooms: Sequence[float] = (1.0, 1.0, 1.0),
                affine: np.ndarray | None = None) -> Path:
    """Write ``vol`` ((X, Y) or (X, Y, Z) [, 1]) as NIfTI-1 (``.nii`` or ``.nii.gz``).

    Default affine is diagonal RAS+ with ``zooms`` as voxel sizes, so
    ``nib.as_closest_canonical`` leaves the array unchanged.
    """
    import nibabel as nib

    path = Path(path)
    vol = np.asarray(vol)
    if affine is None:
        affine = np.eye(4)
        z = list(zooms) + [1.0] * (3 - len(zooms))
        affine[0, 0], affine[1, 1], affine[2, 2] = z[:3]
    img = nib.Nifti1Image(vol, affine)
    img.header.set_zooms(tuple(list(zooms)[: vol.ndim]) + (1.0,) * max(0, vol.ndim - len(zooms)))
    nib.save(img, str(path))
    return path


def write_mat(path, image: np.ndarray, mask: np.ndarray | None = None, label: int = 2,
              pid: str = "100360") -> Path:
    """Write a figshare-style (Cheng 2017) MATLAB v7.3 file: HDF5 with a 512-byte user
    block and group ``cjdata`` holding image (int16), tumorMask (uint8), label (double),
    PID (uint16 char codes) -- all stored transposed as MATLAB does.

    ``image`` / ``mask`` are given in display orientation (H, W).
    """
    import h5py

    path = Path(path)
    image = np.asarray(image, dtype=np.int16)
    with h5py.File(str(path), "w", userblock_size=512) as f:
        g = f.create_group("cjdata")
        g.create_dataset("image", data=image.T)
        if mask is not None:
            g.create_dataset("tumorMask", data=np.asarray(mask, dtype=np.uint8).T)
        g.create_dataset("label", data=np.array([[float(label)]]))
        g.create_dataset("PID", data=np.array([[ord(c)] for c in pid], dtype=np.uint16))
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as fh:
        fh.write(header.ljust(116, b" "))
    return path
