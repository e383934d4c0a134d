"""How much could any choice of *where* to paste the aligned reference gain, under a `--match` protocol? An upper
bound that looks at the HR image: the references' pixels, aligned by `refsr_cli/match.py` and back-projected, are
blended into the output without a reference (T = 0) with the weight in {0, 1/4, ..., 1} that is best against the
HR image, chosen per block of B x B LR pixels. No confidence map, learned or not, that blends these pixels can do
better than the oracle at the same block size; at B = 1 the oracle nearly picks pixels one by one.

    python scripts/match_oracle.py ../shared/data/val_hr --scale 4 --protocol half --blocks 8 2 1 \\
        --json docs/eval/match/oracle-x4-val_hr-half.json
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from refsr_cli.evaluate import as_tensor, protocol_images  # noqa: E402
from refsr_cli.images import list_images  # noqa: E402
from refsr_cli.options import EngineOptions  # noqa: E402
from refsr_cli.engine import Upscaler, back_project  # noqa: E402
from refsr_cli.match import correspond, prepare_reference  # noqa: E402
from refsr_cli.metrics import psnr_y, to_float  # noqa: E402

WEIGHTS = torch.linspace(0, 1, 5)


def oracle_blend(base: torch.Tensor, pasted: torch.Tensor, hr: torch.Tensor, block: int) -> torch.Tensor:
    """Per block of `block` HR pixels, the blend of `base` and `pasted` (weight from WEIGHTS) closest to `hr`."""
    errors = torch.stack([F.avg_pool2d(((base + w * (pasted - base) - hr) ** 2).mean(1, keepdim=True), block,
                                       ceil_mode=True) for w in WEIGHTS])
    best = WEIGHTS[errors.argmin(0)]
    best = F.interpolate(best, scale_factor=block, mode="nearest")[..., :hr.shape[-2], :hr.shape[-1]]
    return base + best * (pasted - base)


def as_float(t: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> HxWx3 quantised to 8 bits, as a written output would be."""
    return (t[0].clamp(0, 1).permute(1, 2, 0).double().numpy() * 255).round() / 255


@torch.inference_mode()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hr_dir", type=Path)
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--weights", default=None)
    parser.add_argument("--protocol", choices=["warp", "half", "unrelated"], default="half")
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 2, 1], help="block sides in LR pixels")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    s = args.scale
    # The package's back-projection and tiles; docs/eval/match/oracle-*.json were measured with 2 rounds, the default
    # then, and 24 pixels of tile context.
    up = Upscaler.from_weights(args.weights, s, EngineOptions(device="cpu"))
    paths = list_images(args.hr_dir)
    rows = []
    for index, path in enumerate(paths):
        hr, lr, reference = protocol_images(paths, index, s, args.protocol)  # the images `refsr eval` measures
        lr = as_tensor(np.asarray(lr, dtype=np.float32) / 255)
        name = f"{path}: its {args.protocol} reference"  # what a "too small to match" error names
        transfer = correspond(lr, [prepare_reference(to_float(reference).astype(np.float32), s, name)], s)
        # The decoder's output at T = 0 (untiled), then as `--match` blends it, and with every pixel pasted.
        raw = up.model.decode(lr, up.model.encode_lr(lr), up.condition(None, lr.shape[-2:]), origin=(0, 0))
        base = back_project(raw, lr, s, up.consistency_steps)
        matched = back_project(transfer.blend(raw, 0, 0), lr, s, up.consistency_steps)
        confidence = transfer.matches[0].confidence
        transfer.matches[0].confidence = torch.ones_like(confidence)
        pasted = back_project(transfer.blend(raw, 0, 0), lr, s, up.consistency_steps)
        target = as_tensor(np.asarray(hr, dtype=np.float32) / 255)
        truth = to_float(hr)
        row = {"image": path.name, "confidence": float(confidence.mean()),
               "refsr": psnr_y(as_float(base), truth, s), "match": psnr_y(as_float(matched), truth, s),
               "pasted everywhere": psnr_y(as_float(pasted), truth, s)}
        for block in args.blocks:
            row[f"oracle {block}"] = psnr_y(as_float(oracle_blend(base, pasted, target, block * s)), truth, s)
        rows.append(row)
        print(path.name, "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k != "image"), flush=True)
    keys = [k for k in rows[0] if k not in ("image", "refsr", "confidence")]
    gains = {k: float(np.mean([r[k] - r["refsr"] for r in rows])) for k in keys}
    print(f"x{s} {args.hr_dir.name} {args.protocol}, mean PSNR-Y gain over refsr (T = 0, "
          f"{np.mean([r['refsr'] for r in rows]):.2f} dB): " + ", ".join(f"{k} {v:+.2f}" for k, v in gains.items()))
    if args.json:
        args.json.write_text(json.dumps({"scale": s, "protocol": args.protocol, "rows": rows, "gains": gains},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
