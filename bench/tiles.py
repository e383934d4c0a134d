"""How far tiled upscaling is from untiled, per --tile-pad: the README's "a grey level or two" at the default pad.

    python bench/tiles.py [--image examples/seeding-lr.png] [--scale 8] [--tile 32] [--pads 32 16 8 4 0]

Upscales the image once whole (one tile) and once per pad in tiles of --tile LR pixels, with the shipped weights and
the prior's z of seed 0, and prints the largest and mean difference in grey levels (0-255) and the share of output
values more than 2 levels off.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from refsr_cli.engine import Upscaler  # noqa: E402
from refsr_cli.options import EngineOptions  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, default=ROOT / "examples" / "seeding-lr.png")
    parser.add_argument("--scale", type=int, choices=(2, 4, 8), default=8)
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--pads", type=int, nargs="+", default=[32, 16, 8, 4, 0])
    args = parser.parse_args()
    lr = np.asarray(Image.open(args.image).convert("RGB"), dtype=np.float32) / 255
    side = max(lr.shape[:2])
    whole = Upscaler.from_weights(scale=args.scale, options=EngineOptions(tile=side))
    z = [whole.prior_z(0)]
    reference = whole.upscale(lr, z)[0].astype(int)
    print(f"{args.image.name} {lr.shape[1]}x{lr.shape[0]}, x{args.scale}, tiles of {args.tile} against one tile")
    print(f"{'pad':>4} {'max':>5} {'mean':>9} {'>2 levels':>10}")
    for pad in args.pads:
        tiled = Upscaler.from_weights(scale=args.scale, options=EngineOptions(tile=args.tile, tile_pad=pad))
        diff = np.abs(reference - tiled.upscale(lr, z)[0].astype(int))
        print(f"{pad:>4} {diff.max():>5} {diff.mean():>9.6f} {(diff > 2).mean():>9.3%}")


if __name__ == "__main__":
    main()
