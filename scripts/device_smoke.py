"""Smoke test of refsr on an accelerator (CUDA or Apple MPS) against the CPU, for wherever such a device is at hand.

    python scripts/device_smoke.py                  # every CUDA / MPS device this machine has
    python scripts/device_smoke.py --device cuda    # one device; `--device cpu` checks the script itself

What it checks, on a crop of the shipped example, with the shipped weights of --scale (where their texture branch
is untrained, today's branch with fixed random weights takes its place, so that the texture path runs too):
- the fidelity output, a prior sample and a reference output agree with the CPU's within a few grey levels;
- tiled equals untiled on the device (within the tiles' documented grey level or two);
- float16 (`--half`) stays at 35 dB PSNR or more against the CPU's float32;
- a few training steps of each stage run on the device, losses finite (nothing here is ever stepped in float64,
  which MPS lacks).
Prints one line per check and exits 1 if any fails; 0 with a note when there is no device to check.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from refsr_cli.checkpoint import load_weights  # noqa: E402
from refsr_cli.images import read_rgb  # noqa: E402
from refsr_cli.engine import Upscaler  # noqa: E402
from refsr_cli.metrics import psnr  # noqa: E402
from refsr_cli.options import TrainOptions  # noqa: E402
from refsr_cli.stages import migrated  # noqa: E402
from refsr_cli.train import train  # noqa: E402


def load(scale: int):
    """The shipped model of `scale`; with an untrained texture branch, today's branch with fixed random weights."""
    weights = load_weights(None, scale)
    model = migrated(weights, TrainOptions(data=[], out=Path("."), scale=scale))
    if not weights.texture_trained:
        generator = torch.Generator().manual_seed(0)
        for parameter in (model.to_rgb.weight, model.z_to_style.weight, *model.noise_strength):
            parameter.data.normal_(0, 0.05, generator=generator)
    return model.eval()


def accelerators() -> list:
    found = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        found.append("mps")
    return found


def run(upscaler: Upscaler, lr: np.ndarray, z_of) -> list:
    """The fidelity output, prior sample 0 and a reference output, as uint8 arrays."""
    zs = [None, upscaler.prior_z(0, 1.0), z_of(upscaler)]
    return upscaler.upscale(lr, zs)


def check(results: list, name: str, ok: bool, detail: str) -> None:
    results.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", action="append", help="cuda, cuda:1, mps or cpu (repeatable) [default: all]")
    parser.add_argument("--scale", type=int, default=8, choices=(2, 4, 8))
    parser.add_argument("--size", type=int, default=64, help="LR crop size in pixels")
    parser.add_argument("--train-steps", type=int, default=3)
    args = parser.parse_args()
    devices = args.device or accelerators()
    if not devices:
        print("no CUDA or MPS device on this machine: nothing to check")
        return 0

    lr = read_rgb(ROOT / "examples" / "seeding-lr.png")[:args.size, :args.size]
    ref = read_rgb(ROOT / "examples" / "painting.jpg")
    cpu = Upscaler(load(args.scale), "cpu", tile=1024)
    expected = run(cpu, lr, lambda u: u.reference_z(ref))
    results = []
    change = np.abs(expected[1].astype(int) - expected[0]).mean()
    check(results, "the texture branch runs", change > 0.5, f"a sample differs from the fidelity output by {change:.1f}"
          " grey levels on average")
    for name in devices:
        device = torch.device(name)
        started = time.perf_counter()
        whole = Upscaler(load(args.scale), device, tile=1024)
        got = run(whole, lr, lambda u: u.reference_z(ref))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        for label, a, b in zip(("fidelity", "prior sample", "reference"), got, expected):
            diff = int(np.abs(a.astype(int) - b).max())
            check(results, f"{name} {label} vs cpu", diff <= 3, f"max difference {diff} grey levels ({seconds:.2f} s "
                  "for all three, model load included)")
        tiled = Upscaler(load(args.scale), device, tile=args.size // 2, tile_pad=8)
        for label, a, b in zip(("fidelity", "prior sample", "reference"), run(tiled, lr, lambda u: u.reference_z(ref)),
                               got):
            diff = int(np.abs(a.astype(int) - b).max())
            check(results, f"{name} {label} tiled vs untiled", diff <= 2, f"max difference {diff} grey levels")
        if device.type != "cpu":
            half = Upscaler(load(args.scale), device, half=True, tile=1024)
            for label, a, b in zip(("fidelity", "prior sample", "reference"),
                                   run(half, lr, lambda u: u.reference_z(ref)), expected):
                value = psnr(a / 255.0, b / 255.0)
                check(results, f"{name} {label} float16 vs cpu float32", value >= 35, f"{value:.1f} dB")
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            data.mkdir()
            hr = (read_rgb(ROOT / "examples" / "seeding-lr.png") * 255).round().astype(np.uint8)
            Image.fromarray(hr).resize((hr.shape[1] * 4, hr.shape[0] * 4), Image.BICUBIC).save(data / "hr.png")
            Image.fromarray((ref * 255).round().astype(np.uint8)).save(data / "ref.png")
            for stage in ("trunk", "texture"):
                losses = []
                options = TrainOptions(data=[data], refs=[data] if stage == "texture" else None,  # trunk: none
                                       out=Path(tmp) / stage, stage=stage, scale=args.scale, scales=(args.scale,),
                                       steps=args.train_steps, batch=2, lr_patch=16, log_every=1, imle_samples=4,
                                       pool_size=4, perceptual_crop=64, init=None,
                                       device=str(device))
                try:
                    train(options, progress=lambda step, steps, l, rate: losses.append(float(l["l1"])))
                    ok = len(losses) == args.train_steps and all(np.isfinite(losses))
                    detail = f"{len(losses)} steps, pixel L1 {', '.join(f'{v:.3f}' for v in losses)}"
                except Exception as e:  # a smoke test reports every failure and goes on
                    ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                check(results, f"{name} training, {stage} stage", ok, detail)
    print(f"{sum(results)} of {len(results)} checks passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
