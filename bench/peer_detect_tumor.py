"""The peer: ``detect-tumor`` (PyPI; a VGG16 run with ONNX Runtime), used the way its README shows:
one ``TumorDetector().predict(path)`` per scan. Runs in its own environment (``bench/.venv-peer``),
called by ``bench/bench.py`` with ``--job JOB.json``; prints one JSON line."""
import argparse
import json
import time
from pathlib import Path


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True)
    job = json.loads(Path(p.parse_args().job).read_text())
    from detect_tumor import TumorDetector

    files = job["files"]
    detector = TumorDetector()
    detector.predict(files[0])  # warm-up: session creation is not counted
    t = time.perf_counter()
    labels = [detector.predict(f).predicted_class for f in files]
    seconds = time.perf_counter() - t
    correct = sum(label == Path(f).parent.name for label, f in zip(labels, files))
    print(json.dumps({"images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds,
                      "accuracy": correct / len(files), "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
