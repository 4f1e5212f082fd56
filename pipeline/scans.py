"""Turn one file on disk into 2D uint8 grayscale images plus metadata.

Everything the pipeline reads goes through :func:`read_scans` (or the
single-image :func:`read_scan`).  Supported inputs:

* raster images (``.jpg .jpeg .png .tif .tiff .bmp``) via Pillow, turned upright by their EXIF
  orientation tag; of a multi-page TIFF whose pages share one size and mode (a slice stack), the
  middle page, else the first,
* DICOM (``.dcm .dicom`` or any file with the ``DICM`` magic at byte 128) via pydicom,
* NIfTI (``.nii .nii.gz``) via nibabel -- a 3D volume yields one Scan per slice along the file's
  third axis (its stored plane: axial, coronal or sagittal), shown as a radiology viewer shows it,
* figshare (Cheng et al. 2017) MATLAB v7.3 ``.mat`` files via h5py.

Every failure -- missing, empty, truncated, mislabelled or unsupported file --
raises :class:`ScanReadError` (a ``ValueError``) carrying the path and a short
human reason; no Pillow/pydicom/nibabel/h5py exception escapes.

Intensity mapping to uint8 (``Scan.image``), unless ``window=(center, width)`` is
given, in which case that linear window is used for every format:

* 8-bit rasters: kept as is (colour -> ITU-R 601 luma, alpha ignored).
* 16-bit / 32-bit / float rasters (16-bit colour: its luma) and ``.mat`` images: min-max over the image.
* DICOM: colour to luma, RescaleSlope/Intercept, then the file's first WindowCenter/WindowWidth,
  else (or with ``dicom_window="minmax"``) min-max (over all frames of a multi-frame file);
  MONOCHROME1 is inverted afterwards.
  A multi-frame file gives one Scan per selected frame, chosen and keyed like a NIfTI volume's slices.
* NIfTI: one window per volume, the 0.5/99.5 percentiles of the nonzero voxels.

A linear window ``(c, w)`` maps ``c - w/2`` -> 0 and ``c + w/2`` -> 255, clipping
outside.  A constant image maps to all zeros.  Pydicom, nibabel and h5py are
imported lazily so importing this module stays cheap.
"""

from __future__ import annotations

import argparse

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

__all__ = [
    "SUPPORTED_SUFFIXES",
    "ScanReadError",
    "Scan",
    "read_scans",
    "read_scan",
    "is_blank",
    "is_scan_file",
    "iter_scan_files",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Lower-case suffixes handled by :func:`read_scans` (suffix-less DICOM files are
#: recognised by their ``DICM`` magic instead).
SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp",
    ".dcm", ".dicom",
    ".nii", ".nii.gz",
    ".mat",
)

_RASTER_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
_DICOM_SUFFIXES = {".dcm", ".dicom"}
_NIFTI_SUFFIXES = {".nii", ".nii.gz"}

#: figshare brain-tumour dataset label ids.
FIGSHARE_LABELS = {1: "meningioma", 2: "glioma", 3: "pituitary"}

_PIL_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "TIFF": "tiff", "BMP": "bmp", "DIB": "bmp"}
_EIGHT_BIT_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}


class ScanReadError(ValueError):
    """A file could not be turned into a Scan.  ``str(err) == f"{path}: {reason}"``."""

    def __init__(self, path: PathLike, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):  # keep it picklable (e.g. across DataLoader workers)
        return (type(self), (self.path, self.reason))


@dataclass
class Scan:
    """One 2D image read from a file.

    image: (H, W) uint8 grayscale, after windowing/normalisation.
    key:   the path as given; for a slice of a 3D NIfTI ``"<path>#z=NN"`` (NN >= 2 digits).
    meta:  ``format`` ("jpeg", "png", "tiff", "bmp", "dicom", "nifti", "mat"),
           ``orig_dtype`` (str), ``orig_shape`` (tuple), ``orig_mode`` (PIL mode, rasters),
           and where available ``spacing`` (row_mm, col_mm), ``slice_index``, ``label``,
           ``pid``, ``window`` ((center, width) used, or None), ...
    mask:  (H, W) uint8 0/255 ground-truth mask (figshare ``.mat`` tumorMask) or None.
    """

    image: np.ndarray
    key: str
    meta: dict = field(default_factory=dict)
    mask: np.ndarray | None = None


# --------------------------------------------------------------------------- files


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def _has_dicm_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def is_scan_file(path: PathLike) -> bool:
    """True for a supported suffix, or a suffix-less file with the DICOM ``DICM`` magic."""
    p = Path(path)
    suf = _suffix(p)
    if suf in SUPPORTED_SUFFIXES:
        return True
    return suf == "" and p.is_file() and _has_dicm_magic(p)


def iter_scan_files(root: PathLike) -> Iterator[Path]:
    """Yield scan-looking files under ``root`` recursively, in sorted (deterministic) order.

    Hidden files and directories (name starting with ".") are skipped; symlinked
    directories are not followed.  A ``root`` that is itself a file is yielded if it
    looks like a scan.
    """
    root = Path(root)
    if root.is_file():
        if is_scan_file(root):
            yield root
        return
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if is_scan_file(p):
                found.append(p)
    found.sort(key=lambda p: p.relative_to(root).parts)
    yield from found


# --------------------------------------------------------------------------- intensity


def _linear_window(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map [lo, hi] linearly onto [0, 255] (clipped); hi <= lo gives zeros.  -> (H, W) uint8"""
    arr = np.asarray(arr, dtype=np.float64)
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    out = (arr - lo) / (hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    return np.round(out * 255.0).astype(np.uint8)


def _apply_center_width(arr: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    c, w = float(window[0]), float(window[1])
    return _linear_window(arr, c - w / 2.0, c + w / 2.0)


def _minmax(arr: np.ndarray) -> np.ndarray:
    finite = np.asarray(arr, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return np.zeros(np.shape(arr), dtype=np.uint8)
    return _linear_window(arr, float(finite.min()), float(finite.max()))


def _check_window(window) -> tuple[float, float] | None:
    if window is None:
        return None
    try:
        c, w = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be (center, width), got {window!r}") from None
    if not (np.isfinite(c) and np.isfinite(w)) or w <= 0:
        raise ValueError(f"window width must be a positive finite number, got {window!r}")
    return c, w


# --------------------------------------------------------------------------- raster


_RASTER_FORMATS = ("JPEG", "MPO", "PNG", "TIFF", "BMP", "DIB", "GIF", "PPM")


def _pil_open():
    """Pillow's own ``Image.open``.

    Importing ultralytics replaces ``Image.open`` with a wrapper that, on any file Pillow cannot
    identify, tries to pip-install and register a HEIF plugin; a scan reader must not do that.
    """
    from PIL import Image

    patches = sys.modules.get("ultralytics.utils.patches")
    if patches is not None and Image.open is getattr(patches, "image_open", None):
        return patches._image_open
    return Image.open


def is_blank(image: np.ndarray) -> bool:
    """True when an (H, W) uint8 slice has one value everywhere (nothing to segment or classify)."""
    return image.size == 0 or int(image.min()) == int(image.max())


def _middle_of_stack(im, n_frames: int) -> int:
    """The page a multi-page TIFF is read at: the middle one when every page has the first one's
    size and mode (a slice stack from ImageJ or Fiji, like multi-frame DICOM), else the first
    (an image plus thumbnails or masks). Leaves ``im`` at the first page."""
    first = (im.size, im.mode)
    same = True
    for i in range(1, n_frames):
        im.seek(i)
        same = same and (im.size, im.mode) == first
    im.seek(0)
    return n_frames // 2 if same else 0


def _stored_bits(path: Path, im) -> int:
    """Bits per sample as the file stores them (PNG's IHDR, TIFF's BitsPerSample); 8 when unknown."""
    try:
        if im.format == "PNG":
            with open(path, "rb") as f:
                head = f.read(25)
            return int(head[24]) if len(head) == 25 and head[12:16] == b"IHDR" else 8
        if im.format == "TIFF":
            bits = im.tag_v2.get(258, 8)
            return int(max(bits) if isinstance(bits, (tuple, list)) else bits)
    except (OSError, TypeError, ValueError):
        pass
    return 8


#: numpy versions of PIL's EXIF transposes (``ImageOps.exif_transpose``), on (H, W[, C]) arrays
_EXIF_TURNS = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
               5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
               8: lambda a: np.rot90(a, 1)}


def _decode_turned_tiff(path: Path, key: str, frame: int, orientation: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(values, 8-bit grey or None, stored dtype) of page ``frame`` of an uncompressed TIFF,
    EXIF-turned: as the Pillow path gives them, luma for colour, the 8-bit grey as stored when the
    file is 8-bit. Grey (either polarity) and interleaved RGB only."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[frame]
            photometric, bits = int(page.photometric), int(page.bitspersample)
            if photometric not in (0, 1, 2) or (page.samplesperpixel > 1 and int(page.planarconfig) != 1):
                raise ScanReadError(key, f"uncompressed TIFF turned by its Orientation tag ({orientation}) "
                                         f"with {page.photometric.name} pixels ({int(page.planarconfig)=}): "
                                         f"Pillow misreads it and it is not decoded here; save it upright")
            arr = np.asarray(page.asarray())
    except ScanReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ScanReadError(key, f"cannot decode the turned TIFF: {type(e).__name__}: {e}") from e
    arr, stored, eight_bit = _tiff_grey(arr, photometric, bits, orientation), arr.dtype.name, arr.dtype == np.uint8
    return arr, (np.rint(arr).astype(np.uint8) if eight_bit else None), stored


def _tiff_grey(arr: np.ndarray, photometric: int, bits: int, orientation: int) -> np.ndarray:
    """(H, W) float64 of a page tifffile decoded, (H, W) or (H, W, samples): MINISWHITE inverted,
    colour as ITU-R 601 luma, grey + alpha as its grey, turned by the EXIF orientation."""
    vals = arr.astype(np.float64)
    if photometric == 0:  # MINISWHITE: 0 is white
        vals = _invert(vals, bits, arr.dtype.kind)
    if vals.ndim == 3:
        vals = vals[..., 0] if vals.shape[2] < 3 else vals[..., 0] * 0.299 + vals[..., 1] * 0.587 + vals[..., 2] * 0.114
    return np.ascontiguousarray(_EXIF_TURNS.get(orientation, lambda a: a)(vals))


def _to_image(vals: np.ndarray, gray: np.ndarray | None, window, meta: dict) -> np.ndarray:
    """(H, W) uint8 of a raster's values: through ``window`` when given, else its 8-bit grey as
    stored, else min-max; ``meta`` records which."""
    if window is not None:
        meta["window"] = tuple(window)
        return _apply_center_width(vals, window)
    meta["window"] = None
    if gray is not None:
        return np.ascontiguousarray(gray, dtype=np.uint8)
    meta["normalisation"] = "minmax"
    return _minmax(vals)


def _invert(vals: np.ndarray, bits: int, kind: str) -> np.ndarray:
    """MINISWHITE values as MINISBLACK: integers mirrored in their stored range (``kind`` ``u``:
    0 .. 2**bits - 1; ``i``: -2**(bits-1) .. 2**(bits-1) - 1), floats in their own."""
    if kind == "i":
        return -1.0 - vals
    if kind != "f":
        return (2.0 ** bits - 1) - vals
    finite = vals[np.isfinite(vals)]
    return (finite.max() + finite.min()) - vals if finite.size else vals


def _decode_high_depth_colour(path: Path, key: str, frame: int, orientation: int) -> np.ndarray:
    """(H, W) float64 luma of a 16-bit colour or grey+alpha raster at full depth, EXIF-turned."""
    import cv2

    buf = np.frombuffer(path.read_bytes(), np.uint8)
    if frame:
        ok, pages = cv2.imdecodemulti(buf, cv2.IMREAD_UNCHANGED)
        arr = pages[frame] if ok and frame < len(pages) else None
    else:
        arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ScanReadError(key, "cannot decode the 16-bit colour image")
    arr = arr.astype(np.float64)
    if arr.ndim == 3:
        # OpenCV's channel order is B, G, R[, A]; two channels are grey + alpha
        arr = arr[..., 0] if arr.shape[2] < 3 else arr[..., 0] * 0.114 + arr[..., 1] * 0.587 + arr[..., 2] * 0.299
    return np.ascontiguousarray(_EXIF_TURNS.get(orientation, lambda a: a)(arr))


def _read_tiff_pillow_cannot(path: Path, key: str, window) -> list[Scan]:
    """A TIFF Pillow has no mode for, read with tifffile by the same rules: the middle page of a
    stack of equal pages, MINISWHITE inverted, colour as luma, grey + alpha as grey, EXIF-turned."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            if not pages:
                raise ScanReadError(key, "TIFF without pages")
            same = all((pg.shape, pg.dtype) == (pages[0].shape, pages[0].dtype) for pg in pages)
            frame = len(pages) // 2 if len(pages) > 1 and same else 0
            page = pages[frame]
            photometric, bits = int(page.photometric), int(page.bitspersample)
            orientation = int(page.tags[274].value) if 274 in page.tags else 1
            arr = np.asarray(page.asarray())
            if page.samplesperpixel > 1 and int(page.planarconfig) == 2 and arr.ndim == 3:
                arr = np.moveaxis(arr, 0, -1)  # planes stored one after another: (samples, H, W)
    except ScanReadError:
        raise
    except Exception as e:  # noqa: BLE001 - tifffile raises many kinds
        raise ScanReadError(key, f"not an image file (unrecognised content; tifffile: {type(e).__name__}: {e})") from e
    if photometric not in (0, 1, 2) or arr.ndim not in (2, 3):
        raise ScanReadError(key, f"TIFF with {page.photometric.name} pixels of shape {arr.shape}: not a slice "
                                 f"this reader decodes")
    meta = {"format": "tiff", "orig_mode": f"tifffile:{page.photometric.name}", "orig_dtype": arr.dtype.name}
    vals = _tiff_grey(arr, photometric, bits, orientation)
    meta["orig_shape"] = tuple(vals.shape)
    if len(pages) > 1:
        meta["n_frames"], meta["frame_index"] = len(pages), frame
    if orientation in range(2, 9):
        meta["exif_orientation"] = orientation
    return [Scan(image=_to_image(vals, None, window, meta), key=key, meta=meta)]


def _read_raster(path: Path, key: str, window) -> list[Scan]:
    from PIL import Image, UnidentifiedImageError

    try:
        # Only the formats we support: other libraries (ultralytics) register extra openers
        # whose own failures would otherwise replace "not an image" with an import error.
        Image.init()
        im = _pil_open()(path, formats=[f for f in _RASTER_FORMATS if f in Image.OPEN])
    except UnidentifiedImageError:
        if _suffix(path) in (".tif", ".tiff"):  # float64, 16-bit grey+alpha...: layouts Pillow has no mode for
            return _read_tiff_pillow_cannot(path, key, window)
        raise ScanReadError(key, "not an image file (unrecognised content)") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds
        raise ScanReadError(key, f"cannot open image: {type(e).__name__}: {e}") from e
    with im:
        frame, n_frames = 0, 1
        try:
            n_frames = int(getattr(im, "n_frames", 1) or 1)  # walks a TIFF's page chain: may meet a cut
            if n_frames > 1 and im.format == "TIFF":
                frame = _middle_of_stack(im, n_frames)
            if frame:
                im.seek(frame)
            # Pillow turns a TIFF by its Orientation tag while loading it, and drops the tag
            turned_on_load = int(im.tag_v2.get(0x0112, 1) or 1) if im.format == "TIFF" else 1
            im.load()  # decodes now, so a truncated file fails here
        except Exception as e:  # noqa: BLE001
            raise ScanReadError(key, f"truncated or corrupt image: {e}") from e
        # a photographed or phone-exported slice is stored sideways with an EXIF tag saying so; read it
        # as every viewer shows it, so masks and boxes match what the user sees
        orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
        # ... but an uncompressed one whose turn swaps the axes comes out scrambled (Pillow 13, any
        # depth): that is decoded again with tifffile and turned here
        redecode_turned = turned_on_load in range(5, 9) and im.info.get("compression", "raw") == "raw"
        # the file's own format and depth: the turned copy below no longer knows them
        fmt = _PIL_FORMATS.get(im.format or "", (im.format or "unknown").lower())
        deep_colour = im.mode in ("RGB", "RGBA", "LA") and _stored_bits(path, im) > 8
        mode = im.mode
        try:
            raw = np.asarray(im)
        except Exception:  # noqa: BLE001 - exotic modes numpy can't view directly
            raw = np.asarray(im.convert("F"))
        turn = _EXIF_TURNS.get(orientation, lambda a: a)  # here, not by ImageOps.exif_transpose: as above
        raw = turn(raw)
        meta = {
            "format": fmt,
            "orig_mode": mode,
            "orig_dtype": raw.dtype.name,
            "orig_shape": tuple(raw.shape),
        }
        if n_frames > 1:
            meta["n_frames"] = n_frames
            meta["frame_index"] = frame
        if orientation in range(2, 9) or turned_on_load in range(2, 9):
            meta["exif_orientation"] = int(orientation if orientation in range(2, 9) else turned_on_load)
        dpi = im.info.get("dpi")
        turned = _decode_turned_tiff(path, key, frame, turned_on_load) if redecode_turned else None
        try:
            if turned is not None:
                vals, gray, meta["orig_dtype"] = turned
                meta["orig_shape"] = vals.shape  # as shown, like a turned file of another format
            elif deep_colour:
                # Pillow opens 16-bit colour and grey+alpha as 8-bit modes, keeping only the high byte
                vals, gray = _decode_high_depth_colour(path, key, frame, orientation), None
                meta["orig_dtype"] = "uint16"
            elif mode in _EIGHT_BIT_MODES:
                if mode in ("1", "L"):
                    gray = turn(np.asarray(im.convert("L")))
                elif mode in ("LA", "La"):
                    gray = turn(np.asarray(im.getchannel(0)))
                else:  # colour / palette: drop alpha, ITU-R 601 luma
                    gray = turn(np.asarray(im.convert("RGB").convert("L")))
                vals = gray
            else:  # I;16*, I, F, ...: high bit depth
                vals = raw.astype(np.float64)
                if vals.ndim == 3:  # multi-channel high-depth: average channels
                    vals = vals[..., :3].mean(axis=-1)
                if im.format == "TIFF" and im.tag_v2.get(262) == 0:
                    # MINISWHITE (0 is white): Pillow inverts it at 8 bits only
                    vals = _invert(vals, _stored_bits(path, im), raw.dtype.kind)
                gray = None
        except Exception as e:  # noqa: BLE001
            raise ScanReadError(key, f"unsupported image mode {mode!r}: {e}") from e
    image = _to_image(vals, gray, window, meta)
    if dpi and all(isinstance(d, (int, float)) and d > 0 for d in dpi[:2]):
        meta["dpi"] = (float(dpi[0]), float(dpi[1]))
    return [Scan(image=image, key=key, meta=meta)]


# --------------------------------------------------------------------------- DICOM


def _functional_group(ds, sequence: str, frame: int):
    """The item of an enhanced DICOM's functional ``sequence`` for ``frame`` (per-frame first, then
    shared), or ``ds`` itself: a classic object keeps those attributes at the top level."""
    for groups, k in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        try:
            item = ds.get(groups)[k].get(sequence)
            if item:
                return item[0]
        except (TypeError, IndexError, KeyError, AttributeError):
            continue
    return ds


def _first(value):
    """First element of a pydicom MultiValue / sequence, or the value itself."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        return value
    try:
        return value[0]
    except (TypeError, IndexError, KeyError):
        return value


def _ensure_transfer_syntax(ds) -> None:
    """Files read with force=True may lack (0002,0010); infer it so pixel decoding works."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if "TransferSyntaxUID" in meta:
        return
    enc = getattr(ds, "original_encoding", None)  # pydicom >= 3: (is_implicit, is_little)
    if enc is not None and enc[0] is not None:
        implicit, little = enc
    else:
        implicit = getattr(ds, "is_implicit_VR", True)
        little = getattr(ds, "is_little_endian", True)
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _read_dicom(path: Path, key: str, window, nifti_slices="nonempty", dicom_window: str = "file") -> list[Scan]:
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), force=True)
    except Exception as e:  # noqa: BLE001
        raise ScanReadError(key, f"not a readable DICOM file: {type(e).__name__}: {e}") from e
    has_pixels = any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if not has_pixels:
        # force=True parses anything; without the DICM preamble and with no image tags it was not DICOM
        if not _has_dicm_magic(path) and "Rows" not in ds and "SOPClassUID" not in ds:
            raise ScanReadError(key, "not a DICOM file (no DICM header and no DICOM image attributes)")
        raise ScanReadError(key, "no pixel data")
    try:
        _ensure_transfer_syntax(ds)
        arr = ds.pixel_array  # pydicom >= 3 hands YBR colour over as RGB
    except Exception as e:  # noqa: BLE001
        raise ScanReadError(key, f"cannot decode DICOM pixel data: {type(e).__name__}: {e}") from e

    meta: dict = {
        "format": "dicom",
        "orig_dtype": arr.dtype.name,
        "orig_shape": tuple(arr.shape),
    }
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if photometric == "PALETTE COLOR":  # the stored values are indices into the file's colour table
        from pydicom.pixels import apply_color_lut

        try:
            arr, samples = apply_color_lut(arr, ds), 3
        except Exception as e:  # noqa: BLE001
            raise ScanReadError(key, f"cannot apply the DICOM palette: {type(e).__name__}: {e}") from e
    pix = np.asarray(arr, dtype=np.float64)
    if samples > 1 and pix.ndim >= 3 and pix.shape[-1] == samples:
        pix = pix[..., 0] * 0.299 + pix[..., 1] * 0.587 + pix[..., 2] * 0.114
    is_stack = n_frames > 1 and pix.ndim == 3 and pix.shape[0] == n_frames
    if pix.ndim != (3 if is_stack else 2):
        raise ScanReadError(key, f"unsupported DICOM pixel array shape {tuple(arr.shape)}")
    stack = pix if is_stack else pix[None]

    # an enhanced (multi-frame) object keeps scaling and window in functional groups, per frame or shared
    per_frame = [_functional_group(ds, "PixelValueTransformationSequence", k) for k in range(len(stack))]
    slopes, intercepts = [], []
    for group in per_frame:
        try:
            slopes.append(float(_first(group.get("RescaleSlope", 1)) or 1.0))
            intercepts.append(float(_first(group.get("RescaleIntercept", 0)) or 0.0))
        except (TypeError, ValueError):
            slopes.append(1.0)
            intercepts.append(0.0)
    stack = stack * np.asarray(slopes)[:, None, None] + np.asarray(intercepts)[:, None, None]
    meta["rescale"] = (slopes[0], intercepts[0])
    if len(set(zip(slopes, intercepts))) > 1:
        meta["rescale_per_frame"] = list(zip(slopes, intercepts))

    used = window
    source = "user" if window is not None else None
    if used is None and dicom_window == "file":
        try:
            voi = _functional_group(ds, "FrameVOILUTSequence", 0)  # one window for all frames, as for a volume
            c = _first(voi.get("WindowCenter"))
            w = _first(voi.get("WindowWidth"))
            if c is not None and w is not None and float(w) > 0:
                used, source = (float(c), float(w)), "file"
        except (TypeError, ValueError):
            used = None
    if used is not None:
        images = _apply_center_width(stack, used)
        meta["window"] = (float(used[0]), float(used[1]))
    else:
        images = _minmax(stack)  # a multi-frame series: one range for all its frames, as for a volume
        meta["window"] = None
        source = "minmax"
    meta["window_source"] = source
    if photometric == "MONOCHROME1":
        images = (255 - images).astype(np.uint8)
    meta["photometric"] = photometric or None

    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        if spacing is not None and len(spacing) >= 2:
            meta["spacing"] = (float(spacing[0]), float(spacing[1]))
    except (TypeError, ValueError):
        pass
    for tag, name in (("Modality", "modality"), ("SeriesDescription", "series_description"),
                      ("PatientID", "pid"), ("InstanceNumber", "instance_number")):
        val = ds.get(tag)
        if val not in (None, ""):
            meta[name] = int(val) if name == "instance_number" else str(val)
    if not is_stack:
        return [Scan(image=np.ascontiguousarray(images[0]), key=key, meta=meta)]
    # a multi-frame object (an enhanced MR series in one file) is a volume: one Scan per frame,
    # chosen and keyed like the slices of a NIfTI volume
    meta["n_frames"] = n_frames
    scans = []
    for k in _select_slices(np.moveaxis(stack, 0, -1), nifti_slices, key):
        if nifti_slices == "nonempty" and is_blank(images[k]):
            continue
        scans.append(Scan(image=np.ascontiguousarray(images[k]), key=f"{key}#z={k:02d}",
                          meta={**meta, "frame_index": int(k), "slice_index": int(k)}))
    return scans


# --------------------------------------------------------------------------- NIfTI


def _select_slices(vol: np.ndarray, nifti_slices, key: str) -> list[int]:
    nz = vol.shape[2]
    if isinstance(nifti_slices, str):
        if nifti_slices == "all":
            return list(range(nz))
        if nifti_slices == "middle":
            return [nz // 2]
        if nifti_slices == "nonempty":
            flat = vol.reshape(-1, nz)
            return [int(z) for z in np.flatnonzero(flat.max(axis=0) > flat.min(axis=0))]
    out = []
    for z in nifti_slices:
        z = int(z)
        if not -nz <= z < nz:
            raise ScanReadError(key, f"slice index {z} out of range (volume has {nz} slices)")
        if z % nz not in out:  # 1,1 or 1,-4 of a 5-slice volume name one slice: one row, as for any input
            out.append(z % nz)
    return out


#: The plane a slice lies in, by the RAS world axis its normal runs along.
_PLANES = {0: "sagittal", 1: "coronal", 2: "axial"}


def _voxel_orientation(affine: np.ndarray) -> np.ndarray:
    """``nib.io_orientation`` of a (4, 4) affine, (3, 2): per voxel axis its RAS world axis and
    direction (+1/-1). An axis with no direction in the affine (a 2D file's zero third column) gets
    the world axis the other two leave, running forward."""
    import nibabel as nib

    ornt = nib.io_orientation(affine)
    if np.isnan(ornt).any():
        known = [int(a) for a in ornt[:, 0] if not np.isnan(a)]
        if len(set(known)) != len(known) or len(known) < 2:
            return np.array([[0, 1], [1, 1], [2, 1]], float)  # nothing usable: read the array as RAS
        free = [a for a in (0, 1, 2) if a not in known]
        ornt[np.isnan(ornt[:, 0])] = [free[0], 1]
    return ornt


def _display_slice(sl: np.ndarray, ornt: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """A slice ``data[:, :, k]`` (voxel axes 0, 1) turned for a radiology viewer, and the voxel axes
    (row, column) it runs along.

    Whatever the plane, the upper of the two in-plane world axes (S over A over R) runs down the rows
    and the other along the columns, each from its + end: superior (or anterior, on an axial slice) at
    the top, the patient's right on the screen's left, anterior on the left of a sagittal slice --
    as DICOM viewers, Slicer and ITK-SNAP show them.
    """
    (w0, d0), (w1, d1) = ornt[0], ornt[1]
    rows_axis, cols_axis = (0, 1) if w0 > w1 else (1, 0)
    out = sl if rows_axis == 0 else sl.T
    d_rows, d_cols = (d0, d1) if rows_axis == 0 else (d1, d0)
    # each voxel axis runs toward + world when its direction is +1; the display wants the + end first
    if d_rows > 0:
        out = out[::-1, :]
    if d_cols > 0:
        out = out[:, ::-1]
    return out, (rows_axis, cols_axis)


def _undisplay_slice(image: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_display_slice`: a (rows, cols) picture as shown -> ``data[:, :, k]``'s order."""
    (w0, d0), (w1, d1) = ornt[0], ornt[1]
    rows_axis = 0 if w0 > w1 else 1
    d_rows, d_cols = (d0, d1) if rows_axis == 0 else (d1, d0)
    out = image[:, ::-1] if d_cols > 0 else image
    out = out[::-1, :] if d_rows > 0 else out
    return out if rows_axis == 0 else out.T


def _nifti_cut(shape: tuple[int, ...], affine: np.ndarray) -> tuple[list[int], np.ndarray]:
    """How :func:`_read_nifti` cuts a volume of ``shape``: the voxel-axis order whose last axis is the
    slice axis, and the orientation of those axes (:func:`_voxel_orientation`, reordered)."""
    shape3 = tuple(shape[:3])
    axes = [0, 1, 2]
    if len(shape3) == 3 and shape3[2] > 1 and 1 in shape3[:2]:
        lone = shape3.index(1)
        axes = [a for a in axes if a != lone] + [lone]
    ornt = _voxel_orientation(affine if affine.shape == (4, 4) else np.eye(4))[axes]
    return axes, ornt


def write_nifti_mask(source: PathLike, slice_masks: dict[int, np.ndarray], dest: PathLike) -> Path:
    """Put the masks of a NIfTI's slices, (H, W) as shown (``segment``'s PNGs), back into the file's
    own voxel grid and write them to ``dest`` (``.nii.gz``): uint8, 1 tumor / 0 background, with the
    source's affine and codes, so a viewer overlays it on the scan. Slices with no mask are 0."""
    import nibabel as nib

    src = nib.load(os.fspath(source))
    shape = tuple(int(v) for v in src.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape3 = shape[:3]
    elif len(shape) in (2, 3):
        shape3 = shape
    else:
        raise ValueError(f"{source}: unsupported NIfTI shape {shape} (need 2D or 3D)")
    affine = np.asarray(src.affine, float)
    axes, ornt = _nifti_cut(shape3, affine)
    cut = np.zeros([shape3[a] for a in axes] if len(shape3) == 3 else [*shape3, 1], np.uint8)
    for z, mask in slice_masks.items():
        voxels = _undisplay_slice(np.asarray(mask) > 0, ornt)
        if not 0 <= int(z) < cut.shape[2] or voxels.shape != cut.shape[:2]:
            raise ValueError(f"{source}: a {np.shape(mask)} mask for slice {z} does not fit its "
                             f"{cut.shape[2]} slices of {cut.shape[:2]}")
        cut[:, :, int(z)] = voxels
    data = cut.transpose(np.argsort(axes)) if len(shape3) == 3 else cut[:, :, 0]
    data = data.reshape(shape)
    out = nib.Nifti1Image(data, affine)
    for get, put in (("get_qform", "set_qform"), ("get_sform", "set_sform")):
        if hasattr(src, get):
            matrix, code = getattr(src, get)(coded=True)
            # as the source says, a code of 0 included: a viewer that reads such a file by its voxel
            # sizes alone must read the mask the same way
            getattr(out, put)(matrix if code else None, code=int(code or 0))
    out.header.set_xyzt_units(*src.header.get_xyzt_units())
    out.header.set_data_dtype(np.uint8)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp.nii.gz")
    nib.save(out, os.fspath(tmp))
    os.replace(tmp, dest)
    return dest


def _read_nifti(path: Path, key: str, window, nifti_slices) -> list[Scan]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        dtype = np.dtype(img.get_data_dtype()).name
        if len(shape) == 4 and shape[3] == 1:
            pass
        elif len(shape) not in (2, 3):
            raise ScanReadError(key, f"unsupported NIfTI shape {shape} (need 2D or 3D)")
        vol = np.asarray(img.get_fdata(dtype=np.float32))
        zooms = tuple(float(z) for z in img.header.get_zooms())
        affine = np.asarray(img.affine, float)
    except ScanReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ScanReadError(key, f"not a readable NIfTI file: {type(e).__name__}: {e}") from e
    if vol.ndim == 4:
        vol = vol[..., 0]
    # one slice stored across the first or second voxel axis (a sagittal or coronal slice in RAS
    # order, shape (1, H, W)): that axis is the one to cut along, not the third, which would give
    # one-pixel lines
    axes, ornt = _nifti_cut(vol.shape, affine)
    if axes != [0, 1, 2]:
        vol = vol.transpose(axes)
    is_2d = vol.ndim == 2
    if is_2d:
        vol = vol[:, :, None]
    # +-inf at the ends of the finite range, as the raster and DICOM readers show them; NaN as background
    finite = np.isfinite(vol)
    if not finite.all():
        top, bottom = (float(vol[finite].max()), float(vol[finite].min())) if finite.any() else (0.0, 0.0)
        vol = np.nan_to_num(vol, nan=0.0, posinf=top, neginf=bottom)
    # Slices are cut along the file's own third axis, the plane it was acquired or stored in, and
    # numbered as the file numbers them; only their display is turned to the viewer's convention.
    zooms = zooms + (1.0,) * (3 - len(zooms))
    zooms = tuple(zooms[a] for a in axes)

    meta_base: dict = {"format": "nifti", "orig_dtype": dtype, "orig_shape": shape,
                       "n_slices": int(vol.shape[2]), "plane": _PLANES[int(ornt[2, 0])]}

    if window is not None:
        lo, hi = window[0] - window[1] / 2.0, window[0] + window[1] / 2.0
        meta_base["window"] = tuple(window)
    else:
        nzv = vol[vol != 0]
        lo = hi = 0.0
        if nzv.size:
            lo, hi = (float(v) for v in np.percentile(nzv, [0.5, 99.5]))
        if hi <= lo:  # e.g. a binary mask: fall back to the full range
            lo, hi = float(vol.min()), float(vol.max())
        meta_base["window"] = None
        meta_base["normalisation"] = "percentile_0.5_99.5_nonzero"
        meta_base["intensity_range"] = (lo, hi)

    scans = []
    for z in ([0] if is_2d else _select_slices(vol, nifti_slices, key)):
        sl, (rows_axis, cols_axis) = _display_slice(vol[:, :, z], ornt)
        meta = dict(meta_base)
        meta["slice_index"] = int(z)
        meta["spacing"] = (zooms[rows_axis], zooms[cols_axis])
        if not is_2d:
            meta["slice_thickness"] = zooms[2]
        image = _linear_window(sl, lo, hi)
        if nifti_slices == "nonempty" and not is_2d and is_blank(image):
            continue  # an edge slice whose few voxels all fall outside the volume's window
        scans.append(Scan(image=np.ascontiguousarray(image), key=key if is_2d else f"{key}#z={z:02d}", meta=meta))
    return scans


# --------------------------------------------------------------------------- figshare .mat


def _read_mat(path: Path, key: str, window) -> list[Scan]:
    import h5py

    try:
        is_h5 = h5py.is_hdf5(str(path))
    except Exception:  # noqa: BLE001
        is_h5 = False
    if not is_h5:
        raise ScanReadError(key, "not a MATLAB v7.3 (HDF5) file")
    try:
        with h5py.File(str(path), "r") as f:
            cj = f.get("cjdata")
            if not isinstance(cj, h5py.Group) or not isinstance(cj.get("image"), h5py.Dataset):
                raise ScanReadError(key, "no cjdata.image in .mat file")
            raw = np.asarray(cj["image"][()])
            mask_raw = np.asarray(cj["tumorMask"][()]) if isinstance(cj.get("tumorMask"), h5py.Dataset) else None
            label_raw = np.asarray(cj["label"][()]) if isinstance(cj.get("label"), h5py.Dataset) else None
            pid_raw = np.asarray(cj["PID"][()]) if isinstance(cj.get("PID"), h5py.Dataset) else None
    except ScanReadError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ScanReadError(key, f"corrupt .mat file: {type(e).__name__}: {e}") from e
    if raw.ndim != 2:
        raise ScanReadError(key, f"cjdata.image is not 2D (shape {raw.shape})")
    img = raw.T  # MATLAB arrays are stored column-major -> transposed in HDF5
    meta: dict = {"format": "mat", "orig_dtype": raw.dtype.name, "orig_shape": tuple(img.shape)}
    if window is not None:
        image = _apply_center_width(img, window)
        meta["window"] = tuple(window)
    else:
        image = _minmax(img)
        meta["window"] = None
        meta["normalisation"] = "minmax"
    mask = None
    if mask_raw is not None and mask_raw.size:
        m = mask_raw.T
        if m.shape != img.shape:
            raise ScanReadError(key, f"tumorMask shape {m.shape} does not match image shape {img.shape}")
        mask = np.where(m > 0, 255, 0).astype(np.uint8)
    if label_raw is not None and label_raw.size == 1:
        lid = int(label_raw.reshape(-1)[0])
        meta["label_id"] = lid
        if lid in FIGSHARE_LABELS:
            meta["label"] = FIGSHARE_LABELS[lid]
    if pid_raw is not None and pid_raw.size:
        codes = pid_raw.reshape(-1)
        if codes.dtype.kind in "ui":
            meta["pid"] = "".join(chr(int(c)) for c in codes if int(c) > 0)
        elif codes.dtype.kind == "S":
            meta["pid"] = b"".join(codes).decode("utf-8", "replace")
    return [Scan(image=image, key=key, meta=meta, mask=mask)]


# --------------------------------------------------------------------------- entry points

_NIFTI_MODES = ("all", "middle", "nonempty")
DICOM_WINDOWS = ("file", "minmax")


def check_dicom_window(value: str) -> str:
    """``value`` when it is one of :data:`DICOM_WINDOWS`, else ValueError (a batch checks it once,
    up front: per file, every scan would become an error row)."""
    if value not in DICOM_WINDOWS:
        raise ValueError(f"dicom_window must be one of {', '.join(DICOM_WINDOWS)}, got {value!r}")
    return value


def read_scans(path: PathLike, *, nifti_slices: Union[str, Sequence[int]] = "nonempty",
               window: tuple[float, float] | None = None, dicom_window: str = "file") -> list[Scan]:
    """Read one file into a list of :class:`Scan` (each image (H, W) uint8).

    2D formats give exactly one Scan.  A 3D NIfTI volume gives one Scan per selected slice along
    the file's third voxel axis (``#z=NN`` and ``meta["slice_index"]`` count as the file does, as a
    viewer's slice number does; ``meta["plane"]`` says axial, coronal or sagittal), turned by the
    file's affine the way radiology viewers show it: the patient's right on the screen's left,
    superior (axial: anterior) at the top, anterior on the left of a sagittal slice.
    ``nifti_slices`` is "all", "middle", "nonempty" (slices that are not one value after the
    volume's window; may give an empty list for a blank volume) or a sequence of slice indices.
    A 2D NIfTI (or a 4D one with last dim 1) is read as a volume of one slice, its key the plain path.

    ``window=(center, width)``, in the file's intensity units (after DICOM rescale),
    overrides the default per-format normalisation described in the module docstring.
    ``dicom_window``: ``file`` (a DICOM's own WindowCenter/Width where it has one, as viewers
    open it) or ``minmax`` (the full range of its values, whatever window the file suggests).

    Raises ScanReadError for any unreadable file; ValueError for bad arguments.
    """
    window = _check_window(window)
    check_dicom_window(dicom_window)
    if isinstance(nifti_slices, str):
        if nifti_slices not in _NIFTI_MODES:
            raise ValueError(f"nifti_slices must be one of {_NIFTI_MODES} or a list of ints, got {nifti_slices!r}")
    else:
        try:
            nifti_slices = [int(z) for z in nifti_slices]
        except (TypeError, ValueError):
            raise ValueError(f"nifti_slices must be one of {_NIFTI_MODES} or a list of ints, got {nifti_slices!r}") from None

    key = os.fspath(path)
    key = key if isinstance(key, str) else os.fsdecode(key)
    p = Path(key)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ScanReadError(key, "file not found") from None
    except OSError as e:
        raise ScanReadError(key, f"cannot access file: {e.strerror or e}") from None
    if not p.is_file():
        raise ScanReadError(key, "not a regular file")
    if st.st_size == 0:
        raise ScanReadError(key, "empty file (0 bytes)")

    suf = _suffix(p)
    try:
        if _has_dicm_magic(p) or suf in _DICOM_SUFFIXES:
            return _read_dicom(p, key, window, nifti_slices, dicom_window)
        if suf in _RASTER_SUFFIXES:
            return _read_raster(p, key, window)
        if suf in _NIFTI_SUFFIXES:
            return _read_nifti(p, key, window, nifti_slices)
        if suf == ".mat":
            return _read_mat(p, key, window)
    except (ScanReadError, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - last line of defence: never leak library errors
        raise ScanReadError(key, f"unreadable file: {type(e).__name__}: {e}") from e
    if suf == "":
        raise ScanReadError(key, "unsupported file type (no suffix and no DICOM magic)")
    raise ScanReadError(key, f"unsupported file type {suf!r}")


def read_scan(path: PathLike, **kw) -> Scan:
    """Read one (H, W) uint8 Scan: the file's only image, or the middle selected slice
    of a volume.  Same keywords as :func:`read_scans`; ScanReadError if none selected."""
    scans = read_scans(path, **kw)
    if not scans:
        raise ScanReadError(os.fspath(path), "no slices selected (volume is blank)")
    return scans[len(scans) // 2]


def parse_nifti_slices(text: str):
    """``all`` | ``middle`` | ``nonempty`` | ``"3,4,5"`` -> the ``nifti_slices`` value of :func:`read_scans`."""
    if text in ("all", "middle", "nonempty"):
        return text
    try:
        picked = [int(z) for z in str(text).split(",") if z.strip()]
    except ValueError:
        picked = []
    if not picked:
        raise argparse.ArgumentTypeError(f"expected all | middle | nonempty | a comma list of slice indices, "
                                         f"got {text!r}")
    return picked
