"""Build the texture banks that `refsr sample` draws from (weights/texture-bank-x{2,4,8}.safetensors): for each scale, the
most textured 256-pixel window of each CC-licensed photo `wp-*` of ../shared/data/train_hr (at half its size, so
that its texture is of the size an 8x output invents), paired with the shipped fidelity network's output of its LR
(refsr_cli.analogy). Never BSDS or benchmark pixels: the file ships.

    python scripts/make_texture_bank.py [-o weights/] [--data ../shared/data/train_hr]
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from refsr_cli.analogy import TEXTURE_BANK, bank_tensors, sharp_pair  # noqa: E402
from refsr_cli.engine import Upscaler  # noqa: E402
from refsr_cli.files import atomic_path  # noqa: E402
from refsr_cli.options import EngineOptions  # noqa: E402
from refsr_cli.sheet import busiest_window  # noqa: E402

CROP = 256


def crops(data: Path) -> list:
    """(name, HxWx3 float crop) of each wp-* photo: halved, then its busiest CROP-pixel window."""
    out = []
    for path in sorted(data.glob("wp-*.jpg")):
        image = Image.open(path).convert("RGB")
        image = image.resize((image.width // 2, image.height // 2), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) / 255
        top, left = busiest_window(pixels, CROP)
        out.append((path.name, pixels[top:top + CROP, left:left + CROP]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=Path("weights"), help="folder of the bank files")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/train_hr")
    args = parser.parse_args()
    sources = crops(args.data)
    if not sources:
        sys.exit(f"make_texture_bank: no wp-*.jpg in {args.data}")
    metadata = {"format": "refsr-texture-bank", "crop": str(CROP),
                "sources": json.dumps([name for name, _ in sources]),
                "licence": "crops of the wp-* photos of refsr's training data: Debian packages mate-backgrounds "
                           "(GPL-2+ / CC-BY-SA-4.0), plasma-workspace-wallpapers (GPL-2+), lomiri-wallpapers "
                           "(CC-BY-4.0, CC-BY-SA-3.0/4.0, CC0-1.0); authors in each package's copyright file"}
    args.out.mkdir(parents=True, exist_ok=True)
    for scale in (2, 4, 8):
        upscaler = Upscaler.from_weights(None, scale, EngineOptions(device="cpu"))
        tensors = bank_tensors([sharp_pair(crop, scale, upscaler.faithful) for _, crop in sources], scale)
        path = args.out / TEXTURE_BANK.format(scale=scale)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata | {"scale": str(scale)})
        size = sum(t.numel() * t.element_size() for t in tensors.values()) / 2 ** 20
        print(f"wrote {path}: {len(sources)} photos, {size:.1f} MiB")


if __name__ == "__main__":
    main()
