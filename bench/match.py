"""Time and peak memory of `refsr upscale --match` (content-similar references).

    python bench/match.py [--photo PHOTO] [--json docs/match-cpu.json]   (default: ../shared/data/val_hr/
    wp-onestandsout.jpg beside the repository, else examples/dandelions-ref.jpg)

time: a 128² LR (a 1024² crop of the photo, downscaled 8x) with a 1024² reference (that crop under the warp
protocol's transform), 8x: the matching alone and the whole output (matching + network + blend), median of 3,
in this process, weights loaded once beforehand.
memory: a 256² LR with a 4096² reference (the photo resized to 4096², so its content is at another scale), at 8x
and at 4x, and with four such references at 8x (the photo turned 0, 3, 6 and 9 degrees: every reference's pixels are
held for the whole run, so this shows what each one adds): the real CLI in a fresh process, its peak RSS read from the
kernel (getrusage of the child).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from memory import run_measured  # bench/memory.py, next to this script
from refsr_cli.evaluate import protocol_pair
from refsr_cli.engine import Upscaler  # noqa: E402
from refsr_cli.options import EngineOptions
from refsr_cli.match import correspond, prepare_reference


def timing(photo: Image.Image, repeats: int = 3) -> dict:
    crop = photo.crop((0, 0, 1024, 1024))
    hr, ref = protocol_pair(crop, "warp", 0)
    lr = np.asarray(hr.resize((128, 128), Image.BICUBIC), dtype=np.float32) / 255
    reference = prepare_reference(np.asarray(ref, dtype=np.float32) / 255, 8)
    upscaler = Upscaler.from_weights(None, 8, EngineOptions(device="cpu"))
    lr_t = torch.from_numpy(lr).permute(2, 0, 1)[None]
    match_s, total_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        transfer = correspond(lr_t, [reference], 8)
        match_s.append(time.perf_counter() - started)
        upscaler.upscale(lr, [None], transfer=transfer)
        total_s.append(time.perf_counter() - started)
    return {"lr": "128x128", "reference": "1024x1024", "scale": 8, "match_seconds": statistics.median(match_s),
            "total_seconds": statistics.median(total_s), "confidence": float(transfer.confidence.mean())}


def memory(photo: Image.Image, scale: int, references: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        lr = Path(tmp) / "lr.png"
        photo.crop((0, 0, 256 * scale, 256 * scale)).resize((256, 256), Image.BICUBIC).save(lr)
        command = [sys.executable, "-m", "refsr_cli", "upscale", str(lr), "--match", "--scale", str(scale), "-o", tmp,
                   "-q", "--device", "cpu"]
        for i in range(references):
            ref = Path(tmp) / f"ref{i}.png"
            photo.rotate(3 * i, resample=Image.BICUBIC).resize((4096, 4096), Image.BICUBIC).save(ref, compress_level=1)
            command += ["--ref", str(ref)]
        started = time.time()
        done, peak = run_measured(command)
        if done.returncode != 0:
            raise SystemExit(f"x{scale}: refsr failed: {done.stderr.strip()}")
    return {"lr": "256x256", "reference": "4096x4096", "references": references, "scale": scale,
            "peak_rss_mib": peak, "seconds": round(time.time() - started, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The photo of docs/match-cpu.json, found beside the repository wherever the command is run from; without
    # ../shared, the example photo that ships (timings then differ a little: another photo).
    measured = Path(__file__).resolve().parents[2] / "shared/data/val_hr/wp-onestandsout.jpg"
    shipped = Path(__file__).resolve().parents[1] / "examples/dandelions-ref.jpg"
    parser.add_argument("--photo", type=Path, default=measured if measured.is_file() else shipped,
                        help="the photo the LR, the references and the crops come from (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    try:
        photo = Image.open(args.photo).convert("RGB")
    except OSError as e:
        raise SystemExit(f"bench/match.py: --photo {args.photo}: not a readable image ({e})")
    if min(photo.size) < 2048:
        photo = photo.resize((max(2048, photo.width), max(2048, photo.height)), Image.BICUBIC)
    result = {"machine": os.uname().machine, "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "photo": args.photo.name, "time": timing(photo),
              "memory": [memory(photo, s) for s in (8, 4)] + [memory(photo, 8, references=4)]}
    t = result["time"]
    print(f"8x, 128² LR, 1024² reference: matching {t['match_seconds']:.2f} s, whole output {t['total_seconds']:.2f} s")
    for m in result["memory"]:
        refs = "a 4096² reference" if m["references"] == 1 else f"{m['references']} 4096² references"
        print(f"{m['scale']}x, 256² LR, {refs}: peak RSS {m['peak_rss_mib']:.0f} MiB ({m['seconds']} s)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
