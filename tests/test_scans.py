"""Tests for pipeline.scans: every fixture is written into tmp_path at run time."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.scans import (
    SUPPORTED_SUFFIXES,
    Scan,
    ScanReadError,
    is_scan_file,
    iter_scan_files,
    read_scan,
    read_scans,
)
from tests.scan_fixtures import write_dicom, write_jpeg, write_mat, write_nifti, write_png

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _gradient(h=32, w=48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 4 + y * 2) % 256).astype(np.uint8)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, as Pillow computes it (fixed point, rounded)."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _write_truncated_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_jpeg(path, rng.integers(0, 256, (64, 64), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# ----------------------------------------------------------------------------- errors


def test_scan_read_error_shape_and_pickle():
    err = ScanReadError("a/b.png", "empty file (0 bytes)")
    assert isinstance(err, ValueError)
    assert (err.path, err.reason, str(err)) == ("a/b.png", "empty file (0 bytes)", "a/b.png: empty file (0 bytes)")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, str(back)) == (err.path, err.reason, str(err))


def test_empty_jpeg(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ScanReadError) as ei:
        read_scans(p)
    assert ei.value.path == str(p)
    assert "empty" in ei.value.reason and str(p) in str(ei.value)


def test_truncated_jpeg(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    p = _write_truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(ScanReadError) as ei:
        read_scans(p)
    assert ei.value.reason.startswith("truncated or corrupt image")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # global left alone


def test_text_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(ScanReadError) as ei:
        read_scans(p)
    assert ei.value.reason == "not an image file (unrecognised content)"


def test_unsupported_suffix_and_missing_file(tmp_path):
    p = tmp_path / "data.xyz"
    p.write_bytes(b"\x00" * 300)
    with pytest.raises(ScanReadError, match="unsupported file type '.xyz'"):
        read_scans(p)
    with pytest.raises(ScanReadError, match="file not found"):
        read_scans(tmp_path / "nope.png")
    with pytest.raises(ScanReadError, match="not a regular file"):
        read_scans(tmp_path)


def test_bad_arguments_are_plain_value_errors(tmp_path):
    p = write_png(tmp_path / "a.png", _gradient())
    with pytest.raises(ValueError) as ei:
        read_scans(p, window=(10, 0))
    assert not isinstance(ei.value, ScanReadError)
    with pytest.raises(ValueError):
        read_scans(p, nifti_slices="some")


def test_import_is_lazy():
    code = ("import sys, pipeline.scans; "
            "print(sorted(m for m in ('pydicom', 'nibabel', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout.strip()
    assert out == "[]"


# ----------------------------------------------------------------------------- raster


def test_png_gray_exact(tmp_path):
    arr = _gradient()
    p = write_png(tmp_path / "g.png", arr)
    scans = read_scans(p)
    assert len(scans) == 1
    s = scans[0]
    assert isinstance(s, Scan) and s.key == str(p) and s.mask is None
    assert s.image.dtype == np.uint8 and s.image.shape == arr.shape
    np.testing.assert_array_equal(s.image, arr)
    assert s.meta["format"] == "png" and s.meta["orig_mode"] == "L"
    assert s.meta["orig_dtype"] == "uint8" and s.meta["orig_shape"] == arr.shape


def test_jpeg_gray_and_rgb(tmp_path):
    arr = _gradient()
    s = read_scan(write_jpeg(tmp_path / "g.jpeg", arr))
    assert s.meta["format"] == "jpeg" and s.meta["orig_mode"] == "L"
    assert s.image.shape == arr.shape and s.image.dtype == np.uint8
    assert np.abs(s.image.astype(int) - arr).mean() < 4  # lossy but close

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[..., 0] = 200  # pure-ish red -> luma ~ 60
    s = read_scan(write_jpeg(tmp_path / "c.jpg", rgb))
    assert s.meta["orig_mode"] == "RGB" and s.meta["orig_shape"] == (20, 30, 3)
    assert s.image.shape == (20, 30)
    assert abs(float(s.image.mean()) - 200 * 0.299) < 4


def test_rgb_png_uses_luma(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    s = read_scan(write_png(tmp_path / "rgb.png", rgb))
    np.testing.assert_array_equal(s.image, _luma(rgb))


def test_rgba_png_alpha_dropped(tmp_path):
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (16, 24, 4), dtype=np.uint8)
    rgba[:8, :, 3] = 0  # fully transparent rows must still give the RGB luma
    s = read_scan(write_png(tmp_path / "rgba.png", rgba))
    assert s.meta["orig_mode"] == "RGBA" and s.meta["orig_shape"] == (16, 24, 4)
    assert s.image.shape == (16, 24)
    np.testing.assert_array_equal(s.image, _luma(rgba[..., :3]))


def test_palette_and_bilevel_png(tmp_path):
    arr = _gradient()
    p = tmp_path / "p.png"
    Image.fromarray(arr).convert("P").save(p)
    s = read_scan(p)
    assert s.meta["orig_mode"] == "P"
    np.testing.assert_array_equal(s.image, np.asarray(Image.open(p).convert("L")))

    bits = np.zeros((8, 8), bool)
    bits[2:5, 3:6] = True
    p1 = tmp_path / "b.png"
    Image.fromarray(bits).save(p1)
    s = read_scan(p1)
    assert s.meta["orig_mode"] == "1"
    np.testing.assert_array_equal(s.image, np.where(bits, 255, 0).astype(np.uint8))


def test_16bit_png_minmax(tmp_path):
    ramp = np.linspace(1000, 5000, 64 * 32).reshape(32, 64).astype(np.uint16)
    s = read_scan(write_png(tmp_path / "d16.png", ramp))
    assert s.meta["orig_mode"].startswith("I") and s.meta["orig_dtype"] in ("uint16", "int32")
    assert s.meta["normalisation"] == "minmax"
    img = s.image
    assert img.dtype == np.uint8 and img.shape == ramp.shape
    assert img.min() == 0 and img.max() == 255
    assert img[0, 0] == 0 and img[-1, -1] == 255
    flat = img.reshape(-1)  # ramp is row-major increasing
    assert np.all(np.diff(flat.astype(int)) >= 0)
    expected = np.round((ramp.astype(float) - 1000) / 4000 * 255)
    assert np.abs(img - expected).max() <= 1


@pytest.mark.parametrize("kind", ["rgb16.png", "grey_alpha16.png", "rgb16.tiff"])
def test_16bit_colour_keeps_its_low_bits(tmp_path, kind):
    import cv2

    ramp = np.tile(np.linspace(0, 4095, 8).astype(np.uint16), (3, 1))  # 12 bits stored in 16: dark at 8 bits
    if kind.startswith("grey_alpha"):
        import struct
        import zlib

        from PIL import Image

        def chunk(tag, data):
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        # neither Pillow nor OpenCV writes 16-bit grey+alpha (PNG colour type 4): write the chunks
        h, w = ramp.shape
        la = np.stack([ramp, np.full_like(ramp, 65535)], -1).astype(">u2")
        rows = b"".join(b"\0" + la[y].tobytes() for y in range(h))
        path = tmp_path / kind
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0))
                         + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
        assert Image.open(path).mode in ("LA", "RGBA")  # Pillow opens it as 8-bit RGBA
    else:
        path = tmp_path / kind
        assert cv2.imwrite(str(path), np.stack([ramp, ramp, ramp], -1))
    s = read_scan(path)
    assert s.meta["orig_dtype"] == "uint16"
    np.testing.assert_array_equal(s.image[0], np.round(np.linspace(0, 255, 8)).astype(np.uint8))


def test_16bit_colour_png_with_an_exif_orientation_is_turned_at_full_depth(tmp_path):
    import struct
    import zlib

    import cv2
    from PIL import Image

    rng = np.random.default_rng(5)
    grey = rng.integers(0, 4096, (6, 9), dtype=np.uint16)  # 12 bits in 16
    ok, png = cv2.imencode(".png", np.stack([grey, grey, grey], -1))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: a viewer turns it 90 degrees clockwise
    body = exif.tobytes()
    body = body[6:] if body.startswith(b"Exif\0\0") else body
    chunk = struct.pack(">I", len(body)) + b"eXIf" + body + struct.pack(">I", zlib.crc32(b"eXIf" + body))
    data = png.tobytes()
    (tmp_path / "turned16.png").write_bytes(data[:33] + chunk + data[33:])  # after IHDR, before IDAT
    s = read_scan(tmp_path / "turned16.png")
    assert s.meta["orig_dtype"] == "uint16" and s.meta["format"] == "png" and s.meta["exif_orientation"] == 6
    g = grey.astype(np.float64)
    want = np.round((g - g.min()) / (g.max() - g.min()) * 255)
    np.testing.assert_allclose(s.image, np.rot90(want, -1), atol=1)


def test_exif_turns_of_arrays_match_pillow():
    import io

    from PIL import Image, ImageOps

    from pipeline.scans import _EXIF_TURNS

    arr = np.arange(3 * 5, dtype=np.uint8).reshape(3, 5) * 10
    for orientation in range(2, 9):
        im = Image.fromarray(arr)
        exif = im.getexif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        im.save(buf, format="PNG", exif=exif)
        want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))
        np.testing.assert_array_equal(_EXIF_TURNS[orientation](arr), want, err_msg=str(orientation))


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
@pytest.mark.parametrize("orientation", range(2, 9))
def test_a_tiff_with_an_exif_orientation_is_turned_right_at_any_depth(tmp_path, orientation, compression):
    # Pillow turns a TIFF while loading it, and scrambled uncompressed ones whose turn swaps the axes
    from pipeline.scans import _EXIF_TURNS

    grey8 = (np.arange(12).reshape(3, 4) * 20).astype(np.uint8)
    want = _EXIF_TURNS[orientation](grey8)
    for dtype in (np.uint8, np.uint16):
        im = Image.fromarray(grey8.astype(dtype) * (257 if dtype == np.uint16 else 1))
        exif = im.getexif()
        exif[0x0112] = orientation
        im.save(tmp_path / "a.tif", exif=exif, **({"compression": compression} if compression else {}))
        s = read_scan(tmp_path / "a.tif")
        assert s.meta["exif_orientation"] == orientation and s.image.shape == want.shape
        if dtype == np.uint8:
            np.testing.assert_array_equal(s.image, want)
        else:  # a 16-bit slice is stretched over its own range: the same picture, up to that scale
            np.testing.assert_array_equal(np.argsort(s.image, axis=None, kind="stable"),
                                          np.argsort(want, axis=None, kind="stable"))


def test_a_turned_uncompressed_miniswhite_tiff_keeps_its_polarity(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from pipeline.scans import _EXIF_TURNS

    grey8 = (np.arange(12).reshape(3, 4) * 20).astype(np.uint8)
    tifffile.imwrite(tmp_path / "w.tif", 255 - grey8, photometric="miniswhite", extratags=[(274, "H", 1, 6, True)])
    np.testing.assert_array_equal(read_scan(tmp_path / "w.tif").image, _EXIF_TURNS[6](grey8))


@pytest.mark.parametrize("dtype, compression", [(np.uint16, None), (np.uint16, "zlib"), (np.float32, None)])
def test_a_high_depth_miniswhite_tiff_is_read_as_shown(tmp_path, dtype, compression):
    tifffile = pytest.importorskip("tifffile")

    dark_square = np.zeros((8, 8), dtype)
    dark_square[2:6, 2:6] = 1000  # MINISWHITE: the high values are the dark ones
    tifffile.imwrite(tmp_path / "w.tif", dark_square, photometric="miniswhite", compression=compression)
    image = read_scan(tmp_path / "w.tif").image
    assert image[4, 4] == 0 and image[0, 0] == 255


@pytest.mark.parametrize("name, arr", [
    ("f64.tif", np.linspace(0, 1, 64).reshape(8, 8)),
    ("grey_alpha16.tif", np.stack([np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000,
                                   np.full((8, 8), 65535, np.uint16)], -1)),
])
def test_tiffs_pillow_cannot_decode_are_read_with_tifffile(tmp_path, name, arr):
    tifffile = pytest.importorskip("tifffile")

    tifffile.imwrite(tmp_path / name, arr, photometric="minisblack", planarconfig="contig",
                     extrasamples=["unassalpha"] if arr.ndim == 3 else None)
    s = read_scan(tmp_path / name)
    assert s.image.shape == (8, 8) and s.image[0, 0] == 0 and s.image[7, 7] == 255
    assert np.all(np.diff(s.image.astype(int).ravel()) >= 0)  # the grey ramp, alpha left out


def test_a_planar_tiff_pillow_cannot_open_keeps_its_rows_and_columns(tmp_path):
    tifffile = pytest.importorskip("tifffile")

    ramp = np.arange(8 * 6, dtype=np.float64).reshape(8, 6)
    tifffile.imwrite(tmp_path / "p.tif", np.stack([ramp, ramp, ramp]), photometric="rgb", planarconfig="separate")
    s = read_scan(tmp_path / "p.tif")
    assert s.image.shape == (8, 6) and s.image[0, 0] == 0 and s.image[7, 5] == 255


def test_a_signed_miniswhite_tiff_under_a_window(tmp_path):
    tifffile = pytest.importorskip("tifffile")

    stored = np.array([[-3000, 0, 3000]], np.int16)  # MINISWHITE: -3000 is the whitest
    tifffile.imwrite(tmp_path / "s.tif", stored, photometric="miniswhite")
    shown = read_scan(tmp_path / "s.tif", window=(0, 8000)).image  # as MINISBLACK: 2999, -1, -3001
    assert shown[0, 0] > shown[0, 1] > shown[0, 2] and 120 <= shown[0, 1] <= 135


def test_a_tiff_stack_cut_short_is_called_corrupt(tmp_path):
    tifffile = pytest.importorskip("tifffile")

    tifffile.imwrite(tmp_path / "s.tif", (np.arange(5 * 64 * 64) % 251).astype(np.uint8).reshape(5, 64, 64))
    data = (tmp_path / "s.tif").read_bytes()
    (tmp_path / "s.tif").write_bytes(data[:int(len(data) * 0.9)])
    with pytest.raises(ScanReadError, match="truncated or corrupt"):
        read_scan(tmp_path / "s.tif")


def test_16bit_constant_maps_to_zero_and_window(tmp_path):
    s = read_scan(write_png(tmp_path / "c16.png", np.full((10, 10), 1234, np.uint16)))
    assert s.image.dtype == np.uint8 and not s.image.any()

    vals = np.array([[0, 100, 200, 300]], np.uint16)
    s = read_scan(write_png(tmp_path / "w16.png", vals), window=(150, 300))
    np.testing.assert_array_equal(s.image, [[0, 85, 170, 255]])


def test_tiff_8bit_and_16bit(tmp_path):
    arr = _gradient()
    p = tmp_path / "a.tif"
    Image.fromarray(arr).save(p)
    s = read_scan(p)
    assert s.meta["format"] == "tiff"
    np.testing.assert_array_equal(s.image, arr)

    ramp = (np.arange(40, dtype=np.uint16).reshape(5, 8) * 1000)
    p16 = tmp_path / "b.tiff"
    Image.fromarray(ramp).save(p16)
    s = read_scan(p16)
    assert s.image[0, 0] == 0 and s.image[-1, -1] == 255
    assert np.all(np.diff(s.image.reshape(-1).astype(int)) > 0)


def test_bmp_rgb(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    p = tmp_path / "x.bmp"
    Image.fromarray(rgb).save(p)
    s = read_scan(p)
    assert s.meta["format"] == "bmp"
    np.testing.assert_array_equal(s.image, _luma(rgb))


# ----------------------------------------------------------------------------- DICOM

_STORED = np.array([[50, 100, 150, 200]] * 3, np.uint16)  # -> slope 2, intercept -100 -> 0,100,200,300


def test_dicom_rescale_and_file_window(tmp_path):
    p = write_dicom(tmp_path / "a.dcm", _STORED, slope=2, intercept=-100, window=(150, 200),
                    pixel_spacing=(0.5, 0.7), series_description="T1 post", patient_id="P42")
    s = read_scan(p)
    assert s.image.dtype == np.uint8 and s.image.shape == (3, 4)
    # window [50, 250]: 0 -> 0, 100 -> 63.75, 200 -> 191.25, 300 -> 255
    np.testing.assert_array_equal(s.image[0], [0, 64, 191, 255])
    m = s.meta
    assert m["format"] == "dicom" and m["orig_dtype"] == "uint16" and m["orig_shape"] == (3, 4)
    assert m["rescale"] == (2.0, -100.0) and m["window"] == (150.0, 200.0) and m["window_source"] == "file"
    assert m["spacing"] == (0.5, 0.7) and m["modality"] == "MR"
    assert m["series_description"] == "T1 post" and m["pid"] == "P42"


def test_dicom_user_window_overrides_and_minmax_default(tmp_path):
    p = write_dicom(tmp_path / "a.dcm", _STORED, slope=2, intercept=-100, window=(150, 200))
    s = read_scan(p, window=(150, 300))  # [0, 300] in rescaled units
    np.testing.assert_array_equal(s.image[0], [0, 85, 170, 255])
    assert s.meta["window_source"] == "user"

    p2 = write_dicom(tmp_path / "b.dcm", _STORED, slope=2, intercept=-100)
    s2 = read_scan(p2)
    np.testing.assert_array_equal(s2.image[0], [0, 85, 170, 255])
    assert s2.meta["window"] is None and s2.meta["window_source"] == "minmax"

    p3 = write_dicom(tmp_path / "c.dcm", _STORED)  # slope/intercept default to 1/0
    s3 = read_scan(p3, window=(125, 150))  # [50, 200] raw
    np.testing.assert_array_equal(s3.image[0], [0, 85, 170, 255])
    assert s3.meta["rescale"] == (1.0, 0.0)


def test_dicom_multivalue_window_takes_first(tmp_path):
    p = write_dicom(tmp_path / "mv.dcm", _STORED, slope=2, intercept=-100, window=([150, 40], [200, 80]))
    s = read_scan(p)
    assert s.meta["window"] == (150.0, 200.0)
    np.testing.assert_array_equal(s.image[0], [0, 64, 191, 255])


def test_dicom_monochrome1_inverted(tmp_path):
    p = write_dicom(tmp_path / "m1.dcm", _STORED, slope=2, intercept=-100, window=(150, 200),
                    photometric="MONOCHROME1")
    s = read_scan(p)
    np.testing.assert_array_equal(s.image[0], [255, 191, 64, 0])


def test_dicom_signed_implicit_vr_and_no_suffix(tmp_path):
    arr = np.array([[-1000, 0], [500, 1000]], np.int16)
    p = write_dicom(tmp_path / "IM0001", arr, implicit_vr=True)
    assert is_scan_file(p)
    s = read_scan(p)
    assert s.meta["format"] == "dicom" and s.meta["orig_dtype"] == "int16"
    np.testing.assert_array_equal(s.image, [[0, 128], [191, 255]])


def test_dicom_multiframe_is_a_volume_of_frames(tmp_path):
    frames = np.stack([np.arange(12, dtype=np.uint16).reshape(3, 4) * (k + 1) for k in range(3)])
    frames[1] = frames[1][::-1]  # make the middle frame distinguishable
    p = write_dicom(tmp_path / "mf.dcm", frames)
    scans = read_scans(p, nifti_slices="all")
    assert [s.key for s in scans] == [f"{p}#z={k:02d}" for k in range(3)]  # every frame, each named
    assert [s.meta["frame_index"] for s in scans] == [0, 1, 2] and all(s.meta["n_frames"] == 3 for s in scans)
    s = read_scan(p)  # the middle frame
    assert s.meta["frame_index"] == 1 and s.key == f"{p}#z=01"
    assert s.meta["orig_shape"] == (3, 3, 4) and s.image.shape == (3, 4)
    assert s.image[-1, 0] == 0 and np.argmax(s.image[0]) == 3  # the reversed ramp
    # one intensity range for the series, as for a volume: the brightest voxel is in the last frame
    assert scans[2].image.max() == 255 and scans[0].image.max() < scans[1].image.max() < 255
    assert [x.key for x in read_scans(p, nifti_slices=[2])] == [f"{p}#z=02"]


def test_dicom_colour_is_luma_whatever_the_photometric(tmp_path):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    def write(name, rgb, photometric):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(tmp_path / name), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PlanarConfiguration = 2, 6, 3, 0
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        if photometric == "YBR_FULL":
            rgb = pydicom.pixels.convert_color_space(rgb, "RGB", "YBR_FULL")
        ds.PixelData = np.ascontiguousarray(rgb, np.uint8).tobytes()
        ds.save_as(tmp_path / name, enforce_file_format=True)
        return read_scan(tmp_path / name).image

    rgb = np.zeros((2, 6, 3), np.uint8)
    rgb[:, :2, 1] = 255  # green: luma 150
    rgb[:, 2:4, 0] = 255  # red: luma 76
    rgb[:, 4:, 2] = 255  # blue: luma 29
    for photometric in ("RGB", "YBR_FULL"):
        image = write(f"{photometric}.dcm", rgb, photometric)
        # min-max after luma: green 255, red (76 - 29) / (150 - 29) of the range, blue 0
        assert (image[0, 0], image[0, 5]) == (255, 0), photometric
        assert abs(int(image[0, 2]) - round(255 * 47 / 121)) <= 3, photometric


def test_enhanced_dicom_scales_each_frame_and_uses_its_shared_window(tmp_path):
    # Philips-style enhanced MR: both frames store 0..300, frame 1 with slope 2; window [0, 300] shared
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    enhanced_mr = "1.2.840.10008.5.1.4.1.1.4.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = enhanced_mr, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "enh.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.Modality = enhanced_mr, "MR"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 3, 4, 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = np.stack([np.tile(np.arange(0, 400, 100, dtype=np.uint16), (3, 1))] * 2).tobytes()
    frames = []
    for slope in (1.0, 2.0):
        scaling = Dataset()
        scaling.RescaleSlope, scaling.RescaleIntercept, scaling.RescaleType = slope, 0, "US"
        group = Dataset()
        group.PixelValueTransformationSequence = Sequence([scaling])
        frames.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    voi, shared = Dataset(), Dataset()
    voi.WindowCenter, voi.WindowWidth = 150, 300
    shared.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.save_as(tmp_path / "enh.dcm", enforce_file_format=True)
    first, second = read_scans(tmp_path / "enh.dcm", nifti_slices="all")
    assert first.image[0].tolist() == [0, 85, 170, 255] and second.image[0].tolist() == [0, 170, 255, 255]
    assert first.meta["window_source"] == "file" and first.meta["rescale_per_frame"] == [(1.0, 0.0), (2.0, 0.0)]


def test_dicom_palette_colour_is_read_through_its_colour_table():
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_color_lut

    path = get_testdata_file("examples_palette.dcm")  # ships inside pydicom
    ds = pydicom.dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    luma = rgb @ [0.299, 0.587, 0.114]
    image = read_scan(path).image.astype(np.float64)
    assert np.corrcoef(luma.ravel(), image.ravel())[0, 1] > 0.999  # the indices alone: 0.70
    assert np.corrcoef(ds.pixel_array.ravel().astype(np.float64), image.ravel())[0, 1] < 0.9


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_compressed_dicom_reads_as_its_uncompressed_copy(name):
    from pydicom.data import get_testdata_file

    np.testing.assert_array_equal(read_scan(get_testdata_file(name)).image,
                                  read_scan(get_testdata_file("MR_small.dcm")).image)


def test_dicom_without_pixel_data(tmp_path):
    p = write_dicom(tmp_path / "nopix.dcm", _STORED, pixel_data=False)
    with pytest.raises(ScanReadError) as ei:
        read_scans(p)
    assert ei.value.reason == "no pixel data"


def test_garbage_dcm(tmp_path):
    p = tmp_path / "junk.dcm"
    p.write_bytes(b"\xff\xfe garbage" * 10)
    with pytest.raises(ScanReadError):
        read_scans(p)
    # bytes that pydicom's lenient parser takes for a dataset without pixels: said to be no DICOM at all
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(ScanReadError, match="not a DICOM file"):
        read_scans(p)


# ----------------------------------------------------------------------------- NIfTI


def _volume(x=32, y=24, z=5) -> np.ndarray:
    vol = np.zeros((x, y, z), np.float32)
    gx, gy = np.mgrid[0:x, 0:y]
    for k in range(1, z - 1):  # first and last slices blank
        vol[:, :, k] = 100 + gx + gy + 10 * k
    vol[1, y - 2, 2] = 5000  # bright marker: x=1, y=Y-2 on slice 2
    return vol


def test_nifti_all_keys_orientation_and_spacing(tmp_path):
    p = write_nifti(tmp_path / "vol.nii.gz", _volume(), zooms=(0.9, 0.8, 3.0))
    scans = read_scans(p, nifti_slices="all")
    assert [s.key for s in scans] == [f"{p}#z={z:02d}" for z in range(5)]
    assert scans[3].key.endswith("vol.nii.gz#z=03")
    for z, s in enumerate(scans):
        assert s.image.dtype == np.uint8 and s.image.shape == (24, 32)  # (Y, X) after transpose
        assert s.meta["slice_index"] == z and s.meta["format"] == "nifti"
        assert s.meta["orig_shape"] == (32, 24, 5) and s.meta["spacing"] == pytest.approx((0.8, 0.9))
    assert not scans[0].image.any() and not scans[4].image.any()
    # radiology display of an RAS file: voxel (x=1, y=Y-2) lands at row 1 (anterior at the top) and
    # col X-2 (the patient's right, +x, on the screen's left)
    img = scans[2].image
    assert img[1, 30] == 255 and np.unravel_index(np.argmax(img), img.shape) == (1, 30)
    # increasing y (anterior) runs upwards in the display, increasing x (right) runs left
    assert img[20, 10] < img[5, 10] and img[10, 5] > img[10, 20]
    assert all(s.meta["plane"] == "axial" and s.meta["slice_thickness"] == pytest.approx(3.0) for s in scans)
    # one window per volume: the same voxel ramp is brighter on later slices
    assert scans[1].image[10, 10] < scans[2].image[10, 10] < scans[3].image[10, 10]


def _marker_volume(shape, at):
    vol = np.full(shape, 50, np.float32)
    vol[at] = 1000
    return vol


def _argmax(image):
    return tuple(int(v) for v in np.unravel_index(np.argmax(image), image.shape))


_AFFINES = {
    "ras": np.eye(4),
    "lps": np.diag([-1.0, -1.0, 1.0, 1.0]),
    "coronal": np.array([[0.9, 0, 0, 0], [0, 0, 6.0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1]]),
    "sagittal_flipped": np.array([[0, 0, -3.0, 0], [-1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]]),
    "tilted": np.array([[0.98, 0.17, 0, 0], [-0.17, 0.98, 0, 0], [0, 0, -1.0, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(_AFFINES))
@pytest.mark.parametrize("shape", [(12, 10, 4), (1, 12, 10), (12, 1, 10), (12, 10), (12, 10, 3, 1)])
def test_slice_masks_as_shown_go_back_into_the_files_voxel_grid(tmp_path, name, shape):
    from pipeline.scans import write_nifti_mask
    import nibabel as nib

    rng = np.random.default_rng(0)
    vol = np.where(rng.random(shape) < 0.2, 1000, 50).astype(np.float32)
    src = write_nifti(tmp_path / "v.nii.gz", vol, affine=_AFFINES[name])
    scans = read_scans(src, nifti_slices="all")
    # segment's PNGs: the slices as shown; here each voxel of 1000 is "tumor"
    masks = {s.meta.get("slice_index", 0): (s.image > 128).astype(np.uint8) * 255 for s in scans}
    out = write_nifti_mask(src, masks, tmp_path / "m" / "v_mask.nii.gz")
    back = nib.load(out)
    assert back.shape == vol.shape and back.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(back.dataobj), (vol > 500).astype(np.uint8))
    np.testing.assert_allclose(back.affine, nib.load(src).affine, atol=1e-6)


def test_slices_without_a_mask_are_background_in_the_mask_volume(tmp_path):
    from pipeline.scans import write_nifti_mask
    import nibabel as nib

    src = write_nifti(tmp_path / "v.nii.gz", np.full((8, 6, 3), 1000, np.float32))
    out = write_nifti_mask(src, {1: np.full((6, 8), 255, np.uint8)}, tmp_path / "m.nii.gz")
    data = np.asarray(nib.load(out).dataobj)
    assert data[:, :, 1].all() and not data[:, :, [0, 2]].any()
    with pytest.raises(ValueError, match="does not fit"):
        write_nifti_mask(src, {1: np.ones((8, 6), np.uint8)}, tmp_path / "m.nii.gz")


def test_nifti_coronal_and_sagittal_stacks_are_cut_in_their_own_plane(tmp_path):
    # a coronal stack: voxel axes run toward R, S, A, 5 thick slices of 64 x 48
    coronal = np.array([[0.9, 0, 0, 0], [0, 0, 6.0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1]])
    p = write_nifti(tmp_path / "cor.nii.gz", _marker_volume((64, 48, 5), (60, 40, 2)), affine=coronal,
                    zooms=(0.9, 0.8, 6.0))
    scans = read_scans(p, nifti_slices="all")
    assert [s.key for s in scans] == [f"{p}#z={z:02d}" for z in range(5)]  # 5 slices, not 48 strips
    s = scans[2]
    assert s.image.shape == (48, 64) and s.meta["plane"] == "coronal"
    assert s.meta["spacing"] == pytest.approx((0.8, 0.9)) and s.meta["slice_thickness"] == pytest.approx(6.0)
    # superior (voxel y = 40 of 48) near the top; the patient's right (voxel x = 60 of 64) on the left
    assert _argmax(s.image) == (47 - 40, 63 - 60)
    # a sagittal stack: voxel axes run toward A, S, R; anterior on the left, superior at the top
    sagittal = np.array([[0, 0, 5.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    q = write_nifti(tmp_path / "sag.nii", _marker_volume((40, 30, 3), (35, 25, 1)), affine=sagittal)
    (t,) = read_scans(q, nifti_slices=[1])
    assert t.image.shape == (30, 40) and t.meta["plane"] == "sagittal"
    assert _argmax(t.image) == (29 - 25, 39 - 35)


def test_nifti_single_slice_on_the_first_or_second_axis_is_one_slice_of_its_plane(tmp_path):
    # a sagittal stack as above, and its slice 1 alone stored the RAS way: shape (1, A, S)
    sagittal = np.array([[0, 0, 5.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    stack = _marker_volume((40, 30, 3), (35, 25, 1))
    (t,) = read_scans(write_nifti(tmp_path / "sag.nii", stack, affine=sagittal), nifti_slices=[1])
    scans = read_scans(write_nifti(tmp_path / "one.nii", stack[None, :, :, 1]), nifti_slices="all")
    assert len(scans) == 1 and scans[0].meta["plane"] == "sagittal"  # not 30 one-pixel lines
    np.testing.assert_array_equal(scans[0].image, t.image)
    coronal = read_scans(write_nifti(tmp_path / "cor.nii", stack[:, None, :, 1]), nifti_slices="all")
    assert len(coronal) == 1 and coronal[0].meta["plane"] == "coronal" and coronal[0].image.shape == (30, 40)


def test_nifti_slices_named_twice_give_one_slice_and_an_empty_list_is_refused(tmp_path):
    import argparse

    from pipeline.scans import parse_nifti_slices

    p = write_nifti(tmp_path / "vol.nii", _volume())
    assert [s.meta["slice_index"] for s in read_scans(p, nifti_slices=[1, 1, -4, 3])] == [1, 3]
    for text in ("", ",", " "):
        with pytest.raises(argparse.ArgumentTypeError, match="comma list"):
            parse_nifti_slices(text)


def test_nifti_slices_keep_the_file_numbering_and_turn_the_same_as_ras(tmp_path):
    ras = write_nifti(tmp_path / "ras.nii", _marker_volume((20, 16, 6), (3, 12, 4)))
    # the same anatomy stored L-P-I: every axis reversed, so file slice 6-1-4 = 1 holds the marker
    lpi_affine = np.diag([-1.0, -1.0, -1.0, 1.0])
    lpi_affine[:3, 3] = [19, 15, 5]
    lpi = write_nifti(tmp_path / "lpi.nii", _marker_volume((20, 16, 6), (16, 3, 1)), affine=lpi_affine)
    (a,) = read_scans(ras, nifti_slices=[4])
    (b,) = read_scans(lpi, nifti_slices=[1])
    assert b.key.endswith("lpi.nii#z=01") and b.meta["slice_index"] == 1
    np.testing.assert_array_equal(a.image, b.image)  # what a viewer shows: the same picture


def test_nifti_infinite_voxels_sit_at_the_ends_of_the_range(tmp_path):
    vol = np.zeros((16, 16, 1), np.float32)
    vol[4:12, 4:12] = 100
    vol[8, 8], vol[0, 0] = np.inf, -np.inf
    image = read_scan(write_nifti(tmp_path / "v.nii", vol)).image
    assert np.count_nonzero(image == 255) == 64  # the tissue, its +inf voxel among it: the top
    assert np.count_nonzero(image == 0) == 256 - 64  # background and -inf: the bottom


def test_nifti_2d_reads_like_a_volume_of_one_slice(tmp_path):
    plane = _marker_volume((6, 8), (5, 7))
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    flat = read_scan(write_nifti(tmp_path / "flat.nii", plane, affine=flipped))
    one = read_scan(write_nifti(tmp_path / "one.nii", plane[:, :, None], affine=flipped))
    np.testing.assert_array_equal(flat.image, one.image)
    assert _argmax(flat.image) == (0, 5)  # x runs toward the left (-1): voxel x = 5 is the 6th column


def test_nifti_selection_modes(tmp_path):
    p = write_nifti(tmp_path / "vol.nii", _volume())
    assert [s.meta["slice_index"] for s in read_scans(p)] == [1, 2, 3]  # default "nonempty"
    assert [s.meta["slice_index"] for s in read_scans(p, nifti_slices="middle")] == [2]
    assert [s.key for s in read_scans(p, nifti_slices=[0, 3])] == [f"{p}#z=00", f"{p}#z=03"]
    assert [s.meta["slice_index"] for s in read_scans(p, nifti_slices=(-1,))] == [4]
    assert read_scan(p).meta["slice_index"] == 2
    with pytest.raises(ScanReadError, match="out of range"):
        read_scans(p, nifti_slices=[7])


def test_nifti_blank_volume_and_binary_mask(tmp_path):
    blank = write_nifti(tmp_path / "blank.nii.gz", np.zeros((8, 8, 3), np.float32))
    assert read_scans(blank) == []
    with pytest.raises(ScanReadError, match="no slices"):
        read_scan(blank)

    mask = np.zeros((8, 8, 3), np.uint8)
    mask[2:4, 2:4, 1] = 1
    s = read_scan(write_nifti(tmp_path / "mask.nii.gz", mask))
    assert set(np.unique(s.image)) == {0, 255}


def test_nifti_2d_and_4d(tmp_path):
    plane = np.arange(16 * 12, dtype=np.float32).reshape(16, 12)
    p = write_nifti(tmp_path / "plane.nii", plane, zooms=(0.5, 0.6))
    scans = read_scans(p)
    assert len(scans) == 1 and scans[0].key == str(p)
    assert scans[0].image.shape == (12, 16)

    v4 = _volume(10, 8, 4)[..., None]
    scans = read_scans(write_nifti(tmp_path / "v4.nii.gz", v4, zooms=(1, 1, 1, 1)), nifti_slices="all")
    assert len(scans) == 4 and scans[0].image.shape == (8, 10)

    bad = write_nifti(tmp_path / "v4b.nii.gz", np.zeros((4, 4, 2, 3), np.float32), zooms=(1, 1, 1, 1))
    with pytest.raises(ScanReadError, match="unsupported NIfTI shape"):
        read_scans(bad)


def test_corrupt_nifti(tmp_path):
    p = tmp_path / "bad.nii.gz"
    p.write_bytes(b"not gzip at all" * 30)
    with pytest.raises(ScanReadError):
        read_scans(p)


# ----------------------------------------------------------------------------- figshare .mat


def test_mat_v73(tmp_path):
    img = (np.arange(6 * 8, dtype=np.int16).reshape(6, 8) * 10)
    img[0, 7] = 2000  # top-right is the brightest pixel
    mask = np.zeros((6, 8), np.uint8)
    mask[1:3, 4:7] = 1
    p = write_mat(tmp_path / "1.mat", img, mask, label=3, pid="MR012345")
    s = read_scan(p)
    assert s.image.shape == (6, 8) and s.image.dtype == np.uint8
    assert s.image[0, 7] == 255 and s.image[0, 0] == 0
    assert s.mask is not None and s.mask.dtype == np.uint8 and s.mask.shape == (6, 8)
    np.testing.assert_array_equal(s.mask, mask * 255)
    assert s.meta["format"] == "mat" and s.meta["label"] == "pituitary" and s.meta["label_id"] == 3
    assert s.meta["pid"] == "MR012345" and s.meta["orig_dtype"] == "int16"
    assert read_scan(write_mat(tmp_path / "2.mat", img, mask, label=1)).meta["label"] == "meningioma"
    assert read_scan(write_mat(tmp_path / "3.mat", img, None, label=2)).meta["label"] == "glioma"


def test_mat_errors(tmp_path):
    v5 = tmp_path / "old.mat"
    v5.write_bytes(b"MATLAB 5.0 MAT-file, Platform: PCWIN64".ljust(128, b" ") + b"\x00" * 64)
    with pytest.raises(ScanReadError) as ei:
        read_scans(v5)
    assert ei.value.reason == "not a MATLAB v7.3 (HDF5) file"

    import h5py

    other = tmp_path / "other.mat"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ScanReadError, match="no cjdata.image"):
        read_scans(other)


# ----------------------------------------------------------------------------- walking


def test_is_scan_file_and_iter(tmp_path):
    assert ".nii.gz" in SUPPORTED_SUFFIXES and all(s == s.lower() for s in SUPPORTED_SUFFIXES)
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    write_png(tmp_path / "b.PNG", _gradient(4, 4))
    write_png(tmp_path / "a.png", _gradient(4, 4))
    write_nifti(tmp_path / "sub" / "v.nii.gz", _volume(4, 4, 3))
    write_dicom(tmp_path / "sub" / "deeper" / "IM0001", _STORED)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub" / "README").write_text("no suffix, not DICOM" * 20)
    write_png(tmp_path / ".hidden.png", _gradient(4, 4))
    write_png(tmp_path / ".git" / "x.png", _gradient(4, 4))

    assert is_scan_file(tmp_path / "sub" / "v.nii.gz") and is_scan_file("x.JPEG")
    assert not is_scan_file(tmp_path / "notes.txt") and not is_scan_file(tmp_path / "sub" / "README")
    found = [p.relative_to(tmp_path).as_posix() for p in iter_scan_files(tmp_path)]
    assert found == ["a.png", "b.PNG", "sub/deeper/IM0001", "sub/v.nii.gz"]
    assert found == [p.relative_to(tmp_path).as_posix() for p in iter_scan_files(str(tmp_path))]
    assert list(iter_scan_files(tmp_path / "a.png")) == [tmp_path / "a.png"]


def test_mixed_folder(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    _write_truncated_jpeg(tmp_path / "truncated.jpg")
    (tmp_path / "text.png").write_text("hello, not a png")
    write_png(tmp_path / "deep16.png", np.linspace(0, 60000, 100).reshape(10, 10).astype(np.uint16))
    write_png(tmp_path / "rgba.png", np.full((6, 6, 4), 128, np.uint8))
    write_dicom(tmp_path / "ct.dcm", _STORED, slope=2, intercept=-100)
    write_nifti(tmp_path / "brain.nii.gz", _volume(8, 8, 4))

    ok, errors = {}, {}
    for f in iter_scan_files(tmp_path):
        try:
            ok[f.name] = read_scans(f)
        except ScanReadError as e:
            errors[f.name] = e.reason
    assert set(errors) == {"empty.jpg", "truncated.jpg", "text.png"}
    assert errors["empty.jpg"] == "empty file (0 bytes)"
    assert errors["truncated.jpg"].startswith("truncated or corrupt image")
    assert errors["text.png"] == "not an image file (unrecognised content)"
    assert set(ok) == {"deep16.png", "rgba.png", "ct.dcm", "brain.nii.gz"}
    assert len(ok["brain.nii.gz"]) == 2  # slices 1, 2 non-blank
    for scans in ok.values():
        for s in scans:
            assert s.image.dtype == np.uint8 and s.image.ndim == 2


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (SHARED_DATASETS / "brain-tumor-mri" / "Testing").is_dir(),
                    reason="shared brain-tumor-mri dataset not present")
def test_real_brain_tumor_mri_jpegs():
    root = SHARED_DATASETS / "brain-tumor-mri" / "Testing"
    for cls in ("glioma", "meningioma", "notumor", "pituitary"):
        files = sorted((root / cls).glob("*.jpg"))
        assert files, cls
        s = read_scan(files[0])
        assert s.image.dtype == np.uint8 and s.image.ndim == 2
        assert min(s.image.shape) >= 64 and s.image.max() > s.image.min()
        assert s.meta["format"] == "jpeg" and s.key == str(files[0])


def test_a_dicoms_own_window_or_its_full_range(tmp_path):
    stored = np.array([[0, 1000, 2000, 4000]], np.uint16)
    p = write_dicom(tmp_path / "w.dcm", stored, window=(1000, 1000))  # a narrow window: 500 .. 1500
    as_filed = read_scan(p)
    assert as_filed.image.tolist() == [[0, 128, 255, 255]] and as_filed.meta["window_source"] == "file"
    full = read_scans(p, dicom_window="minmax")[0]
    assert full.image.tolist() == [[0, 64, 128, 255]] and full.meta["window_source"] == "minmax"
    with pytest.raises(ValueError, match="dicom_window"):
        read_scans(p, dicom_window="narrow")
