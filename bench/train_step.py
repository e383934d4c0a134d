"""What a trunk training step costs on this machine, part by part, and what the layout and torch.compile change.

    python bench/train_step.py [--steps 6] [--compile] [--json docs/train-step-cpu.json]

The step of `refsr train --stage trunk` (batch 8, LR 40 px, x2/x4/x8 in turn, the release recipe) on synthetic
images: the batch (crops and PIL-bicubic LR, on the main thread), then forward, backward and Adam with the trunk in
NCHW, in channels-last (what training uses), and compiled (--compile; the first steps pay the compilation).
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refsr_cli.model import FidelityTrunk, downscale  # noqa: E402
from refsr_cli.train import TrainOptions, make_pixel_batch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (a multiple of 3)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = [(rng.random((400, 600, 3)) * 255).astype(np.uint8) for _ in range(8)]
    opt = TrainOptions(data=[], out=None, batch=8, lr_patch=40, scales=(2, 4, 8))

    batches = []
    start = time.perf_counter()
    for step in range(args.steps):
        batches.append(make_pixel_batch(images, opt, step, opt.scales[step % 3]))
    batch_seconds = (time.perf_counter() - start) / args.steps
    print(f"batch (8 crops + PIL LR): {batch_seconds * 1000:.1f} ms")
    result = {"batch_seconds": batch_seconds, "torch_threads": torch.get_num_threads()}

    variants = [("NCHW", False, False), ("channels-last", True, False)]
    if args.compile:
        variants.append(("channels-last + torch.compile", True, True))
    for name, channels_last, compiled in variants:
        torch.manual_seed(0)
        trunk = FidelityTrunk(64, 16, (64, 32, 16), opt.scales)
        if channels_last:
            trunk.to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(trunk.parameters(), lr=1e-4)
        forward = torch.compile(trunk) if compiled else trunk

        def step(i):
            hr, lr = batches[i % len(batches)]
            scale = opt.scales[i % 3]
            if channels_last:
                lr = lr.contiguous(memory_format=torch.channels_last)
            sr = forward(lr, scale)
            loss = F.l1_loss(sr, hr) + F.l1_loss(downscale(sr, scale), lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        start = time.perf_counter()
        for i in range(3):  # warm-up: one step of each scale (and the compilation)
            step(i)
        warmup = time.perf_counter() - start
        times = []
        for i in range(args.steps):
            start = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - start)
        per_scale = {s: statistics.mean(times[j] for j in range(len(times)) if opt.scales[j % 3] == s)
                     for s in opt.scales}
        mean = statistics.mean(times)
        print(f"{name:<32} {mean:.3f} s per step ({opt.batch / mean:.1f} samples/s; "
              + ", ".join(f"x{s} {t:.3f} s" for s, t in per_scale.items()) + f"); warm-up {warmup:.1f} s")
        result[name] = {"seconds_per_step": mean, "samples_per_s": opt.batch / mean, "warmup_seconds": warmup,
                        "per_scale": per_scale}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
