"""Inference: the Upscaler (tiling, LR consistency, one LR encoding for every z) and the batch behind
`refsr upscale` and `refsr sample`."""
import contextlib
import functools
import json
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import load_checkpoint, read_metadata, resolve_weights
from .errors import RefsrError
from .files import sha256_of
from .images import (DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, expand_inputs, output_format, read_picture, read_rgb,
                     software_tag, unique_stems, write_picture)
from .match import Transfer, correspond, prepare_reference
from .model import RefVAE, downscale, noise_tables, resampling_matrix, upsample
from .sheet import contact_sheet, sheet_window


@functools.lru_cache(maxsize=32)
def _inverse_down_up(length: int, scale: int, device: torch.device) -> torch.Tensor:
    """The inverse of downscale(upsample(.)) along one axis of an LR image, as a (length x length) matrix: on an LR
    image r, M_h^-1 @ r @ M_w^-T is the LR correction whose upsampling removes the LR residual r exactly. M's
    eigenvalues lie in about [0.47, 1.01] at every scale, so the inverse is well conditioned. Built in float64 on
    the CPU (MPS has no float64), used in float32 on the device."""
    cpu = torch.device("cpu")
    up = resampling_matrix(length, scale, False, cpu, torch.float64)
    down = resampling_matrix(length * scale, scale, True, cpu, torch.float64)
    return torch.linalg.inv(down @ up).float().to(device)


def back_project(sr, lr, scale: int, rounds: int):
    """Back-projection as POCS: `rounds` times, project `sr` onto the images whose bicubic downscale is `lr`, then
    onto [0, 1] (a clamp, which would otherwise undo the consistency at the end).

    The first projection is the limit of Irani & Peleg's iteration sr += up(lr - down(sr)), computed in closed
    form at LR resolution: each round costs two HR resamplings where ten classic steps cost twenty."""
    sr = sr.clamp(0, 1)
    if rounds == 0:
        return sr
    inv_h, inv_w = (_inverse_down_up(n, scale, lr.device) for n in lr.shape[-2:])
    for _ in range(rounds):
        residual = (lr - downscale(sr, scale)).float()
        correction = (inv_h @ residual @ inv_w.T).to(sr.dtype)
        sr = sr.add_(upsample(correction, scale)).clamp_(0, 1)
    return sr


class Latent(NamedTuple):
    """What one output is decoded from: z (None: the fidelity output, which has no texture branch) and the seed of
    the texture branch's noise; on a walk, the noise of `noise_seed` turns into that of `noise_to` as `noise_t`
    goes from 0 to 1. `transfer`: content-similar references' pixels blended in where they match (`--match`)."""
    z: torch.Tensor | None
    noise_seed: int = 0
    noise_to: int | None = None
    noise_t: float = 0.0
    transfer: Transfer | None = None


MIN_TILE = 16
OUTPUTS_BUDGET = 1 << 30  # bytes of finished outputs held at once; more z's are decoded in several passes


def tile_spans(length: int, tile: int):
    """[start, end) spans of at most `tile` covering 0..length."""
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


class Upscaler:
    """Runs a RefVAE on images of any size, a tile at a time.

    Each tile is cut with `tile_pad` LR pixels of context on every side and only its centre is kept. The network's
    receptive field is about 24 LR pixels, so with enough context a tiled result equals the untiled one (up to the
    far tail of the back-projection); no blending is needed, and each finished tile goes straight into the uint8
    output.
    """

    LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # grayscale in, grayscale out (ITU-R 601)

    def __init__(self, model: RefVAE, device, half=False, tile=256, tile_pad=24, consistency_steps=4, warn=None):
        self.warn = warn or (lambda message: print(f"refsr: warning: {message}", file=sys.stderr))
        self.device = torch.device(device)
        self.dtype = torch.float16 if half else torch.float32
        # Channels-last: oneDNN's (and cuDNN's) preferred layout; a quarter off the decoder on this CPU.
        self.model = model.to(self.device, self.dtype).to(memory_format=torch.channels_last).eval()
        self.scale = model.config.scale
        self.tile, self.tile_pad, self.consistency_steps = tile, tile_pad, consistency_steps
        self.texture_trained = True
        self.weights_path = None  # the checkpoint file, when loaded from one (for the outputs' provenance)

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        """HxWxC array -> (1, C, H, W) tensor, channels-last (the HWC memory as it is)."""
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(
            self.device, self.dtype, memory_format=torch.channels_last)

    @torch.inference_mode()
    def reference_z(self, image: np.ndarray, temperature: float = 0.0, seed: int = 0) -> Latent:
        """z from a reference image, mu + temperature * sigma * eps (eps and the texture noise of `seed`)."""
        size = self.model.config.ref_size
        ref = Image.fromarray((image * 255).round().astype(np.uint8)).resize((size, size), Image.BICUBIC)
        mu, logvar = self.model.encode_reference(self._tensor(np.asarray(ref, dtype=np.float32) / 255))
        eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed)).to(mu)
        return Latent(mu + temperature * torch.exp(0.5 * logvar) * eps, seed)

    def prior_z(self, seed: int, temperature: float = 1.0) -> Latent:
        """z ~ N(0, temperature^2 I), drawn on the CPU so that a seed gives the same z on every device, and the
        texture noise of the same seed; at temperature 0, the fidelity output."""
        if temperature == 0:
            return Latent(None, seed)
        eps = torch.randn(1, self.model.config.z_dim, generator=torch.Generator().manual_seed(seed))
        return Latent((temperature * eps).to(self.device, self.dtype), seed)

    def condition(self, latent: Latent | None, lr_size: tuple):
        """What the decoder needs of one latent for an LR image of `lr_size`: None (the trunk's fidelity output) for
        z = None."""
        latent = latent if latent is not None else Latent(None)
        if latent.z is None:
            return None
        config = self.model.config
        noise = None
        if config.texture_noise:
            noise = noise_tables([latent.noise_seed], lr_size, config.stages, self.device)
            if latent.noise_to is not None:
                # Along a quarter circle: every frame's noise has unit variance, and the ends are the two seeds'.
                end = noise_tables([latent.noise_to], lr_size, config.stages, self.device)
                t = latent.noise_t * math.pi / 2
                noise = [math.cos(t) * a + math.sin(t) * b for a, b in zip(noise, end)]
        return self.model.condition_cell(latent.z, noise)

    def tiles(self, height: int, width: int):
        return [(y, x) for y in tile_spans(height, self.tile) for x in tile_spans(width, self.tile)]

    def upscale(self, lr: np.ndarray, zs, alpha=None, grayscale=False, bits=8, on_tile=None) -> list:
        """lr HxWx3 float in [0, 1] -> one (H*s)x(W*s)xC image per z, uint8 (or uint16 for bits=16), C = 1 or 3
        colour channels (grayscale or not) plus alpha, when given (HxW float), upscaled bicubically on its own.

        On a GPU out-of-memory error the image is started again with tiles of half the size."""
        while True:
            try:
                return self._upscale(lr, zs, alpha, grayscale, bits, on_tile)
            except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one; MPS raises a plain RuntimeError
                if "out of memory" not in str(e):
                    raise
                if self.tile // 2 < MIN_TILE:
                    raise RefsrError(f"out of GPU memory even with {self.tile}-pixel tiles; try --device cpu")
                self.tile //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.warn(f"out of GPU memory; retrying with --tile {self.tile}")

    @torch.inference_mode()
    def _upscale(self, lr, zs, alpha, grayscale, bits, on_tile) -> list:
        h, w = lr.shape[:2]
        s, pad = self.scale, self.tile_pad
        peak = 65535.0 if bits == 16 else 255.0
        channels = (1 if grayscale else 3) + (alpha is not None)
        outputs = [np.empty((h * s, w * s, channels), dtype=np.uint16 if bits == 16 else np.uint8) for _ in zs]
        cells = [self.condition(z, (h, w)) for z in zs]
        lr_t = self._tensor(lr)
        alpha_t = None if alpha is None else self._tensor(alpha[..., None])
        for (y0, y1), (x0, x1) in self.tiles(h, w):
            py0, px0, py1, px1 = max(y0 - pad, 0), max(x0 - pad, 0), min(y1 + pad, h), min(x1 + pad, w)
            keep = (slice(None), slice(None), slice((y0 - py0) * s, (y1 - py0) * s),
                    slice((x0 - px0) * s, (x1 - px0) * s))
            patch = lr_t[..., py0:py1, px0:px1]
            code = self.model.encode_lr(patch)
            extra = None
            if alpha_t is not None:
                extra = F.interpolate(alpha_t[..., py0:py1, px0:px1].float(), scale_factor=s, mode="bicubic",
                                      align_corners=False)[keep].clamp_(0, 1)
            for out, cell, latent in zip(outputs, cells, zs):
                sr = self.model.decode(patch, code, cell, origin=(py0, px0))
                if latent is not None and latent.transfer is not None:
                    sr = latent.transfer.blend(sr, py0, px0)
                sr = back_project(sr, patch, s, self.consistency_steps)[keep].float()
                if grayscale:
                    sr = (sr * self.LUMA.to(sr.device)).sum(1, keepdim=True)
                if extra is not None:
                    sr = torch.cat([sr, extra], 1)
                out[y0 * s:y1 * s, x0 * s:x1 * s] = (
                    sr[0].mul_(peak).round_().permute(1, 2, 0).cpu().numpy().astype(out.dtype))
                if on_tile is not None:
                    on_tile()
        return outputs


# --- the batch behind `refsr upscale` / `refsr sample` -----------------------------------------------------------

class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that the atomic writes clean up as they do for Ctrl-C."""


def on_sigterm(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block is done, then act as they would have: a file that is written is also
    reported, never one without the other. (Handlers, not a signal mask: any of torch's threads may take a signal.)"""
    caught = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


class Reporter:
    """Messages on stderr (a rich progress bar when not quiet), JSON lines on stdout with --json."""

    def __init__(self, quiet: bool, as_json: bool):
        self.quiet, self.as_json = quiet, as_json
        self.progress = None
        if not quiet and not as_json:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True), transient=True)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def _print(self, line: str):
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stderr)

    def say(self, message: str):
        if not self.quiet:
            self._print(message)

    def warn(self, message: str):
        if not self.quiet:
            self._print(f"refsr: warning: {message}")

    def error(self, message: str):
        self._print(f"refsr: error: {message}")

    def wrote(self, record: dict):
        if self.as_json:
            print(json.dumps(record), flush=True)
        else:
            self.say(f"wrote {record['output']}")

    def task(self, description: str, total: int):
        if self.progress is None:
            return None
        task = self.progress.add_task(description, total=total)
        return lambda: self.progress.advance(task)


def pick_device(name: str) -> torch.device:
    """--device: auto picks CUDA, then MPS, then the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RefsrError("--device cuda: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RefsrError("--device mps: MPS is not available")
    if name not in ("auto", "cuda"):
        return torch.device(name)
    if torch.cuda.is_available():
        # One GPU per process under a launcher (torchrun, SLURM): the local rank's.
        local = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID")
        return torch.device("cuda", int(local) % torch.cuda.device_count()) if local else torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def launcher_shard() -> tuple | None:
    """(K, N) when a launcher started N copies of refsr (torchrun's RANK/WORLD_SIZE, SLURM's SLURM_PROCID/
    SLURM_NTASKS), else None."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if os.environ.get(world, "1") != "1" and rank in os.environ:
            return int(os.environ[rank]), int(os.environ[world])
    return None


def load_upscaler(weights, scale, device, half, tile, tile_pad, consistency_steps, warn=None) -> Upscaler:
    device = pick_device(device)
    if half and device.type == "cpu":
        raise RefsrError("--half needs a GPU (CUDA or MPS); float16 on the CPU is slower, not faster")
    path = resolve_weights(weights, scale)
    upscaler = Upscaler(load_checkpoint(path, scale), device, half, tile, tile_pad, consistency_steps, warn)
    upscaler.weights_path = path
    # A checkpoint of `refsr train --stage trunk` has a texture branch at its initial state.
    upscaler.texture_trained = read_metadata(path).get("stage") != "trunk"
    return upscaler


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation: the in-between z of two prior draws keeps a prior draw's length (a straight line
    through the middle would be a z of small norm, a blander image)."""
    cos = torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:
        return a + t * (b - a)
    return ((torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)).to(a.dtype)


def walk_variants(ends, frames: int, from_prior: bool) -> list:
    """`frames` (name suffix, record fields, latent) from the first end to the second: slerp between prior draws, a
    straight line between the means of two references; the texture noise turns from the first end's into the
    second's the same way, so that the grain changes as smoothly as the look."""
    (_, start, first), (_, end, last) = ends
    z0, noise0, z1, noise1 = first.z, first.noise_seed, last.z, last.noise_seed
    if z0 is None or z1 is None:
        raise RefsrError("a walk needs a temperature above 0 between seeds")
    steps = []
    for i in range(frames):
        t = i / max(frames - 1, 1)
        z = slerp(z0, z1, t) if from_prior else z0 + t * (z1 - z0)
        steps.append((f"walk{i:03d}", {"walk": [i, frames], "from": start, "to": end},
                      Latent(z, noise0, noise1 if noise1 != noise0 else None, t)))
    return steps


def write_animation(frames, path) -> None:
    """The written frames, in order, as one looping animated WebP or GIF (10 frames a second)."""
    from .files import atomic_path
    images = [Image.open(f).convert("RGB") for f in frames]
    fmt = path.suffix.lstrip(".").upper()
    with atomic_path(path) as tmp:
        images[0].save(tmp, format=fmt, save_all=True, append_images=images[1:], duration=100, loop=0,
                       **({"lossless": False, "quality": 90} if fmt == "WEBP" else {}))


def confidence_image(transfer: Transfer, scale: int) -> np.ndarray:
    """The --match confidence at the output's size, as an 8-bit grey image (white: the reference's pixels)."""
    confidence = F.interpolate(transfer.confidence[None, None], scale_factor=scale, mode="bilinear",
                               align_corners=False)[0, 0].clamp(0, 1)
    return (confidence * 255).round().byte().numpy()[..., None]


def redo_command(record: dict) -> str:
    """The refsr command that makes the output a provenance record describes (with the same input, reference and
    weights files)."""
    import shlex
    words = ["refsr"]
    if "walk" in record:
        ends = (record["from"], record["to"])
        words += ["walk", record["input"]] + [w for e in ends for w in (["--ref", e["reference"]] if "reference" in e
                                                                        else ["--seed", str(e["seed"])])]
        words += ["--steps", str(record["walk"][1]), "--temperature", f"{record['temperature']:g}"]
    elif "references" in record:
        words += ["upscale", record["input"]] + [w for r in record["references"] for w in ("--ref", r)] + ["--match"]
    elif "reference" in record or "seed" not in record or record["temperature"] == 0:
        words += ["upscale", record["input"]] + (["--ref", record["reference"]] if "reference" in record else [])
        if record["temperature"] > 0:
            words += ["--temperature", f"{record['temperature']:g}", "--seed", str(record.get("seed", 0))]
        elif record.get("seed", 0) != 0:  # the grain of a reference output (or of a T = 0 sample of a non-trunk model)
            words += ["--seed", str(record["seed"])]
    else:
        words += ["sample", record["input"], "--n", "1", "--seed", str(record["seed"]),
                  "--temperature", f"{record['temperature']:g}"]
    words += ["--scale", str(record["scale"])]
    if record["weights"] != "shipped":
        words += ["--weights", record["weights"]]
    for flag, key in (("--tile", "tile"), ("--tile-pad", "tile_pad"), ("--consistency-steps", "consistency_steps")):
        default = getattr(BatchOptions, key)  # only what differs from the flag's default is written
        if record.get(key, default) != default:
            words += [flag, str(record[key])]
    return shlex.join(words)


def sheet_label(fields: dict, temperature: float) -> str:
    """What a contact-sheet tile is, as the flag that redoes it: --seed N, --ref NAME, or T = 0."""
    if "references" in fields:
        return "--match"
    if "reference" in fields:
        return f"--ref {Path(fields['reference']).name}" + (f" --seed {fields['seed']}" if fields.get("seed") else "")
    if "seed" in fields and temperature > 0:
        return f"--seed {fields['seed']}" + (f" T={temperature:g}" if temperature != 1 else "")
    return "T=0 (fidelity)"


def plan_outputs(out: Path, fmt: str | None):
    """(folder, single output file or None, extension) from -o and --format."""
    if out.suffix.lower() in IMAGE_SUFFIXES and not out.is_dir():
        output_format(out)
        return out.parent, out, out.suffix
    return out, None, "." + (fmt or "png")


@dataclass
class BatchOptions:
    """How `refsr upscale` and `refsr sample` were asked to work (their flags)."""
    scale: int = 8
    out: Path = Path(".")
    fmt: str | None = None  # --format: of files written into a folder
    weights: str | None = None
    temperature: float = 0.0
    seed: int = 0  # upscale: the draw at temperature > 0 (sample's seeds come as `seeds`)
    tile: int = 256
    tile_pad: int = 32
    consistency_steps: int = 4
    device: str = "auto"
    half: bool = False
    overwrite: bool = False
    skip_existing: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    quiet: bool = False
    as_json: bool = False
    sheet: bool = False  # one contact sheet per input instead of the images
    shard: tuple | None = None  # (K, N): only the inputs K, K + N, K + 2N, ... of the sorted list (0-based K)
    match: bool = False  # one output per input from all references together, by correspondence (refsr_cli.match)
    match_map: bool = False  # with match: also write the confidence map next to each output
    walk: int | None = None  # frames of a latent walk between the two seeds or the two references
    animate: str | None = None  # with walk: also one animated file of the frames, "webp" or "gif"


def run_batch(inputs, refs, seeds, opt: BatchOptions) -> int:
    """Upscale every input once per reference (refs), or once per seed (seeds), or once (the fidelity output at
    temperature 0, else a prior sample of opt.seed); a temperature above 0 draws around each reference's mean with
    opt.seed. Returns the exit code:
    0 all done, 1 some inputs failed, 2 nothing could start, 130/143 interrupted by SIGINT/SIGTERM."""
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    report = Reporter(opt.quiet, opt.as_json)
    counts = {"written": 0, "skipped": 0, "failed": 0}
    try:
        code = _run_batch(report, counts, inputs, refs, seeds, opt)
    except KeyboardInterrupt:
        report.error("interrupted; finished outputs are kept, none is half-written")
        code = 130
    except Terminated:
        report.error("terminated; finished outputs are kept, none is half-written")
        code = 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    if code != 2 and not opt.as_json:
        report.say("{written} written, {skipped} skipped, {failed} failed".format(**counts))
    return code


def _run_batch(report, counts, inputs, refs, seeds, opt: BatchOptions) -> int:
    scale, out, temperature, max_pixels = opt.scale, opt.out, opt.temperature, opt.max_pixels
    if opt.overwrite and opt.skip_existing:
        report.error("--overwrite and --skip-existing contradict each other")
        return 2
    if opt.match and (not refs or temperature > 0):
        report.error("--match needs at least one --ref, and gives the fidelity output where nothing matches "
                     "(no --temperature)")
        return 2
    lr_paths = []
    for spec in inputs:
        try:
            lr_paths += [p for p in expand_inputs([spec], skip_outputs=True) if p not in lr_paths]
        except RefsrError as e:
            report.error(str(e))
            counts["failed"] += 1
    try:
        folder, single, ext = plan_outputs(out, opt.fmt)
        ref_paths = expand_inputs(refs) if refs else []
        planned = len(lr_paths) * (1 if opt.sheet else len(seeds) if seeds is not None else max(len(ref_paths), 1))
        if single is not None and planned > 1:
            raise RefsrError(f"-o {out} names one file, but this run writes {planned}; give a folder")
        upscaler = load_upscaler(opt.weights, scale, opt.device, opt.half, opt.tile, opt.tile_pad,
                                 opt.consistency_steps, report.warn)
        folder.mkdir(parents=True, exist_ok=True)
    except RefsrError as e:
        report.error(str(e))
        return 2
    except OSError as e:
        report.error(f"{out}: cannot create the output folder ({e.strerror or e})")
        return 2

    input_files = {p.resolve() for p in lr_paths + ref_paths}
    # What every output records of how it was made (`refsr info` prints it and the command that redoes it).
    run_record = {"refsr": software_tag(), "scale": scale, "temperature": temperature,
                  "weights": opt.weights or "shipped", "weights_sha256": sha256_of(upscaler.weights_path),
                  "tile": opt.tile, "tile_pad": opt.tile_pad, "consistency_steps": opt.consistency_steps}
    with report:
        # Each reference is encoded once for the whole batch.
        variants = []  # (name suffix, record fields, latent)
        if seeds is not None:
            variants = [(f"s{seed}", {"seed": seed}, upscaler.prior_z(seed, temperature)) for seed in seeds]
        match_refs, matched_paths = [], []  # --match: the references' HR pixels, matched against each input
        for path, stem in zip(ref_paths, unique_stems(ref_paths)):
            if opt.match:
                try:
                    match_refs.append(prepare_reference(read_rgb(path, max_pixels), scale, str(path)))
                    matched_paths.append(path)
                except RefsrError as e:
                    report.error(f"reference {e}")
                    counts["failed"] += 1
                continue
            try:
                z = upscaler.reference_z(read_rgb(path, max_pixels), temperature, opt.seed)
            except RefsrError as e:
                report.error(f"reference {e}")
                counts["failed"] += 1
                continue
            # Another --seed is another grain (and draw): another name.
            variants.append((f"{stem}_s{opt.seed}" if opt.seed else stem,
                             {"reference": str(path), "reference_sha256": sha256_of(path), "seed": opt.seed}, z))
        if match_refs:
            # One output per input from all the references; its latent is made per input (see below).
            variants.append(("match", {"references": [str(p) for p in matched_paths],
                                       "references_sha256": [sha256_of(p) for p in matched_paths]}, None))
        if ref_paths and not variants:
            report.error("no usable reference")
            return 2
        if opt.walk is not None:
            if len(variants) != 2:
                report.error(f"a walk goes between two seeds or two references, not {len(variants)}")
                return 2
            variants = walk_variants(variants, opt.walk, from_prior=seeds is not None)
        if not upscaler.texture_trained and (any(z is not None for _, _, z in variants) or temperature > 0):
            report.warn("these weights come from the trunk stage, whose texture branch is untrained: every sample "
                        "and reference gives the fidelity output")

        def publish(write, record: dict) -> None:
            """One file written and reported, with SIGINT and SIGTERM held between the two."""
            with signals_held():
                write()
                counts["written"] += 1
                report.wrote(record)

        # Names come from the whole list, so that a sharded run writes exactly the files an unsharded one would.
        named = list(zip(lr_paths, unique_stems(lr_paths)))
        shard = opt.shard or launcher_shard()
        if shard is not None:
            named = named[shard[0]::shard[1]]
        for lr_path, stem in named:
            try:
                picture = read_picture(lr_path, max_pixels)
                input_record = {"input": lr_path.name, "input_sha256": sha256_of(lr_path)}
                for message in picture.warnings:
                    report.warn(message)
                # No reference: the fidelity output (temperature 0), or a prior sample of --seed.
                todo = variants or [(f"s{opt.seed}", {"seed": opt.seed}, upscaler.prior_z(opt.seed, temperature))
                                    if temperature > 0 else ("", {}, Latent(None))]
                if opt.sheet:
                    targets = [single or folder / f"{stem}_x{scale}_sheet{ext}"]
                else:
                    targets = [single or folder / f"{stem}_x{scale}{'_' + suffix if suffix else ''}{ext}"
                               for suffix, _, _ in todo]
                frames = list(targets)  # all of a walk's frames, for its animation
                clash = [t for t in targets if t.resolve() in input_files]
                if clash:
                    raise RefsrError(f"{clash[0]} is an input of this run; refsr never overwrites its inputs")
                exists = [t.exists() for t in targets]
                if opt.skip_existing:
                    if opt.sheet:
                        todo = [] if exists[0] else todo
                    else:
                        todo = [v for v, e in zip(todo, exists) if not e]
                    targets = [t for t, e in zip(targets, exists) if not e]
                    counts["skipped"] += sum(exists)
                elif any(exists) and not opt.overwrite:
                    raise RefsrError(f"{targets[exists.index(True)]} exists (use --overwrite to replace, or "
                                     "--skip-existing)")
                if not todo:
                    continue
                h, w = picture.rgb.shape[:2]
                transfer = None
                if match_refs:
                    report.say(f"{lr_path.name}: matching {len(match_refs)} reference(s)")
                    # On the CPU in float32 whatever the device: matching is done there (refsr_cli.match).
                    transfer = correspond(torch.from_numpy(picture.rgb).permute(2, 0, 1)[None], match_refs, scale)
                    todo = [(sfx, f, Latent(None, transfer=transfer) if z is None else z) for sfx, f, z in todo]
                tick = report.task(lr_path.name, len(upscaler.tiles(h, w)) * len(todo))
                window = sheet_window(picture.rgb, scale) if opt.sheet else None
                crops = []
                # The outputs of one pass are held in memory until written: bound them (sample --n 100 on a photo).
                per_output = h * w * scale * scale * 4 * picture.bits // 8
                chunk = max(1, OUTPUTS_BUDGET // per_output)
                for start in range(0, len(todo), chunk):
                    part = todo[start:start + chunk]
                    images = upscaler.upscale(picture.rgb, [z for _, _, z in part], alpha=picture.alpha,
                                              grayscale=picture.grayscale, bits=picture.bits, on_tile=tick)
                    if opt.sheet:  # only the window of each is kept
                        crops += [image[window].copy() for image in images]
                        continue
                    for (_, fields, _), target, image in zip(part, targets[start:start + chunk], images):
                        publish(lambda: write_picture(image, target, picture.icc_profile,
                                                      run_record | input_record | fields),
                                {"input": str(lr_path), "output": str(target), "scale": scale, **fields})
                    if transfer is not None and opt.match_map:
                        target = targets[0].with_name(f"{targets[0].stem}_map.png")
                        publish(lambda: write_picture(confidence_image(transfer, scale), target, None,
                                                      run_record | input_record),
                                {"input": str(lr_path), "output": str(target), "scale": scale,
                                 "confidence": float(transfer.confidence.mean())})
                if opt.animate and not opt.sheet:
                    animation = folder / f"{stem}_x{scale}_walk.{opt.animate}"
                    publish(lambda: write_animation(frames, animation),
                            {"input": str(lr_path), "output": str(animation), "scale": scale, "frames": len(targets)})
                if opt.sheet:
                    labels = [sheet_label(fields, temperature) for _, fields, _ in todo]
                    publish(lambda: write_picture(np.asarray(contact_sheet(crops, labels)), targets[0]),
                            {"input": str(lr_path), "output": str(targets[0]), "scale": scale, "sheet": labels})
            except RefsrError as e:
                report.error(str(e))
                counts["failed"] += 1
            except OSError as e:
                report.error(f"{lr_path}: cannot write the output ({e.strerror or e})")
                counts["failed"] += 1
            except Exception as e:  # a bug of ours: still one line, and the batch goes on
                report.error(f"{lr_path}: internal error, please report it ({type(e).__name__}: {e})")
                counts["failed"] += 1
    return 1 if counts["failed"] else 0
