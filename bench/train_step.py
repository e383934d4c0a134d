"""What a training step costs on this machine, and what the crop pool, the memory layout and torch.compile change.

    python bench/train_step.py [--stage texture|trunk] [--steps 6] [--compile] [--json docs/train-step-cpu.json]

Both stages run their real step (refsr_cli.train's stages, forward, backward and Adam) on synthetic photos, with
the package's default options (texture: batch 8 of 24-pixel LR crops at x8, 8 IMLE latents per crop, the shipped
x8 weights; trunk: batch 8 of 40-pixel LR crops, x2/x4/x8 in turn, the release recipe). Texture variants:
- "trunk every step": each crop used once (--crop-uses 1), so the frozen trunk runs on every crop of every step,
  as it did before the pool; NCHW;
- "crop pool": each crop serves 4 batches (the default), NCHW;
- "crop pool, channels-last": the default layout of the texture stage;
- "... + torch.compile" with --compile (the first steps pay the compilation).
Samples/s counts the batch's crops (8 a step), not the 64 decoded latents.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refsr_cli import stages  # noqa: E402
from refsr_cli.options import TrainOptions  # noqa: E402


def synthetic_photos(folder: Path, count: int = 8) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        small = (rng.random((50, 75, 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((600, 400), Image.BICUBIC).save(folder / f"{i}.png")


def time_steps(stage, steps: int, warmup: int):
    optimizer = torch.optim.Adam(stage.parameter_groups(), lr=1e-5)

    def step(i):
        loss = sum(stage.losses(i).terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    start = time.perf_counter()
    for i in range(warmup):
        step(i)
    warm = time.perf_counter() - start
    times = []
    for i in range(warmup, warmup + steps):
        start = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - start)
    return statistics.mean(times), warm


def texture_variants(opt: TrainOptions, compile_too: bool):
    yield "trunk every step", replace(opt, crop_uses=1), False, False
    yield "crop pool", opt, False, False
    yield "crop pool, channels-last", opt, True, False
    if compile_too:
        yield "crop pool, channels-last + torch.compile", opt, True, True


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("texture", "trunk"), default="texture")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = {"stage": args.stage, "torch_threads": torch.get_num_threads(), "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_photos(Path(tmp))
        if args.stage == "trunk":
            opt = TrainOptions(data=[Path(tmp)], stage="trunk", batch=8, lr_patch=40, scales=(2, 4, 8))
            variants = [("NCHW", opt, False, False)]
        else:
            # A pool as large as the default and the warm-up steps as many as a crop's uses: the timed steps pay
            # the refills of a run in its stride, not the first fill.
            opt = TrainOptions(data=[Path(tmp)], scale=8)
            variants = list(texture_variants(opt, args.compile))
        for name, variant, channels_last, compiled in variants:
            torch.manual_seed(0)
            stage = (stages.TrunkStage if args.stage == "trunk" else stages.TextureStage)(
                variant, torch.device("cpu"), 0, None)
            layout = torch.channels_last if channels_last else torch.contiguous_format
            if args.stage == "texture":
                stage.model.to(memory_format=layout)
                stage.layout = (lambda x: x.contiguous(memory_format=layout) if torch.is_tensor(x) else x)
                if compiled:
                    stage.model.texture_residual = torch.compile(stage.model.texture_residual)
                    stage.model.vgg.forward = torch.compile(stage.model.vgg.forward)
            seconds, warm = time_steps(stage, args.steps, warmup=3 if args.stage == "trunk" else variant.crop_uses)
            samples = variant.batch / seconds
            print(f"{name:<44} {seconds:.3f} s per step ({samples:.2f} samples/s); warm-up {warm:.1f} s", flush=True)
            result["variants"][name] = {"seconds_per_step": seconds, "samples_per_s": samples, "warmup_seconds": warm}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
