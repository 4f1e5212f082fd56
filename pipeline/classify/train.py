"""Train a classifier on decoded caches; select the epoch on the validation split only.

Every epoch writes ``last.pt`` (resumable) and appends to ``curves.csv``/``curves.png``;
the best epoch by validation macro-F1 (ties: lower loss) is saved as ``best.pt`` with its sha256.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import CLASSES
from pipeline.classify.data import Augment, load_cache
from pipeline.classify.models import INPUT_MEAN, INPUT_STD, create_model
from pipeline.config import environment, seed_everything
from pipeline.evaluate import classification_metrics
from pipeline.weights import sha256_file


def _batches(n: int, batch_size: int, rng: np.random.Generator | None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def to_input(images: np.ndarray | torch.Tensor, device: str) -> torch.Tensor:
    """(B, H, W) uint8 -> (B, 1, H, W) float32 in 0..255 on ``device``."""
    x = torch.as_tensor(images).to(device, non_blocking=True)
    return x.unsqueeze(1).float()


def normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - INPUT_MEAN) / INPUT_STD


@torch.inference_mode()
def predict_logits(model: nn.Module, images: np.ndarray, device: str, batch_size: int = 128) -> np.ndarray:
    """Logits (N, C) for a (N, H, W) uint8 array."""
    model.eval()
    out = []
    for idx in _batches(len(images), batch_size, None):
        x = normalise(to_input(images[idx], device)).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", enabled=device.startswith("cuda")):
            out.append(model(x).float().cpu())
    return torch.cat(out).numpy()


def _without(cache: dict, path_list: str) -> dict:
    """``cache`` minus the samples whose path is listed in ``path_list`` (paths compared resolved)."""
    from pipeline.audit import load_clean_list

    listed = load_clean_list(path_list, base=Path.cwd())
    keep = np.array([str(Path(p).resolve()) not in listed for p in cache["paths"]], bool)
    return {k: (v[keep] if isinstance(v, np.ndarray) and v.ndim and len(v) == len(keep) else v)
            for k, v in cache.items()}


def mix_batch(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator,
              alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup: (B, C, H, W) ``x`` blended with a shuffled copy of itself, lam ~ Beta(alpha, alpha);
    returns the blend, the shuffled labels and lam (the loss is lam * CE(y) + (1 - lam) * CE(shuffled))."""
    lam = float(rng.beta(alpha, alpha))
    perm = torch.as_tensor(rng.permutation(len(y)), device=x.device)
    return lam * x + (1 - lam) * x[perm], y[perm], lam


def _joined(a: dict, b: dict) -> dict:
    """Two caches of the same mode, size and margin as one (per-sample arrays concatenated)."""
    for key in ("mode", "size", "margin", "segmenter_sha256"):
        if key in a and key in b and a[key] != b[key]:
            raise ValueError(f"cannot join caches with different {key}: {a[key]} and {b[key]}")
    n = len(a["labels"])
    return {k: (np.concatenate([v, b[k]]) if isinstance(v, np.ndarray) and v.ndim and len(v) == n else v)
            for k, v in a.items()}


def _data_fingerprint(tr: dict, va: dict) -> str:
    """sha256 of the slices a run trains and validates on (paths, labels, pixels), after ``--drop``:
    a resumed run must not pick its epochs on slices that have become training ones."""
    h = hashlib.sha256()
    for part in (tr, va):
        h.update("\n".join(map(str, part["paths"])).encode("utf-8", "surrogateescape") + b"\0")
        for key in ("labels", "images"):
            arr = np.ascontiguousarray(part[key])
            h.update(f"{key}:{arr.dtype.str}:{arr.shape}".encode())
            h.update(arr)  # the buffer itself, no copy (an empty split too)
    return h.hexdigest()


def train(train_cache: str, val_cache: str, out_dir: str, model_name: str = "timm:tf_efficientnet_lite0",
          pretrained: bool = True, epochs: int = 8, batch_size: int = 64, lr: float = 2e-3,
          weight_decay: float = 1e-4, label_smoothing: float = 0.05, patience: int = 4, seed: int = 0,
          device: str = "cpu", resume: bool = True, augment: dict | None = None, threads: int | None = None,
          drop: str | None = None, ema: float = 0.0, refit: bool = False, mixup: float = 0.0) -> dict:
    """Train and return a summary dict (also written to ``out_dir/summary.json``).

    ``ema`` in (0, 1): validate and save an exponential moving average of the weights (decay per
    step, buffers included) instead of the raw weights, which swing from epoch to epoch when
    fine-tuning on a few thousand slices; 0 keeps the raw weights.

    ``drop``: a path list (one per line, e.g. ``training_sartaj.txt`` from ``sources``) whose
    slices are left out of both the train and the validation cache: leave-one-source-out runs.

    ``refit``: the last step once a recipe has been chosen on validation. The validation slices join
    the training set, all ``epochs`` run (no early stopping) and ``best.pt`` is the last epoch. The
    ``val_*`` columns are then scored on slices the network trained on: a check that it fits, not an
    estimate of accuracy.
    """
    if int(patience) < 1 and not refit:  # 0 would stop before the first epoch and leave no checkpoint
        raise ValueError(f"patience must be at least 1 epoch, got {patience}")
    if threads:
        torch.set_num_threads(threads)
    seed_everything(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tr, va = load_cache(train_cache), load_cache(val_cache)
    n_dropped = 0
    if drop:
        n_before = len(tr["labels"]) + len(va["labels"])
        tr, va = _without(tr, drop), _without(va, drop)
        n_dropped = n_before - len(tr["labels"]) - len(va["labels"])
        if n_dropped == 0:
            raise ValueError(f"{drop}: none of its paths is in {train_cache} or {val_cache}; check the list "
                             f"was made from the same dataset root")
        print(f"left out {n_dropped} slices listed in {drop}")
    for key in ("mode", "size", "margin", "segmenter_sha256"):  # epochs are chosen on val: the same input
        if key in tr and key in va and tr[key] != va[key]:
            raise ValueError(f"{val_cache}: {key} {va[key]} differs from {train_cache}'s {tr[key]}; "
                             f"make both with the same `crop` settings")
    if refit:
        tr = _joined(tr, va)
    mode, size = str(tr["mode"]), int(tr["size"])
    model = create_model(model_name, pretrained=pretrained, in_chans=1, num_classes=len(CLASSES)).to(device)
    model = model.to(memory_format=torch.channels_last)
    counts = np.bincount(tr["labels"], minlength=len(CLASSES)).astype(np.float64)
    class_weight = torch.tensor(counts.sum() / (len(CLASSES) * np.maximum(counts, 1)), dtype=torch.float32)
    loss_fn = nn.CrossEntropyLoss(weight=class_weight.to(device), label_smoothing=label_smoothing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(tr["labels"]) + batch_size - 1) // batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=0.15)
    scaler = torch.amp.GradScaler("cuda", enabled=device.startswith("cuda"))
    aug = Augment(**(augment or {})).to(device)
    meta = {"model": model_name, "mode": mode, "size": size, "classes": list(CLASSES), "pretrained": pretrained,
            "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "input_mean": INPUT_MEAN,
            "input_std": INPUT_STD, "train_cache": str(train_cache), "val_cache": str(val_cache),
            "margin": float(tr["margin"]) if "margin" in tr else 0.25, "n_train": int(len(tr["labels"])),
            "n_val": int(len(va["labels"]))}
    if "segmenter_sha256" in tr:  # predict --seg auto finds it again by this hash
        meta["segmenter_sha256"] = str(tr["segmenter_sha256"])
    if drop:
        meta.update({"drop": str(drop), "n_dropped": n_dropped})
    if refit:
        meta["refit"] = True
    if not aug.flip_shear:  # recorded only when off: no key means the shear, as in every file before session 23
        meta["flip_shear"] = False
    if aug.stretch:
        meta["stretch"] = aug.stretch
    if not 0.0 <= mixup:
        raise ValueError(f"mixup must be >= 0, got {mixup}")
    if mixup:  # recorded only when on, as the other additions
        meta["mixup"] = mixup
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    averaged = None
    if ema:
        meta["ema"] = float(ema)
        averaged = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema), use_buffers=True)
    scored = averaged.module if averaged is not None else model

    start_epoch, best, history, elapsed = 0, None, [], 0.0
    data_sha256 = _data_fingerprint(tr, va)
    last_path = out / "last.pt"
    if resume and last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state.get("meta") != meta:
            before = state.get("meta") or {}
            changed = sorted(k for k in {*meta, *before} if before.get(k) != meta.get(k))
            raise RuntimeError(f"{last_path}: was trained with other settings ({', '.join(changed)}); "
                               f"use another --out or --no-resume")
        if state.get("data_sha256", data_sha256) != data_sha256:  # (absent in runs before it was recorded)
            raise RuntimeError(f"{last_path}: was trained on other slices than {train_cache} and {val_cache} hold "
                               f"now (the caches were rebuilt, or --drop's list changed): its validation slices may "
                               f"be among today's training ones; use another --out or --no-resume")
        model.load_state_dict(state["model"])
        if averaged is not None:
            averaged.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, history, elapsed = state["epoch"] + 1, state["best"], state["history"], state["elapsed"]
        torch.set_rng_state(state["torch_rng"])
        # on CUDA the batch augmentation draws from the GPU's generator, and AMP's loss scale has been
        # learned: both continue where they stopped rather than restart
        if state.get("cuda_rng") is not None and device.startswith("cuda"):
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        if state.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        print(f"resumed from {last_path} at epoch {start_epoch}")

    stale = 0 if best is None else sum(1 for h in history[::-1] if h["epoch"] > best["epoch"])
    for epoch in range(start_epoch, epochs):
        if stale >= patience and not refit:
            print(f"early stop: no validation gain for {patience} epochs")
            break
        t0 = time.time()
        model.train()
        rng = np.random.default_rng(seed * 1000 + epoch)
        mix_rng = np.random.default_rng([seed, epoch, 1])  # its own stream: runs without mixup draw as before
        total_loss, seen = 0.0, 0
        bar = tqdm(list(_batches(len(tr["labels"]), batch_size, rng)), desc=f"epoch {epoch + 1}/{epochs}",
                   disable=None, mininterval=5)
        for idx in bar:
            x = normalise(aug(to_input(tr["images"][idx], device))).contiguous(memory_format=torch.channels_last)
            y = torch.as_tensor(tr["labels"][idx]).to(device)
            if mixup:
                x, y_other, lam = mix_batch(x, y, mix_rng, mixup)
            with torch.autocast("cuda", enabled=device.startswith("cuda")):
                out_logits = model(x)
                loss = loss_fn(out_logits, y)
                if mixup:
                    loss = lam * loss + (1 - lam) * loss_fn(out_logits, y_other)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if averaged is not None:
                averaged.update_parameters(model)
            total_loss += float(loss.detach()) * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        logits = predict_logits(scored, va["images"], device)
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(va["labels"])))
        metrics = classification_metrics(va["labels"], logits.argmax(1))
        elapsed += time.time() - t0
        row = {"epoch": epoch, "train_loss": total_loss / seen, "val_loss": val_loss, "val_acc": metrics["accuracy"],
               "val_macro_f1": metrics["macro_f1"], "lr": scheduler.get_last_lr()[0], "seconds": time.time() - t0}
        history.append(row)
        print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        improved = refit or best is None or (
            (row["val_macro_f1"], -row["val_loss"]) > (best["val_macro_f1"], -best["val_loss"]))
        if improved:
            best, stale = dict(row), 0
            _save_atomic({"state_dict": scored.state_dict(), "meta": {**meta, "epoch": epoch, "val": metrics}},
                         out / "best.pt")
        else:
            stale += 1
        _save_atomic({"model": model.state_dict(), **({"ema": averaged.state_dict()} if averaged is not None else {}),
                      "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best, "history": history,
                      "elapsed": elapsed, "torch_rng": torch.get_rng_state(), "meta": meta, "data_sha256": data_sha256,
                      "cuda_rng": torch.cuda.get_rng_state(device) if device.startswith("cuda") else None,
                      "scaler": scaler.state_dict()}, last_path)
        write_curves(history, out)
    summary = {**meta, "best_epoch": best["epoch"] if best else None, "best": best, "train_seconds": elapsed,
               "best_sha256": sha256_file(out / "best.pt") if (out / "best.pt").is_file() else None,
               "environment": environment()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _save_atomic(obj, path: Path) -> None:
    from pipeline.weights import save_checkpoint

    save_checkpoint(obj, path)


def write_curves(history: list[dict], out: Path) -> None:
    """``curves.csv`` and ``curves.png`` (loss and validation accuracy per epoch)."""
    with (out / "curves.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax1.set_xlabel("epoch"); ax1.set_ylabel("loss"); ax1.legend()
    ax2.plot(epochs, [h["val_acc"] for h in history], label="val accuracy")
    ax2.plot(epochs, [h["val_macro_f1"] for h in history], label="val macro-F1")
    ax2.set_xlabel("epoch"); ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
