"""Memory an animation takes to write, per pixel of each frame: the number behind images.ANIMATION_BYTES_PER_PIXEL.

    python bench/animation_memory.py [--side 800] [--frames 10 40]

Pillow's GIF and WebP writers are given every frame at once, so `walk --animate` holds them all. Each format and
frame count runs images.write_animation in a fresh process on noise frames (the least compressible) and reads its
peak RSS; the bytes a frame pixel costs are the difference between the two counts, over the frames between them.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = """
import resource, sys
from pathlib import Path
from refsr_cli.images import write_animation
frames, fmt = sorted(Path(sys.argv[1]).glob("f*.png"))[:int(sys.argv[2])], sys.argv[3]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
write_animation(frames, Path(sys.argv[1]) / f"walk.{fmt}", {})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def peak_kib(folder: Path, frames: int, fmt: str) -> int:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(frames), fmt], capture_output=True,
                          text=True, check=True, cwd=root, env={"PYTHONPATH": str(root)})
    return int(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=800)
    parser.add_argument("--frames", type=int, nargs=2, default=[10, 40])
    args = parser.parse_args()
    few, many = args.frames
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        for i in range(many):
            noise = (rng.random((args.side, args.side, 3)) * 255).astype(np.uint8)
            Image.fromarray(noise).save(Path(folder) / f"f{i:04d}.png", compress_level=1)
        for fmt in ("gif", "webp"):
            extra = (peak_kib(Path(folder), many, fmt) - peak_kib(Path(folder), few, fmt)) * 1024
            print(f"{fmt}: {extra / ((many - few) * args.side ** 2):.1f} bytes a frame pixel "
                  f"({few} to {many} frames of {args.side}x{args.side})")


if __name__ == "__main__":
    main()
