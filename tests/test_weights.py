"""Manifest, sha256 checks, weights-only loading and the ``weights`` sub-command; never touches the network."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import urllib.request

import pytest
import torch

from pipeline import weights as W
from pipeline import weights_cli
from pipeline.weights import WeightsError


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def urlopen(url, *args, **kwargs):
        raise OSError(f"network disabled in tests: {getattr(url, 'full_url', url)}")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


@pytest.fixture
def wdir(tmp_path, monkeypatch):
    """tmp weights dir: ``good`` present and matching, ``absent`` missing, ``unk`` with sha256 null."""
    torch.save({"w": torch.arange(4.0)}, tmp_path / "good.pt")
    entries = [
        {"name": "good", "file": "good.pt", "url": "https://example.invalid/good.pt",
         "sha256": W.sha256_file(tmp_path / "good.pt"), "license": "MIT", "kind": "test"},
        {"name": "absent", "file": "absent.pt", "url": "https://example.invalid/absent.pt",
         "sha256": "0" * 64, "license": "Apache-2.0", "kind": "test"},
        {"name": "unk", "file": "unk.pt", "url": "https://example.invalid/unk.pt",
         "sha256": None, "license": "AGPL-3.0", "kind": "test"},
    ]
    (tmp_path / "manifest.json").write_text(json.dumps({"weights": entries}, indent=2) + "\n")
    monkeypatch.setattr(W, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(W, "MANIFEST", tmp_path / "manifest.json")
    return tmp_path


def _run(*argv):
    p = argparse.ArgumentParser()
    weights_cli.add_arguments(p)
    return weights_cli.run(p.parse_args(list(argv)))


def _row(out: str, name: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [name])


def test_list(wdir, capsys):
    assert _run("--list") == 0
    out = capsys.readouterr().out
    assert _row(out, "good") == ["good", "good.pt", "yes", "ok", "MIT"]
    assert _row(out, "absent") == ["absent", "absent.pt", "no", "-", "Apache-2.0"]
    assert _run() == 0 and "good.pt" in capsys.readouterr().out  # listing is the default


def test_verify_detects_tampering(wdir, capsys):
    assert _run("--verify") == 0
    with open(wdir / "good.pt", "ab") as fh:
        fh.write(b"x")
    assert _run("--verify") == 1
    captured = capsys.readouterr()
    assert "good: MISMATCH" in captured.out and "good.pt" in captured.err
    assert _row(_run_list(capsys), "good")[3] == "MISMATCH"


def test_verify_says_what_is_missing_and_fails_on_a_shipped_checkpoint(wdir, capsys):
    assert _run("--verify") == 0  # "absent" and "unk" are downloads (they have a URL): only named
    assert "absent: missing (not downloaded" in capsys.readouterr().out
    manifest = json.loads((wdir / "manifest.json").read_text())
    manifest["weights"][0]["url"] = None  # "good" ships with the repository
    (wdir / "manifest.json").write_text(json.dumps(manifest))
    (wdir / "good.pt").unlink()
    assert _run("--verify") == 1
    captured = capsys.readouterr()
    assert "good: missing" in captured.out and "good.pt: missing; it ships with the repository" in captured.err


def _run_list(capsys):
    _run("--list")
    return capsys.readouterr().out


def test_download_offline_is_clear_and_keeps_going(wdir, capsys):
    assert _run("--download", "absent", "nosuch", "good") == 1
    captured = capsys.readouterr()
    assert "https://example.invalid/absent.pt" in captured.err and "network disabled" in captured.err
    assert str(wdir / "absent.pt") in captured.err  # says where to put the file by hand
    assert "nosuch: not in" in captured.err
    assert f"good: {wdir / 'good.pt'}" in captured.out  # the later name was still handled
    assert not list(wdir.glob("*.part"))


def test_download_records_unknown_sha_then_checks_it(wdir, monkeypatch, capsys):
    payload = b"first download"
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload))
    assert _run("--download", "unk") == 0
    entry = W.load_manifest(W.MANIFEST)["unk"]
    assert entry["sha256"] == hashlib.sha256(payload).hexdigest()
    assert W.load_manifest(W.MANIFEST)["good"]["sha256"]  # other entries untouched
    (wdir / "unk.pt").unlink()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"changed upstream"))
    assert _run("--download", "unk") == 1
    assert "manifest says" in capsys.readouterr().err and not (wdir / "unk.pt").exists()


class CutShort(io.BytesIO):
    """A response whose connection ends before the length it announced."""

    headers = {"Content-Length": "100000"}


def test_a_download_cut_short_is_refused_and_its_hash_not_recorded(wdir, monkeypatch, capsys):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: CutShort(b"x" * 5000))
    assert _run("--download", "unk") == 1
    err = capsys.readouterr().err
    assert "ended after 5000 of 100000 bytes" in err and "check it against the publisher" in err
    assert not (wdir / "unk.pt").exists() and not list(wdir.glob("*.part"))
    assert W.load_manifest(W.MANIFEST)["unk"]["sha256"] is None
    whole = type("Whole", (io.BytesIO,), {"headers": {"Content-Length": "5000"}})
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: whole(b"x" * 5000))
    assert _run("--download", "unk") == 0 and (wdir / "unk.pt").stat().st_size == 5000


def test_a_missing_file_says_how_to_get_it_back(wdir):
    manifest = W.load_manifest(W.MANIFEST)
    manifest["good"]["url"] = None  # trained by the project: it ships with the repository
    (wdir / "good.pt").unlink()
    with pytest.raises(WeightsError, match="git checkout -- weights/"):
        W.resolve("good", manifest=manifest)
    with pytest.raises(WeightsError, match="not a name in manifest.json either; known names: absent, good, unk"):
        W.resolve("goood", manifest=manifest)


def test_verify_follows_what_an_entry_names(wdir, capsys):
    net = {"arch": "tiny"}
    torch.save({"coarse": {"w": torch.ones(2)}, "meta": {"task": "segment", "net": net, "size": 32}}, wdir / "donor.pt")
    torch.save({"meta": {"task": "segment", "net": net, "size": 32,
                         "coarse_from": {"name": "donor", "sha256": W.sha256_file(wdir / "donor.pt")}}},
               wdir / "borrower.pt")
    (wdir / "pair.json").write_text(json.dumps({"members": ["good", "own.pt"], "segmenter": "borrower"}))
    (wdir / "own.pt").write_bytes(b"a member beside the file")
    manifest = json.loads((wdir / "manifest.json").read_text())
    manifest["weights"] += [
        {"name": "donor", "file": "donor.pt", "url": None, "sha256": W.sha256_file(wdir / "donor.pt"),
         "kind": "segmenter"},
        {"name": "borrower", "file": "borrower.pt", "url": None, "sha256": W.sha256_file(wdir / "borrower.pt"),
         "kind": "segmenter", "needs": ["donor"]},
        {"name": "pair", "file": "pair.json", "url": None, "sha256": W.sha256_file(wdir / "pair.json"),
         "kind": "classifier-ensemble", "segmenter": "borrower"}]
    (wdir / "manifest.json").write_text(json.dumps(manifest))
    assert _run("--verify") == 0
    capsys.readouterr()
    # the donor is re-saved (and re-pinned in the manifest): its own check passes, the borrower's link does not
    torch.save({"coarse": {"w": torch.zeros(2)}, "meta": {"task": "segment", "net": net, "size": 32}}, wdir / "donor.pt")
    manifest["weights"][-3]["sha256"] = W.sha256_file(wdir / "donor.pt")
    (wdir / "own.pt").unlink()
    manifest["weights"][-1]["segmenter"] = "gone"
    (wdir / "manifest.json").write_text(json.dumps(manifest))
    assert _run("--verify") == 1
    captured = capsys.readouterr()
    assert "donor: ok\n" in captured.out and "borrower: ok (but see the error below)" in captured.out
    assert re.search(r"borrower: borrows the coarse stage of 'donor' .*pinned", captured.err)
    assert "pair: names 'gone' (segmenter), which is not in the manifest" in captured.err
    assert "pair.json names 'own.pt', neither a manifest name nor a file beside it" in captured.err


def test_resolve_refuses_sha_mismatch(wdir):
    manifest = W.load_manifest(W.MANIFEST)
    assert W.resolve("good", manifest=manifest) == wdir / "good.pt"
    (wdir / "good.pt").write_bytes(b"not the published file")
    with pytest.raises(WeightsError, match="does not match the manifest"):
        W.resolve("good", manifest=manifest)
    with pytest.raises(WeightsError, match="does not match the manifest"):  # by path, too
        W.resolve(wdir / "good.pt", manifest=manifest)
    with pytest.raises(WeightsError, match=re.escape("https://example.invalid/absent.pt")):
        W.resolve("absent", manifest=manifest)


class Gadget:  # any non-tensor class in a pickle: weights_only must refuse it
    def __init__(self):
        self.x = 1


def test_load_checkpoint_weights_only(tmp_path):
    ok = tmp_path / "own.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": {"task": "segment", "imgsz": 64}}, ok)
    ckpt = W.load_checkpoint(ok)
    assert ckpt["meta"]["imgsz"] == 64 and torch.equal(ckpt["state_dict"]["w"], torch.ones(2))
    bad = tmp_path / "gadget.pt"
    torch.save({"meta": Gadget()}, bad)
    with pytest.raises(WeightsError, match="holds Python objects beyond tensors, so it is refused") as refused:
        W.load_checkpoint(bad)
    assert "weights_only=False" not in str(refused.value)  # torch's own advice is never ours


def test_real_manifest_shape():
    data = json.loads(W.MANIFEST.read_text())
    names = [e["name"] for e in data["weights"]]
    assert len(names) == len(set(names))
    for e in data["weights"]:
        assert {"name", "file", "url", "sha256", "license", "kind"} <= set(e), e["name"]
        assert e["sha256"] is None or re.fullmatch(r"[0-9a-f]{64}", e["sha256"]), e["name"]
        assert e["sha256"] or e.get("sha256_source"), f"{e['name']}: unknown sha256 needs a note"


def test_a_checkpoint_write_cut_short_leaves_the_old_file(tmp_path, monkeypatch):
    path = W.save_checkpoint({"w": torch.ones(3)}, tmp_path / "best.pt")
    mask = os.umask(0o022)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~mask  # as any new file, not mkstemp's 0600

    def torn(obj, fh, *a, **k):
        fh.write(b"half a checkpoint")
        raise OSError("no space left on device (test)")

    monkeypatch.setattr(torch, "save", torn)
    with pytest.raises(OSError, match="no space"):
        W.save_checkpoint({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary file left behind


def test_a_copy_placed_by_hand_is_recorded_once_and_then_checked(wdir, capsys):
    (wdir / "unk.pt").write_bytes(b"copied by hand")
    assert _run("--record", "unk") == 0
    entry = W.load_manifest(W.MANIFEST)["unk"]
    assert entry["sha256"] == hashlib.sha256(b"copied by hand").hexdigest() and "by hand" in entry["sha256_source"]
    assert _run("--record", "unk") == 1  # recorded already: --verify checks it from now on
    assert "already has its sha256" in capsys.readouterr().err
    assert _run("--record", "absent", "nosuch") == 1
    err = capsys.readouterr().err
    assert "absent: the manifest already has its sha256" in err and "nosuch: not in" in err
    (wdir / "unk.pt").write_bytes(b"changed")
    assert _run("--verify") == 1


def test_a_broken_manifest_is_named(wdir):
    (wdir / "manifest.json").write_text('{"weights": [{"name": "x", "file": "x.pt"')
    with pytest.raises(WeightsError, match=r"manifest.json: not a valid weights manifest"):
        W.load_manifest(W.MANIFEST)


def test_an_ensemble_with_a_second_opinion_member_that_is_no_name_is_refused(tmp_path):
    from pipeline.classify.predict import load_classifier

    spec = tmp_path / "pair.json"
    spec.write_text(json.dumps({"members": ["cls-lite0-full"], "second_opinion": {"members": [1], "below": 0.8}}))
    with pytest.raises(WeightsError, match="second_opinion"):
        load_classifier(str(spec))


def test_a_damaged_file_is_not_called_a_pickle_of_objects(tmp_path):
    lfs = tmp_path / "lfs.pt"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(WeightsError, match="a Git LFS pointer, not the checkpoint; fetch it with `git lfs pull`"):
        W.load_checkpoint(lfs)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"vx: bytes that are no pickle at all\n")
    with pytest.raises(WeightsError, match="not a loadable weights-only checkpoint") as refused:
        W.load_checkpoint(junk)
    assert "weights_only" not in str(refused.value)  # torch's preamble advising an unsafe load is cut
