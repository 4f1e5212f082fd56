"""Similar-case search: a trained classifier's penultimate-layer embeddings as a retrieval index.

``index`` embeds labelled scans once; ``similar`` embeds a query the same way (same input mode,
same preprocessing) and returns the nearest cases by cosine distance.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from pipeline.classify.models import INPUT_MEAN, INPUT_STD
from pipeline.classify.predict import Classifier
from pipeline.datasets import DatasetError, canonical_class
from pipeline.folders import iter_input_files, read_items, savez_atomic
from pipeline.roi import make_input


@torch.inference_mode()
def embed(classifier: Classifier, images: np.ndarray) -> np.ndarray:
    """(B, S, S) uint8 classifier inputs -> (B, D) L2-normalised penultimate-layer features."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(classifier.device).unsqueeze(1).float()
    x = ((x - INPUT_MEAN) / INPUT_STD).contiguous(memory_format=torch.channels_last)
    model = classifier.model
    if hasattr(model, "forward_head"):  # timm
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    elif hasattr(model, "forward_features"):  # SmallCNN
        feats = model.forward_features(x).mean(dim=(2, 3))
    else:
        raise TypeError(f"{type(model).__name__}: no feature extractor to embed with")
    feats = feats.float().flatten(1)
    return torch.nn.functional.normalize(feats, dim=1).cpu().numpy()


def _label_of(rel: str) -> str:
    """The outermost folder that names a class, as :func:`pipeline.datasets.list_class_folder` reads it
    (``glioma/normal/x.jpg`` is a glioma scan)."""
    for part in Path(rel).parts[:-1]:
        try:
            return canonical_class(part)
        except DatasetError:
            continue
    return ""


def build_index(input_dir: str | os.PathLike, out: str | os.PathLike, classifier: Classifier,
                batch_size: int = 64) -> dict:
    """Embed every readable scan under ``input_dir`` (full-slice inputs); label = its class folder, if any."""
    if classifier.mode != "full":
        raise ValueError(f"index uses full-slice inputs; the classifier was trained on {classifier.mode!r}")
    root = Path(input_dir).resolve()
    keys, labels, chunks, batch, errors = [], [], [], [], 0
    for path in iter_input_files(root):
        items = read_items(path, root, "nonempty")
        readable = [it for it in items if it.scan is not None]
        errors += len(items) - len(readable)
        # one case per file, the slice `similar` reads from it (read_scan: the middle non-empty slice),
        # so a volume queried against its own index finds itself
        for item in readable[len(readable) // 2:][:1]:
            keys.append(item.key)
            labels.append(_label_of(item.key))
            batch.append(make_input(item.scan.image, "full", classifier.size)[0])
            if len(batch) == batch_size:
                chunks.append(embed(classifier, np.stack(batch)))
                batch = []
    if batch:
        chunks.append(embed(classifier, np.stack(batch)))
    if not chunks:
        raise FileNotFoundError(f"{input_dir}: no readable scans to index")
    out = Path(out)
    savez_atomic(out, embeddings=np.concatenate(chunks).astype(np.float32), keys=np.array(keys),
             labels=np.array(labels), root=np.array(str(root)),
             classifier=np.array(json.dumps({**classifier.meta, **getattr(classifier, "fingerprint", {})})))
    return {"indexed": len(keys), "errors": errors, "out": str(out)}


def search(index: str | os.PathLike, query: np.ndarray, classifier: Classifier, k: int = 5) -> list[dict]:
    """Nearest ``k`` indexed cases to a (H, W) uint8 query slice: key, label, cosine distance."""
    try:
        with np.load(index, allow_pickle=False) as data:
            emb, keys, labels = data["embeddings"], data["keys"], data["labels"]
            meta = json.loads(str(data["classifier"]))
    except FileNotFoundError:
        raise FileNotFoundError(f"{index}: no such index (build it with `index`)") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise ValueError(f"{index}: not an index written by `index` ({type(exc).__name__}: {exc}); "
                         f"build it again") from exc
    if meta.get("model") != classifier.meta.get("model") or int(meta["size"]) != classifier.size:
        raise ValueError(f"{index}: built with {meta.get('model')} at {meta.get('size')} px; "
                         f"query classifier is {classifier.meta.get('model')} at {classifier.size} px")
    # the same network with other weights embeds into another space: distances would mean nothing
    built, now = meta.get("weights_sha256"), getattr(classifier, "fingerprint", {}).get("weights_sha256")
    if built and now and built != now:
        raise ValueError(f"{index}: built with weights {built[:12]}..., the query classifier has {now[:12]}...; "
                         f"rebuild the index with `index` and this --cls")
    q = embed(classifier, make_input(query, "full", classifier.size)[0][None])[0]
    dist = 1.0 - emb @ q
    order = np.argsort(dist, kind="stable")[:k]
    return [{"key": str(keys[i]), "label": str(labels[i]), "distance": round(float(dist[i]), 6)} for i in order]


def _positive(text: str) -> int:
    from pipeline.cli import _positive_int

    return _positive_int(text)


def add_index_arguments(p) -> None:
    p.add_argument("--input", required=True, help="folder of labelled scans (class folders give the labels)")
    p.add_argument("--out", required=True, help="index file to write (.npz)")
    p.add_argument("--cls", default="cls-lite0-full", help="classifier whose embeddings to use (full-slice model)")


def run_index(args) -> int:
    print(json.dumps(build_index(args.input, args.out, Classifier(args.cls, device=args.device))))
    return 0


def add_similar_arguments(p) -> None:
    p.add_argument("--index", required=True, help="index .npz from `index`")
    p.add_argument("--query", required=True, help="a scan file; a volume's slice as predict names it, "
                                                  "vol.nii.gz#z=07 (default: its middle non-empty slice)")
    p.add_argument("-k", type=_positive, default=5, help="how many neighbours")
    p.add_argument("--cls", default="cls-lite0-full", help="the classifier the index was built with")


def run_similar(args) -> int:
    import sys

    from pipeline.scans import read_scan

    path, kw = args.query, {}
    if not os.path.exists(path) and "#z=" in path and path.rsplit("#z=", 1)[1].isdigit():
        path, z = path.rsplit("#z=", 1)
        kw = {"nifti_slices": [int(z)]}
    query = read_scan(path, **kw)
    if query.key != path:  # a volume: say which slice was read
        print(f"query: {query.key}", file=sys.stderr)
    for hit in search(args.index, query.image, Classifier(args.cls, device=args.device), args.k):
        print(json.dumps(hit))
    return 0
