"""Builds the --match example pair in examples/ from the CC0 photo "seeding" (../shared/data/examples-src):
dandelions-lr.png, the left 1280 x 1152 pixels downscaled 4x with PIL bicubic; dandelions-ref.jpg, the
1536 x 1152 pixels from x = 256 (1024 columns shared with the first crop) turned 3 degrees and shrunk to 95 %, as a second shot
from a step aside would show them.

    python scripts/make_match_example.py ../shared/data/examples-src/seeding_CC0-1.0_Clemens-Engelhardt.jpg examples/
"""
import sys
from pathlib import Path

from PIL import Image

photo, out = Image.open(sys.argv[1]).convert("RGB"), Path(sys.argv[2])
left = photo.crop((0, 0, 1280, 1152))
left.resize((320, 288), Image.BICUBIC).save(out / "dandelions-lr.png", optimize=True)
right = photo.crop((256, 0, 1792, 1152)).rotate(3, resample=Image.BICUBIC, expand=False)
right = right.resize((round(right.width * 0.95), round(right.height * 0.95)), Image.BICUBIC)
right.crop((40, 40, right.width - 40, right.height - 40)).save(out / "dandelions-ref.jpg", quality=90)
