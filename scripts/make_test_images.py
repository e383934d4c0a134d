"""tests/data/hr/: the small CC-licensed HR set on which tests/test_weights.py checks that the shipped weights beat
bicubic, so that a clean clone (without ../shared) runs that check. Five 192-pixel crops (a multiple of 8: a 24-pixel
LR at x8), each the busiest window of a quarter of its photo, from the two CC photos of ../shared/data/examples-src
(neither is in train_hr, so these are held out from training):

    python scripts/make_test_images.py   [--src ../shared/data/examples-src] [--out tests/data/hr]
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from refsr_cli.sheet import busiest_window  # noqa: E402

SIDE = 192
CROPS = [("seeding_CC0-1.0_Clemens-Engelhardt.jpg", "seeding", (0, 1, 2, 3)),  # quarters: 0 top-left ... 3 bottom-right
         ("painting-colors_CC-BY-SA-3.0_HEROBRINE7GAMER.jpg", "painting", (1,))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=ROOT.parent / "shared/data/examples-src")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/data/hr")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, stem, quarters in CROPS:
        photo = np.asarray(Image.open(args.src / name).convert("RGB"))
        h, w = photo.shape[:2]
        for q in quarters:
            y0, x0 = (q // 2) * h // 2, (q % 2) * w // 2
            quarter = photo[y0:y0 + h // 2, x0:x0 + w // 2]
            top, left = busiest_window(quarter, SIDE)
            crop = quarter[top:top + SIDE, left:left + SIDE]
            path = args.out / f"{stem}-q{q}.png"
            Image.fromarray(crop).save(path)
            print(f"{path}: {name} at ({x0 + left}, {y0 + top})")


if __name__ == "__main__":
    main()
