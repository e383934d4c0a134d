"""Peak resident memory of one `refsr upscale` at 8x, for LR images of several sizes (issue: bounded memory).

    python bench/memory.py [--sizes 256 512 1024 2048] [--weights FILE] [--json bench/memory.json]

Each size runs the real CLI in a fresh process on a synthetic LR image and reads its peak RSS from the kernel
(getrusage of the child, the same number /usr/bin/time -v reports as "Maximum resident set size").
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # the outputs measured here are legitimately huge (16384² at 2048² LR)


def synthetic_lr(path: Path, size: int) -> None:
    rng = np.random.default_rng(size)
    small = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(small).resize((size, size), Image.BICUBIC).save(path)


def run_measured(command: list):
    """Runs `command` in a fresh child process: (its CompletedProcess, its peak RSS in MiB). A fresh child each
    time: RUSAGE_CHILDREN's maxrss is the largest of the children waited for so far."""
    done = subprocess.run(["/usr/bin/env", "python3", "-c", (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r)"), *command],
        capture_output=True, text=True)
    peak = int(done.stdout.split()[-1]) / 1024 if done.stdout.split() else float("nan")
    return done, peak


def measure(size: int, weights, extra) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        lr = Path(tmp) / f"lr{size}.png"
        synthetic_lr(lr, size)
        command = [sys.executable, "-m", "refsr_cli", "upscale", str(lr), "--scale", "8", "-o", tmp, "-q",
                   "--device", "cpu", *extra]
        if weights:
            command += ["--weights", weights]
        started = time.time()
        done, peak = run_measured(command)
        if done.returncode != 0:
            raise SystemExit(f"size {size}: refsr failed: {done.stderr.strip()}")
        out_size = Image.open(Path(tmp) / f"lr{size}_x8.png").size
    return {"lr": size, "output": f"{out_size[0]}x{out_size[1]}", "peak_rss_mib": peak,
            "seconds": round(time.time() - started, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--weights", default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="further refsr flags, after --")
    args = parser.parse_args()
    rows = []
    print(f"{'LR':>6} {'output':>12} {'peak RSS':>10} {'wall':>8}")
    for size in args.sizes:
        row = measure(size, args.weights, args.extra)
        rows.append(row)
        print(f"{size:>6} {row['output']:>12} {row['peak_rss_mib']:>7.0f} MiB {row['seconds']:>7.1f}s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": os.uname().machine, "cpus": os.cpu_count(), "rows": rows},
                                        indent=1))


if __name__ == "__main__":
    main()
