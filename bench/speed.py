"""Speed of refsr on this machine: refsr's graph against the published one, where the time goes, and the limit.

    python bench/speed.py [--device cpu|cuda] [--json docs/speed-cpu.json] [--sizes 64 128 256 512]

Prints tables and writes JSON. Model time is the median of --repeats runs after one warm-up, with the real
Upscaler (tiles, LR consistency), weights as shipped for refsr's graph and untrained for the paper graph (timing does
not depend on the values). Peak memory on the CPU: each case once more in a fresh process, its peak RSS (VmHWM) and
that peak less the RSS of the process with both graphs loaded (what the graph itself needs); on CUDA, torch's peak
allocation.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from refsr_cli.checkpoint import load_weights  # noqa: E402
from refsr_cli.images import write_picture  # noqa: E402
from refsr_cli.engine import Upscaler, back_project  # noqa: E402
from paper_graph import PaperRefVAE  # noqa: E402


def synthetic(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = (rng.random((max(size // 8, 2), max(size // 8, 2), 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read_peak_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return rss_mib("VmHWM")


def timed(fn, device, repeats: int):
    fn()  # warm-up
    times = []
    reset_peak(device)
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), read_peak_mib(device)


CASES = ("refsr, fidelity (T = 0)", "refsr, prior sample", "refsr, new reference", "paper graph, new reference",
         "bicubic (PIL)")


def case_function(name: str, size: int, ours: Upscaler, paper: Upscaler):
    lr, ref = synthetic(size), synthetic(256, seed=9)
    return {
        "refsr, fidelity (T = 0)": lambda: ours.upscale(lr, [None]),
        "refsr, prior sample": lambda: ours.upscale(lr, [ours.prior_z(0)]),
        "refsr, new reference": lambda: ours.upscale(lr, [ours.reference_z(ref)]),
        "paper graph, new reference": lambda: paper.upscale(lr, [paper.reference_z(ref)]),
        "bicubic (PIL)": lambda: Image.fromarray((lr * 255).astype(np.uint8)).resize((size * 8, size * 8),
                                                                                      Image.BICUBIC),
    }[name]


def memory_of_case(args, case: int, size: int):
    """Run in a fresh process (--memory-case): the RSS once both graphs are loaded, and the peak RSS of one run of
    the case. Their difference is what the graph itself needs, without Python, torch and the weights."""
    device = torch.device(args.device)
    ours, paper = load_graphs(args.weights, device)
    fn = case_function(CASES[case], size, ours, paper)
    before = rss_mib("VmRSS")
    reset_peak(device)
    fn()
    print(json.dumps({"loaded_mib": before, "peak_mib": rss_mib("VmHWM")}))


def graph_table(args, device, ours: Upscaler, paper: Upscaler):
    rows = []
    for size in args.sizes:
        out_mpx = (size * 8) ** 2 / 1e6
        for i, name in enumerate(CASES):
            if name.startswith("paper") and size not in args.paper_sizes:
                continue
            seconds, peak = timed(case_function(name, size, ours, paper), device, args.repeats if size <= 256 else 1)
            row = {"lr": size, "graph": name, "seconds": seconds, "mpx_per_s": out_mpx / seconds, "peak_mib": peak}
            if device.type == "cpu":  # the process's peak includes earlier cases: measure each in a fresh one
                command = [sys.executable, __file__, "--memory-case", str(i), str(size), "--device", "cpu"]
                if args.weights:
                    command += ["--weights", args.weights]
                fresh = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                row.update(peak_mib=fresh["peak_mib"], graph_mib=fresh["peak_mib"] - fresh["loaded_mib"])
            rows.append(row)
            extra = f"  ({row['graph_mib']:.0f} MiB above the loaded process)" if "graph_mib" in row else ""
            print(f"{size:>5}  {name:<28} {seconds:>8.3f} s  {out_mpx / seconds:>7.2f} Mpx/s  "
                  f"{row['peak_mib']:>7.0f} MiB{extra}", flush=True)
    return rows


def load_graphs(weights, device):
    ours = Upscaler(load_weights(weights, 8).model, device)
    paper = Upscaler(PaperRefVAE(), device)
    return ours, paper


def breakdown(device, ours: Upscaler, size: int = 128):
    """Where one `upscale` of a size x size LR with a new reference goes."""
    model, s = ours.model, ours.scale
    lr_img = synthetic(size)
    ref = synthetic(256, seed=9)
    with tempfile.TemporaryDirectory() as tmp:
        Image.fromarray((lr_img * 255).astype(np.uint8)).save(Path(tmp) / "lr.png")
        parts = {}
        start = time.perf_counter()
        picture_rgb = np.asarray(Image.open(Path(tmp) / "lr.png").convert("RGB"), dtype=np.float32) / 255
        parts["read input"] = time.perf_counter() - start
        with torch.inference_mode():
            lr = ours._tensor(picture_rgb)
            parts["reference encoding"], _ = timed(lambda: ours.reference_z(ref), device, 3)
            z = ours.reference_z(ref)
            parts["LR encoding"], _ = timed(lambda: model.encode_lr(lr), device, 3)
            code, cell = model.encode_lr(lr), ours.condition(z, lr.shape[-2:])
            parts["decoding"], _ = timed(lambda: model.decode(lr, code, cell), device, 3)
            sr = model.decode(lr, code, cell)
            parts["LR consistency"], _ = timed(lambda: back_project(sr, lr, s, ours.consistency_steps), device, 3)
        image = ours.upscale(picture_rgb, [z])[0]
        start = time.perf_counter()
        write_picture(image, Path(tmp) / "out.png")
        parts["write output (PNG)"] = time.perf_counter() - start
    total = sum(parts.values())
    for name, seconds in parts.items():
        print(f"  {name:<22} {seconds:>7.3f} s  {100 * seconds / total:>5.1f} %")
    return {k: {"seconds": v, "share": v / total} for k, v in parts.items()}


def samples_cost(device, ours: Upscaler, size: int = 128):
    lr = synthetic(size)
    one, _ = timed(lambda: ours.upscale(lr, [ours.prior_z(0)]), device, 3)
    ten, _ = timed(lambda: ours.upscale(lr, [ours.prior_z(i) for i in range(10)]), device, 1)
    print(f"  --n 1: {one:.3f} s; --n 10: {ten:.3f} s = {ten / 10:.3f} s per sample ({ten / 10 / one:.2f}x of --n 1)")
    return {"n1_seconds": one, "n10_seconds": ten, "per_sample_ratio": ten / 10 / one}


def cli_times(weights, repeats: int = 3):
    """Whole CLI processes as a user (or a shell loop) pays them, best of `repeats`, each next to a bare
    `python -c "import torch"` measured in the same run (these machines' absolute times drift from day to day):
    8x of a 128x128 LR (a crop of examples/seeding-lr.png) with `upscale`, `upscale --ref` a 1024² painting, and
    `sample --n 1`, the cost of each extra sample of `sample --n 10`, `info`
    and `--help`."""
    def best(command):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
            times.append(time.perf_counter() - start)
        return min(times)
    refsr = [sys.executable, "-m", "refsr_cli"]
    use = ["--weights", str(weights)] if weights else []
    with tempfile.TemporaryDirectory() as tmp:
        # A photo, not synthetic(): the analogy searches only where the input has detail, so a smooth synthetic
        # image would time it doing nothing. The network's cost does not depend on the content.
        lr = Path(tmp) / "lr.png"
        Image.open(ROOT / "examples" / "seeding-lr.png").convert("RGB").crop((0, 0, 128, 128)).save(lr)
        ref = painting(Path(tmp) / "ref1024.png", 1024)
        out = ["-o", tmp, "-q", "--overwrite", *use]
        result = {"import_torch_seconds": best([sys.executable, "-c", "import torch"]),
                  "upscale_seconds": best(refsr + ["upscale", str(lr), *out]),
                  "upscale_ref1024_seconds": best(refsr + ["upscale", str(lr), "--ref", str(ref), *out]),
                  "sample_n1_seconds": best(refsr + ["sample", str(lr), "--n", "1", *out]),
                  "sample_n10_seconds": best(refsr + ["sample", str(lr), "--n", "10", *out]),
                  "info_seconds": best(refsr + ["info", str(Path(tmp) / "lr_x8.png")]),
                  "help_seconds": best(refsr + ["--help"])}
    result["extra_sample_seconds"] = (result["sample_n10_seconds"] - result["sample_n1_seconds"]) / 9
    result["reference_adds_seconds"] = result["upscale_ref1024_seconds"] - result["upscale_seconds"]
    torch_s = result["import_torch_seconds"]
    for k, v in result.items():
        over = f"  (import torch {v - torch_s:+.2f} s)" if k in ("upscale_seconds", "sample_n1_seconds") else ""
        print(f"  {k:<24} {v:>7.2f} s{over}")
    return result


def painting(path: Path, size: int) -> Path:
    """The shipped example painting (examples/painting.jpg) resized to size x size, as a PNG reference."""
    Image.open(ROOT / "examples" / "painting.jpg").convert("RGB").resize((size, size), Image.BICUBIC).save(path)
    return path


def analogy_costs(weights, repeats: int = 5):
    """The texture analogy's own costs: loading the shipped bank's part of one scale (in this process, median of
    `repeats`), and the peak memory (RSS) of a whole `upscale` at 8x of examples/seeding-lr.png (256x144) with a
    4096² reference, in a fresh process."""
    from refsr_cli.analogy import TEXTURE_BANK, load_bank
    from refsr_cli.checkpoint import weights_dir
    load_bank(weights_dir() / TEXTURE_BANK.format(scale=8), 8)  # in the page cache, as on any run after the first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        load_bank(weights_dir() / TEXTURE_BANK.format(scale=8), 8)
        times.append(time.perf_counter() - start)
    use = ["--weights", str(weights)] if weights else []
    with tempfile.TemporaryDirectory() as tmp:
        lr = Path(tmp) / "lr.png"
        Image.open(ROOT / "examples" / "seeding-lr.png").convert("RGB").save(lr)  # 256x144
        ref = painting(Path(tmp) / "ref4096.png", 4096)
        # The command in a fresh process that reports its own peak RSS (VmHWM) as it exits.
        script = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_module('refsr_cli', "
                  "run_name='__main__')\nfinally:\n    print([l for l in open('/proc/self/status') "
                  "if l.startswith('VmHWM')][0].split()[1], file=sys.stderr)")
        done = subprocess.run([sys.executable, "-c", script, "refsr", "upscale", str(lr), "--ref", str(ref),
                               "-o", tmp, "-q", *use], capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"speed.py: the 4096² reference run failed: {done.stderr.strip()}")
        peak = int(done.stderr.split()[-1]) / 1024
    result = {"bank_load_seconds": statistics.median(times), "upscale_ref4096_peak_mib": peak}
    for k, v in result.items():
        print(f"  {k:<32} {v:>8.2f}")
    return result


def arithmetic_rate(device, ours: Upscaler, size: int = 128):
    """MACs of refsr's decoder (counted by torch) per second, against a large float32 matmul on the same device."""
    from torch.utils.flop_counter import FlopCounterMode
    model = ours.model
    with torch.inference_mode():
        lr = ours._tensor(synthetic(size))
        code, cell = model.encode_lr(lr), ours.condition(ours.prior_z(0), lr.shape[-2:])
        counter = FlopCounterMode(display=False)
        with counter:
            model.decode(lr, code, cell)
        macs = counter.get_total_flops() / 2
        seconds, _ = timed(lambda: model.decode(lr, code, cell), device, 3)
        n = 4096
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        mm_seconds, _ = timed(lambda: a @ b, device, 3)
    peak = n ** 3 / mm_seconds
    print(f"  decoder: {macs / 1e9:.1f} GMAC in {seconds:.3f} s = {macs / seconds / 1e9:.1f} GMAC/s; "
          f"matmul peak {peak / 1e9:.1f} GMAC/s; {100 * macs / seconds / peak:.0f} % of peak")
    return {"decoder_gmac": macs / 1e9, "decoder_gmac_per_s": macs / seconds / 1e9,
            "matmul_gmac_per_s": peak / 1e9, "fraction_of_peak": macs / seconds / peak}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--paper-sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default=None, help="checkpoint [default: the shipped x8]")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--parts", nargs="+",
                        default=["graphs", "breakdown", "samples", "arithmetic", "cli", "analogy"],
                        help="which parts to run (default: all)")
    parser.add_argument("--memory-case", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case is not None:
        return memory_of_case(args, *args.memory_case)
    device = torch.device(args.device)
    ours, paper = load_graphs(args.weights, device)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "device": str(device),
                          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}}
    print(f"machine: {result['machine']}")
    parts = [("graphs", "8x model time (median) and peak memory", lambda: graph_table(args, device, ours, paper)),
             ("breakdown", "where one upscale of a 128x128 LR with a new reference goes", lambda: breakdown(device, ours)),
             ("samples", "sample --n 10 against --n 1 (128x128 LR)", lambda: samples_cost(device, ours)),
             ("arithmetic", "arithmetic rate of the decoder (128x128 LR)", lambda: arithmetic_rate(device, ours)),
             ("cli", "whole CLI processes (wall, best of 3)", lambda: cli_times(args.weights)),
             ("analogy", "the texture analogy: loading the bank, memory with a 4096² reference",
              lambda: analogy_costs(args.weights))]
    for name, title, run in parts:
        if name in args.parts and not (name == "cli" and device.type != "cpu"):
            print(f"\n{title}")
            result[name] = run()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
