"""The model card's contact sheet: for each HR image, the same window at 100 % of bicubic, the fidelity output
(T = 0), three samples, three references and the HR original, labelled; samples and references as `upscale`
makes them (--texture analogy, the default, or learned).

    python scripts/model_card_sheet.py HR_IMAGE... --scale 8 --refs ../shared/data/refs -o docs/sheet-x8.png
    python scripts/model_card_sheet.py HR_IMAGE... --refs painting.jpg --refs wallpaper.jpg --refs photo.jpg -o ...
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refsr_cli.errors import RefsrError  # noqa: E402
from refsr_cli.files import atomic_path  # noqa: E402
from refsr_cli.images import expand_inputs, read_rgb  # noqa: E402
from refsr_cli.options import MAX_STRENGTH, MAX_TEMPERATURE, TEXTURES, BatchOptions, EngineOptions  # noqa: E402
from refsr_cli.engine import Latents, Upscaler  # noqa: E402
from refsr_cli.metrics import bicubic_resize, modcrop  # noqa: E402
from refsr_cli.sheet import contact_sheet, sheet_window  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--refs", action="append", required=True,
                        help="references (files, folders, globs; repeatable): three evenly spaced are used")
    parser.add_argument("--crop", type=int, default=192, help="window side in output pixels")
    parser.add_argument("--temperature", type=float, default=1.0, help="the samples' temperature")
    parser.add_argument("--strength", type=float, default=BatchOptions.strength, help="the analogy's strength")
    parser.add_argument("--texture", choices=TEXTURES, default=BatchOptions.texture)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    if not 0 <= args.temperature <= MAX_TEMPERATURE:  # also refuses nan
        parser.error(f"--temperature {args.temperature}: must be within 0..{MAX_TEMPERATURE:g}")
    if not 0 <= args.strength <= MAX_STRENGTH:
        parser.error(f"--strength {args.strength}: must be within 0..{MAX_STRENGTH:g}")
    gallery = expand_inputs(args.refs)
    refs = [gallery[i * len(gallery) // 3] for i in range(3)] if len(gallery) > 3 else gallery
    out_format = Image.registered_extensions().get(args.out.suffix.lower())
    if out_format is None:
        parser.error(f"-o {args.out}: give an image file name (.png, .jpg, ...)")
    if args.out.resolve() in {p.resolve() for p in [*args.images, *gallery]}:
        parser.error(f"-o {args.out} is an input of this run; it is never overwritten")
    up = Upscaler.from_weights(args.weights, args.scale, EngineOptions(device="cpu"))
    latents = Latents(up, args.texture, args.strength)
    ref_zs = [latents.draw(latents.reference(read_rgb(p), str(p)), 0, 0.0) for p in refs]
    rows = []
    for path in args.images:
        hr = modcrop(Image.fromarray((read_rgb(path) * 255).round().astype(np.uint8)), args.scale)
        lr = bicubic_resize(hr, (hr.width // args.scale, hr.height // args.scale))
        lr_f = np.asarray(lr, dtype=np.float32) / 255
        window = sheet_window(lr_f, args.scale, args.crop)
        outputs = up.upscale(lr_f, [None] + [latents.prior(seed, args.temperature) for seed in range(3)] + ref_zs)
        tiles = [np.asarray(bicubic_resize(lr, hr.size))] + outputs + [np.asarray(hr)]
        at_t = f" T={args.temperature:g}" if args.temperature != 1 else ""
        labels = (["bicubic", "T=0"] + [f"--seed {s}{at_t}" for s in range(3)] + [f"--ref {p.stem[:18]}" for p in refs]
                  + [f"HR {path.stem}"])
        rows.append(contact_sheet([t[window] for t in tiles], labels, columns=len(tiles)))
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:  # never a half-written sheet
        sheet.save(tmp, format=out_format)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    try:
        main()
    except RefsrError as e:  # an unreadable image or reference, bad weights: one line, not a traceback
        sys.exit(f"model_card_sheet.py: error: {e}")
