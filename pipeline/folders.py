"""Walking scan folders and writing resumable result CSVs: shared by every stage that takes a folder.

A result CSV survives ``kill -9``: rows are appended as whole lines per write (then flushed and
fsync'd), a torn last line left by a killed run is cut off on reopen, and inputs already listed
are skipped, so every input ends up with exactly one row.
"""
from __future__ import annotations

import csv
import io
import os
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import cv2
import numpy as np

from pipeline.scans import Scan, ScanReadError, read_scans

#: what `segment` and `predict` write beside their CSV: a folder holding one is a results folder
OUTPUT_RECORDS = ("segments.csv.settings.json", "predictions.csv.settings.json")
#: the sub-folders of pictures they write there
OUTPUT_FOLDERS = ("masks", "overlays", "gradcam", "previous")


def iter_input_files(root: Path, exclude: Path | None = None,
                     unlisted: list[OSError] | None = None) -> Iterator[Path]:
    """Every non-hidden file under ``root``, sorted, except those under ``exclude`` (the output) and
    DICOMDIR files (a DICOM export's index of its files, not a scan).

    Linked folders are followed (a study tree often links series in), each real folder once. A
    folder that cannot be listed (permissions) is appended to ``unlisted`` when given, else skipped.
    In a folder where an earlier ``segment`` or ``predict`` wrote (its settings record is there), what
    they write (``masks/``, ``overlays/``, ``gradcam/``, the CSVs and records) is skipped: not scans.
    ValueError when ``exclude`` is reached and holds scans of its own: they would be skipped.
    """
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True,
                                                onerror=unlisted.append if unlisted is not None else None):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        if exclude and exclude in {(here / d).resolve() for d in dirnames}:
            _refuse_output_with_scans(exclude, root)
            dirnames[:] = [d for d in dirnames if (here / d).resolve() != exclude]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        results = any(os.path.isfile(os.path.join(dirpath, record)) for record in OUTPUT_RECORDS)
        if results:  # an earlier run's output (segment --out scans/seg, then predict --input scans): what it
            # wrote is not scans; anything else in the folder still is
            dirnames[:] = [d for d in dirnames if d not in OUTPUT_FOLDERS]
            filenames = [f for f in filenames if not (f.endswith((".csv", ".settings.json")) or f == ".key")]
        for name in sorted(filenames):
            if not name.startswith(".") and name.upper() != "DICOMDIR":
                yield here / name


def _refuse_output_with_scans(out: Path, root: Path) -> None:
    """The output folder lies in the input tree (directly or through a link): fine while it holds
    only what the stages write (CSVs, masks/, overlays/, gradcam/); scans of its own would be
    skipped without a row, so they are refused."""
    from pipeline.scans import is_scan_file

    scans = sorted(f.name for f in out.iterdir() if f.is_file() and not f.name.startswith(".") and is_scan_file(f))
    if scans:
        raise ValueError(f"--out {out} is inside the input {root} and holds scans ({', '.join(scans[:3])}"
                         f"{', ...' if len(scans) > 3 else ''}), which would be skipped; choose an --out that holds "
                         f"no scans, or one outside the input")


def csv_key(key: str) -> str:
    """``key`` as a result CSV stores it: one line, so a torn write can only lose whole lines.

    Line breaks in a file name become spaces (a trailing one is dropped); lookups go through this
    too, so such a file still finds its row on a rerun. The price, for never tearing a record:
    ``a b.png`` beside ``a<newline>b.png`` share one key.
    """
    return " ".join(key.splitlines()) if isinstance(key, str) else key


class ResultsCSV:
    """Append-only CSV that survives ``kill -9``: whole lines per write, torn tail repaired on open."""

    def __init__(self, path: Path, columns: Sequence[str]):
        self.path, self.columns = path, list(columns)
        self.done: set[str] = set()
        if path.exists() and path.stat().st_size > 0:
            self._repair_and_load()
        else:
            self._append([",".join(self.columns)], header=True)

    def _repair_and_load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a killed run left half a line: drop it, that input is redone
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
            data = data[:end]
        if not data:  # killed while writing the header itself: start the file again
            self._append([",".join(self.columns)], header=True)
            return
        reader = csv.DictReader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
        if reader.fieldnames != self.columns:
            raise ValueError(f"{self.path}: existing file has columns {reader.fieldnames}, expected {self.columns}; "
                             f"use another --out")
        for row in reader:
            self.done.add(row["path"])

    def pending(self, files: Sequence[Path], root: Path) -> list[Path]:
        """Files still to process: those without a row of their own. A volume (a NIfTI, a multi-frame
        DICOM) has rows per slice, ``path#z=NN``, so it is read again and its missing slices done.

        A volume whose own path is listed (an error row) is final, like any other file.
        """
        todo = []
        for p in files:
            rel = csv_key(p.relative_to(root).as_posix())
            if rel in self.done:
                continue
            todo.append(p)
        return todo

    def _append(self, lines: list[str], header: bool = False) -> None:
        # surrogateescape: a file name that is not valid UTF-8 is written back byte for byte.
        with open(self.path, "a", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())

    def write(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n", extrasaction="ignore")
        for row in rows:
            # One record per line, always: a torn write can then only lose whole lines.
            row = {k: csv_key(v) for k, v in row.items()}
            writer.writerow(row)
            self.done.add(row["path"])
        if rows:
            self._append(buf.getvalue().rstrip("\n").split("\n"))


@dataclass
class Item:
    key: str           # path relative to the input root, with #z=NN for volume slices
    scan: Scan | None
    error: str = ""


def read_items(path: Path, root: Path, nifti_slices, dicom_window: str = "file") -> list[Item]:
    rel = path.relative_to(root).as_posix()
    try:
        scans = read_scans(path, nifti_slices=nifti_slices, dicom_window=dicom_window)
    except ScanReadError as exc:
        return [Item(rel, None, exc.reason)]
    except Exception as exc:  # one bad file must never stop the folder
        return [Item(rel, None, f"{type(exc).__name__}: {exc}")]
    if not scans:
        return [Item(rel, None, "no slice selected (volume is blank)")]
    items = []
    for scan in scans:
        suffix = scan.key[len(str(path)):] if scan.key.startswith(str(path)) else ""
        items.append(Item(rel + suffix, scan))
    return items



def iter_read(files: Sequence[Path], root: Path, nifti_slices="nonempty", workers: int = 2,
              window_size: int = 64, dicom_window: str = "file") -> Iterator[list[Item]]:
    """Read files on ``workers`` threads, in order, with at most ``window_size`` in flight.

    The bounded window keeps memory flat whatever the folder's size.
    """
    with ThreadPoolExecutor(max(1, workers)) as pool:
        window: deque = deque()
        it = iter(files)
        while True:
            while len(window) < window_size:
                p = next(it, None)
                if p is None:
                    break
                window.append(pool.submit(read_items, p, root, nifti_slices, dicom_window))
            if not window:
                return
            yield window.popleft().result()


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: done once, at import, before any thread
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def new_file_mode() -> int:
    """The mode ``open()`` would give a new file under the process's umask (0644 for the usual 022; a user
    who keeps scans private with 077 gets 0600)."""
    return 0o666 & ~_UMASK


def write_atomic(path: str | os.PathLike, write) -> Path:
    """Call ``write(binary file)`` so that ``path`` is either absent, the old file, or the complete new one.

    The temporary file has a name of its own, so two runs that write the same file at once (two
    trainings started side by side on one dataset) cannot rename each other's file away; it gets the
    mode any new file would (mkstemp makes 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name starts with (at most 64 characters of) the target's: a whole long name plus
    # mkstemp's suffix would pass the file system's 255-byte limit before the target does
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{os.fsdecode(os.fsencode(path.name)[:64])}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def savez_atomic(path: Path, **arrays: np.ndarray) -> Path:
    """``np.savez`` written whole or not at all (:func:`write_atomic`)."""
    return write_atomic(path, lambda fh: np.savez(fh, **arrays))


def read_image_file(path: str | os.PathLike, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray | None:
    """``cv2.imread`` for any file name: None when the file is missing or not an image.

    Why not ``cv2.imread``: it crashes the process on a name that is not valid UTF-8 (such names
    come back from ``os.walk`` as surrogate escapes); Python's ``open`` reads them byte for byte.
    """
    try:
        with open(path, "rb") as fh:
            data = np.frombuffer(fh.read(), np.uint8)
    except OSError:
        return None
    return cv2.imdecode(data, flags) if data.size else None


def write_png_atomic(path: Path, image: np.ndarray) -> None:
    """Write a PNG so that ``path`` is either absent, the old file, or the complete new one."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")

    def write(fh) -> None:
        fh.write(buf.tobytes())
        fh.flush()
        os.fsync(fh.fileno())

    write_atomic(path, write)


def iter_batches(files: Sequence[Path], root: Path, done: set[str], batch_size: int, nifti_slices="nonempty",
                 workers: int = 2, on_file=None, dicom_window: str = "file") -> Iterator[list[Item]]:
    """Batches of ``batch_size`` read items (scans or error items), skipping keys in ``done``.

    ``on_file`` is called once per file read (a progress bar's ``update``).
    """
    pending: list[Item] = []
    for items in iter_read(files, root, nifti_slices, workers, 2 * batch_size, dicom_window):
        if on_file:
            on_file(1)
        pending.extend(it for it in items if csv_key(it.key) not in done)
        while len(pending) >= batch_size:
            yield pending[:batch_size]
            pending = pending[batch_size:]
    if pending:
        yield pending


@dataclass
class FolderRun:
    """A stage's pass over a scan folder: where it reads, where it writes, and what is left to do."""

    root: Path
    out: Path
    results: ResultsCSV
    files: list[Path]
    todo: list[Path]
    #: folders under ``root`` that could not be listed and have no row yet: write them as error rows
    unlisted: list[Item]
    #: held open for the run's lifetime: the lock on ``out`` (released when the process ends, kill -9 too)
    lock: object = None


#: How volumes are cut into the slices keyed ``path#z=NN``, recorded with every run's settings. 3: as 2,
#: but a NIfTI holding one slice across its first or second voxel axis is that one slice (2 cut it into
#: one-pixel lines along the third). 2: along the file's own slice axis, numbered as the file numbers
#: them (NIfTI), and one slice per frame of a multi-frame DICOM; before, NIfTI volumes were cut along
#: their RAS axis 2 and a DICOM gave one frame.
SLICING = 3


def reading_settings(nifti_slices="nonempty", dicom_window: str = "file") -> dict:
    """What a run records of how it reads scans, where that is not the default: other slices or
    other pixels, so a rerun with another choice is refused rather than skipped (folders from
    before these keys existed, with the defaults, still resume)."""
    from pipeline.scans import check_dicom_window

    settings: dict = {}
    if nifti_slices != "nonempty":
        settings["nifti_slices"] = nifti_slices if isinstance(nifti_slices, str) else sorted({int(z) for z in nifti_slices})
    if check_dicom_window(dicom_window) != "file":
        settings["dicom_window"] = dicom_window
    return settings


def check_settings(out: Path, csv_name: str, settings: dict, root: Path | None = None) -> None:
    """Resume only what the same models made: ``OUT/<csv>.settings.json`` records them on the first run;
    a later run with other settings (another checkpoint, threshold, mode) or on another input folder
    (``root``, resolved) is refused, not mixed in.

    A folder from before ``slicing`` was recorded resumes if it holds no volume slice (no ``#z=`` row);
    one of slicing 2 if none of its NIfTI slices (under ``root``) comes from a volume that slicing 3
    cuts otherwise: only those rows would mean something else now."""
    import json

    path = out / f"{csv_name}.settings.json"
    plain = json.loads(json.dumps({**settings, "slicing": SLICING}, sort_keys=True, default=str))
    if root is not None:  # rows are keyed by path under the input: another input would pass for done
        plain["input"] = os.fsdecode(root)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:  # emptied by a crash, or edited by hand
            raise ValueError(f"{path}: not a readable settings record ({exc}), so what made the results beside "
                             f"it is unknown; use another --out, or delete that folder to redo it") from None
        if "input" in plain and "input" in old and old["input"] != plain["input"]:
            raise ValueError(f"{out}: holds results for the scans under {old['input']}, not {plain['input']}: "
                             f"their rows would be taken for this folder's; use another --out (or, if these "
                             f"are the same scans moved, move that folder's results aside and start over)")
        adopted = (("slicing" not in old and not _has_slice_rows(out / csv_name))
                   or (old.get("slicing") == 2 and not _has_recut_volume_rows(out / csv_name, root)))
        if "input" in plain and "input" not in old:  # recorded since session 25; older folders take this one
            old["input"], adopted = plain["input"], True
        if adopted:  # recorded now, so slices this run adds are not taken for older ones next time
            old["slicing"] = SLICING
        # a non-default --nifti-slices has been recorded since session 24; a folder from before whose
        # rows cannot depend on it (no volume slice, no error) takes this run's choice
        if "nifti_slices" in plain and "nifti_slices" not in old and not _has_slice_or_error_rows(out / csv_name):
            old["nifti_slices"], adopted = plain["nifti_slices"], True
        if old != plain:
            if set(k for k in set(old) | set(plain) if old.get(k) != plain.get(k)) == {"slicing"}:
                how = ("a one-slice NIfTI stored across its first or second axis, into one-pixel lines"
                       if old.get("slicing") == 2 else "a NIfTI along its RAS axis, a multi-frame DICOM as one frame")
                raise ValueError(f"{out}: holds volume slices (#z=NN rows) cut the way slicing "
                                 f"{old.get('slicing', 1)} cut them ({how}), which are not the slices this "
                                 f"version reads; use another --out, or delete that folder to redo it")
            diff = {k: (old.get(k), plain.get(k)) for k in sorted(set(old) | set(plain)) if old.get(k) != plain.get(k)}
            raise ValueError(f"{out}: holds results made with other settings ({diff}, as (then, now)); "
                             f"use another --out, or delete that folder to redo it")
        if not adopted:
            return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(plain, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _has_recut_volume_rows(csv_path: Path, root: Path | None) -> bool:
    """Whether a results CSV has slices of a NIfTI that slicing 3 cuts otherwise than 2: one slice
    across its first or second voxel axis. Without ``root``, or a header that cannot be read, any
    NIfTI slice counts."""
    try:
        with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            volumes = {row["path"].split("#z=")[0] for row in csv.DictReader(fh) if "#z=" in row.get("path", "")}
    except FileNotFoundError:
        return False
    volumes = {v for v in volumes if v.lower().endswith((".nii", ".nii.gz"))}
    if not volumes:
        return False
    if root is None:
        return True
    import nibabel as nib

    for volume in volumes:
        try:
            shape = tuple(nib.load(str(Path(root) / volume)).shape)[:3]
        except FileNotFoundError:
            continue  # gone: nothing of it will be read again
        except Exception:  # noqa: BLE001
            return True
        if len(shape) == 3 and shape[2] > 1 and 1 in shape[:2]:
            return True
    return False


def _has_slice_or_error_rows(csv_path: Path) -> bool:
    try:
        with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
            return any("#z=" in row.get("path", "") or row.get("status") == "error" for row in csv.DictReader(fh))
    except FileNotFoundError:
        return False


def _has_slice_rows(csv_path: Path) -> bool:
    """Whether a results CSV has a volume-slice row (``path#z=NN``); its raw bytes are searched."""
    try:
        with open(csv_path, "rb") as fh:
            return any(b"#z=" in line for line in fh)
    except FileNotFoundError:
        return False


def start_folder_run(input_dir, out_dir, csv_name: str, columns: Sequence[str],
                     settings: dict | None = None) -> FolderRun:
    """Check the folders, open (or resume) ``out_dir/csv_name`` and list the files still to process.

    ``settings`` (what the models and options were) must match those of the run being resumed.
    """
    root = Path(input_dir).resolve()
    out = Path(out_dir).resolve()
    if root.is_file():
        raise NotADirectoryError(f"{input_dir}: is a file; --input takes a folder (put the file in one, or check "
                                 f"a single file with `python -m pipeline read {input_dir}`)")
    if not root.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder not found")
    if out == root:
        raise ValueError(f"--out {out_dir} is the input folder; choose another folder so no input is overwritten")
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock_output(out, csv_name)
    try:
        return _open_folder_run(input_dir, root, out, csv_name, columns, settings, lock)
    except BaseException:
        if lock is not None:
            lock.close()  # a refused run must not keep the folder locked while its error is handled
        raise


def _open_folder_run(input_dir, root: Path, out: Path, csv_name: str, columns: Sequence[str],
                     settings: dict | None, lock) -> FolderRun:
    if settings:
        check_settings(out, csv_name, settings, root)
    results = ResultsCSV(out / csv_name, columns)
    # the output is excluded wherever it is: a linked-in folder can reach it from outside the input
    failed: list[OSError] = []
    files = list(iter_input_files(root, exclude=out, unlisted=failed))
    unlisted = []
    for exc in failed:
        folder = Path(exc.filename or root)
        if folder == root:
            raise PermissionError(f"{input_dir}: cannot list the input folder ({exc.strerror or exc})")
        key = folder.relative_to(root).as_posix()
        if csv_key(key) not in results.done:
            unlisted.append(Item(key, None, f"cannot list this folder: {exc.strerror or exc}; its scans were not read"))
    return FolderRun(root, out, results, files, results.pending(files, root), unlisted, lock)


def _lock_output(out: Path, csv_name: str):
    """An exclusive lock on ``out``'s result CSV, or ValueError when another run holds it: two runs
    appending to one CSV would each process the same inputs and write them twice. The lock is
    the kernel's (flock), so a killed run never leaves a stale one behind."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        return None
    fh = open(out / f".{csv_name}.lock", "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise ValueError(f"{out}: another run is writing {csv_name} there now; wait for it to finish, "
                         f"or use another --out") from None
    return fh
