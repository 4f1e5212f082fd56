"""``python -m pipeline weights``: list, download and verify the checkpoints in ``weights/manifest.json``.

An entry whose sha256 is ``null`` (not known offline) gets the sha256 of its first download
written into the manifest; later downloads and ``--verify`` are checked against it.
"""
from __future__ import annotations

import json
import sys

from pipeline import weights as _weights


def add_arguments(p) -> None:
    p.add_argument("--list", action="store_true",
                   help="print name, file, present?, sha256 ok?, license for every manifest entry (default)")
    p.add_argument("--download", nargs="+", metavar="NAME", help="fetch these manifest entries and check them")
    p.add_argument("--record", nargs="+", metavar="NAME", help="record the sha256 of a file placed in weights/ by "
                   "hand (no internet), where the manifest has none yet: check it against the publisher's first")
    p.add_argument("--verify", action="store_true", help="check every file against its manifest sha256; a missing checkpoint of the "
                   "project's own is an error")


def _status(entry: dict) -> tuple[bool, str]:
    """(present, sha state: ok | MISMATCH | unknown | -)."""
    present, state, _ = _checked(entry)
    return present, state


def _checked(entry: dict) -> tuple[bool, str, str | None]:
    """(present, sha state: ok | MISMATCH | unknown | -, the file's sha256 where it was computed)."""
    path = _weights.WEIGHTS_DIR / entry["file"]
    if not path.is_file():
        return False, "-", None
    if not entry.get("sha256"):
        return True, "unknown", None
    actual = _weights.sha256_file(path)  # once: a SAM checkpoint is gigabytes
    return True, "ok" if actual == entry["sha256"] else "MISMATCH", actual


def _record_sha(name: str, how: str = "recorded from the first download (trust on first use)") -> None:
    """Trust on first download: write the file's sha256 into the manifest where it was null."""
    data = json.loads(_weights.MANIFEST.read_text())
    for entry in data["weights"]:
        if entry["name"] == name and not entry.get("sha256"):
            entry["sha256"] = _weights.sha256_file(_weights.WEIGHTS_DIR / entry["file"])
            entry["sha256_source"] = how
            _weights.MANIFEST.write_text(json.dumps(data, indent=2) + "\n")
            print(f"{name}: recorded sha256 {entry['sha256']} in {_weights.MANIFEST}")


def _broken_links(name: str, entry: dict, manifest: dict) -> list[str]:
    """What an entry names that is not there as named: the manifest names it ``needs`` or gives as its
    ``segmenter``, an ensemble's members, and the coarse stage a cascade borrows (pinned by sha256)."""
    problems = [f"names {other!r} ({why}), which is not in the manifest"
                for why, others in (("needs", entry.get("needs") or []), ("segmenter", [entry["segmenter"]]
                                                                          if entry.get("segmenter") else []))
                for other in others if other not in manifest]
    path = _weights.WEIGHTS_DIR / entry["file"]
    if entry.get("kind") == "classifier-ensemble":
        try:
            spec = json.loads(path.read_text())
            names = [*spec.get("members", []), *(spec.get("second_opinion") or {}).get("members", []),
                     *([spec["segmenter"]] if spec.get("segmenter") else [])]
        except (OSError, ValueError, AttributeError) as exc:
            return problems + [f"{path} is not a readable ensemble file ({exc})"]
        problems += [f"{path} names {m!r}, neither a manifest name nor a file beside it" for m in names
                     if m not in manifest and not (path.parent / m).is_file()]
    elif entry.get("kind") == "segmenter" and path.suffix == ".pt":
        try:
            import torch

            # its hash was just checked; mmap reads the meta without reading every tensor
            meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("meta", {})
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds on a file that is not a checkpoint
            return problems + [f"{path}: not a loadable weights-only checkpoint ({type(exc).__name__}: {exc})"]
        ref = meta.get("coarse_from")
        if ref:
            from pipeline.segment.unet import with_borrowed_coarse

            try:
                with_borrowed_coarse({"meta": meta})
            except (_weights.WeightsError, KeyError) as exc:
                problems.append(f"borrows the coarse stage of {ref.get('name')!r} (sha256 {ref.get('sha256')}): {exc}")
    return problems


def run(args) -> int:
    """0 when every requested download and check succeeded, else 1."""
    manifest = _weights.load_manifest(_weights.MANIFEST)
    rc = 0
    for name in args.download or []:
        try:
            path = _weights.download(name, manifest=manifest)
        except _weights.WeightsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            rc = 1
            continue
        print(f"{name}: {path}")
        _record_sha(name)
        manifest = _weights.load_manifest(_weights.MANIFEST)
    for name in args.record or []:
        entry = manifest.get(name)
        path = _weights.WEIGHTS_DIR / entry["file"] if entry else None
        if entry is None or entry.get("sha256") or not path.is_file():
            why = (f"not in {_weights.MANIFEST}" if entry is None else
                   f"the manifest already has its sha256 (`--verify` checks it)" if entry.get("sha256") else
                   f"{path} is not there")
            print(f"error: --record {name}: {why}", file=sys.stderr)
            rc = 1
            continue
        _record_sha(name, "recorded from a copy placed by hand (trust on first use)")
        manifest = _weights.load_manifest(_weights.MANIFEST)
    if args.verify:
        for name, entry in manifest.items():
            present, sha, actual = _checked(entry)
            if not present:
                # the project's own checkpoints ship in the repository (no download URL): one that
                # is missing is a broken checkout; the others are fetched on demand
                own = not entry.get("url")
                print(f"{name}: missing" + ("" if own else " (not downloaded; `--download " + name + "`)"))
                if own:
                    print(f"error: {_weights.WEIGHTS_DIR / entry['file']}: missing; it ships with the repository "
                          f"(git checkout weights/)", file=sys.stderr)
                    rc = 1
                continue
            problems = _broken_links(name, entry, manifest) if sha != "MISMATCH" else []
            print(f"{name}: {sha}" + (" (but see the error below)" if problems else ""))
            if sha == "MISMATCH":
                path = _weights.WEIGHTS_DIR / entry["file"]
                fix = ("delete it and download again (`--download " + name + "`)" if entry.get("url") else
                       "it ships with the repository: restore it with `git checkout -- weights/`")
                print(f"error: {path}: sha256 {actual} does not match the manifest "
                      f"({entry['sha256']}); {fix}", file=sys.stderr)
                rc = 1
            for problem in problems:
                print(f"error: {name}: {problem}", file=sys.stderr)
                rc = 1
    if args.list or not (args.download or args.verify or args.record):
        rows = [("name", "file", "present", "sha256", "license")]
        for name, entry in manifest.items():
            present, sha = _status(entry)
            rows.append((name, entry["file"], "yes" if present else "no", sha, str(entry.get("license", "?"))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip())
    return rc
