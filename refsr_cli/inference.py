"""Inference: the Upscaler (tiling, LR consistency, one LR encoding for every z) and the batch behind
`refsr upscale` and `refsr sample`."""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import load_checkpoint, resolve_weights
from .errors import RefsrError
from .images import expand_inputs, read_rgb, unique_stems, write_image
from .model import RefVAE, downscale


def back_project(sr, lr, scale: int, steps: int):
    """Iterative back-projection (Irani & Peleg): push the bicubic downscale of `sr` towards `lr`. Clamping to
    [0, 1] at every step (projections onto both constraints, as in POCS) keeps the consistency that the final
    clamp to displayable values would otherwise undo."""
    sr = sr.clamp(0, 1)
    for _ in range(steps):
        sr = sr + F.interpolate(lr - downscale(sr, scale), scale_factor=scale, mode="bicubic", align_corners=False)
        sr = sr.clamp(0, 1)
    return sr


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

    def __init__(self, model: RefVAE, device, half=False, tile=256, tile_pad=24, consistency_steps=10):
        self.device = torch.device(device)
        self.dtype = torch.float16 if half else torch.float32
        self.model = model.to(self.device, self.dtype).eval()
        self.scale = model.config.scale
        self.tile, self.tile_pad, self.consistency_steps = tile, tile_pad, consistency_steps

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(self.device, self.dtype)

    @torch.inference_mode()
    def reference_z(self, image: np.ndarray, temperature: float = 0.0, seed: int = 0) -> torch.Tensor:
        """z from a reference image: mu + temperature * sigma * eps."""
        size = self.model.config.ref_size
        ref = Image.fromarray((image * 255).round().astype(np.uint8)).resize((size, size), Image.BICUBIC)
        mu, logvar = self.model.encode_reference(self._tensor(np.asarray(ref, dtype=np.float32) / 255))
        eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed)).to(mu)
        return mu + temperature * torch.exp(0.5 * logvar) * eps

    def prior_z(self, seed: int, temperature: float = 1.0) -> torch.Tensor:
        """z ~ N(0, temperature^2 I), drawn on the CPU so that a seed gives the same z on every device."""
        eps = torch.randn(1, self.model.config.z_dim, generator=torch.Generator().manual_seed(seed))
        return (temperature * eps).to(self.device, self.dtype)

    def tiles(self, height: int, width: int):
        return [(y, x) for y in tile_spans(height, self.tile) for x in tile_spans(width, self.tile)]

    @torch.inference_mode()
    def upscale(self, lr: np.ndarray, zs, on_tile=None) -> list:
        """lr HxWx3 float in [0, 1]; one HsxWsx3 uint8 image per z. The LR encoding of each tile is computed once
        and decoded for every z."""
        h, w = lr.shape[:2]
        s, pad = self.scale, self.tile_pad
        outputs = [np.empty((h * s, w * s, 3), dtype=np.uint8) for _ in zs]
        cells = [self.model.condition_cell(z) for z in zs]
        lr_t = self._tensor(lr)
        for (y0, y1), (x0, x1) in self.tiles(h, w):
            py0, px0, py1, px1 = max(y0 - pad, 0), max(x0 - pad, 0), min(y1 + pad, h), min(x1 + pad, w)
            patch = lr_t[..., py0:py1, px0:px1]
            code = self.model.encode_lr(patch)
            for out, cell in zip(outputs, cells):
                sr = self.model.decode(patch, code, cell, origin=(py0, px0))
                sr = back_project(sr, patch, s, self.consistency_steps)
                sr = sr[0, :, (y0 - py0) * s:(y1 - py0) * s, (x0 - px0) * s:(x1 - px0) * s]
                out[y0 * s:y1 * s, x0 * s:x1 * s] = (
                    sr.float().clamp_(0, 1).mul_(255).round_().byte().permute(1, 2, 0).cpu().numpy())
                if on_tile is not None:
                    on_tile()
        return outputs


# --- the batch behind `refsr upscale` / `refsr sample` -----------------------------------------------------------

class Reporter:
    """Messages on stderr (a rich progress bar when attached to a terminal), JSON lines on stdout with --json."""

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

    def say(self, message: str):
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            print(message, file=sys.stderr)

    def error(self, message: str):
        if self.progress is not None:
            self.progress.console.print(f"refsr: error: {message}", markup=False, highlight=False, soft_wrap=True)
        else:
            print(f"refsr: error: {message}", file=sys.stderr)

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


def load_upscaler(weights, scale, device, half, tile, tile_pad, consistency_steps) -> Upscaler:
    from .cli import pick_device
    device = pick_device(device)
    if half and device.type == "cpu":
        raise RefsrError("--half needs a GPU (CUDA or MPS); float16 on the CPU is slower, not faster")
    if tile_pad >= tile:
        raise RefsrError(f"--tile-pad ({tile_pad}) must be smaller than --tile ({tile})")
    model = load_checkpoint(resolve_weights(weights, scale), scale)
    return Upscaler(model, device, half, tile, tile_pad, consistency_steps)


def run_batch(inputs, refs, seeds, scale, out, weights, temperature, tile, tile_pad, consistency_steps,
              no_consistency, device, half, overwrite, skip_existing, quiet, as_json) -> int:
    """Upscale every input once per reference (refs), or once per seed (seeds). Returns the exit code:
    0 all done, 1 some inputs failed, 2 nothing could start."""
    scale = int(scale)
    report = Reporter(quiet, as_json)
    if overwrite and skip_existing:
        report.error("--overwrite and --skip-existing contradict each other")
        return 2
    failed = done = skipped = 0
    lr_paths = []
    for spec in inputs:
        try:
            lr_paths += [p for p in expand_inputs([spec]) if p not in lr_paths]
        except RefsrError as e:
            report.error(str(e))
            failed += 1
    try:
        upscaler = load_upscaler(weights, scale, device, half, tile, tile_pad,
                                 0 if no_consistency else consistency_steps)
        ref_paths = expand_inputs(refs) if refs else []
        out.mkdir(parents=True, exist_ok=True)
    except RefsrError as e:
        report.error(str(e))
        return 2
    except OSError as e:
        report.error(f"{out}: cannot create the output folder ({e.strerror})")
        return 2

    with report:
        # Each reference is encoded once for the whole batch.
        variants = []  # (name suffix, record fields, z)
        if seeds is not None:
            variants = [(f"s{seed}", {"seed": seed}, upscaler.prior_z(seed, temperature)) for seed in seeds]
        for path, stem in zip(ref_paths, unique_stems(ref_paths)):
            try:
                z = upscaler.reference_z(read_rgb(path), temperature)
            except RefsrError as e:
                report.error(f"reference {e}")
                failed += 1
                continue
            variants.append((stem, {"reference": str(path)}, z))
        if ref_paths and not variants:
            report.error("no usable reference")
            return 2

        for lr_path, stem in zip(lr_paths, unique_stems(lr_paths)):
            try:
                lr = read_rgb(lr_path)
                todo = variants or [("", {"reference": str(lr_path)}, upscaler.reference_z(lr, temperature))]
                targets = [out / (f"{stem}_x{scale}_{suffix}.png" if suffix else f"{stem}_x{scale}.png")
                           for suffix, _, _ in todo]
                existing = [t for t in targets if t.exists()]
                if existing and skip_existing:
                    todo = [v for v, t in zip(todo, targets) if not t.exists()]
                    targets = [t for t in targets if not t.exists()]
                    skipped += len(existing)
                elif existing and not overwrite:
                    raise RefsrError(f"{existing[0]} exists (use --overwrite to replace or --skip-existing)")
                if not todo:
                    continue
                tick = report.task(lr_path.name, len(upscaler.tiles(*lr.shape[:2])) * len(todo))
                images = upscaler.upscale(lr, [z for _, _, z in todo], on_tile=tick)
                for (_, fields, _), target, image in zip(todo, targets, images):
                    write_image(image, target)
                    done += 1
                    report.wrote({"input": str(lr_path), "output": str(target), "scale": scale, **fields})
            except RefsrError as e:
                report.error(str(e))
                failed += 1
            except OSError as e:
                report.error(f"{lr_path}: cannot write output ({e.strerror or e})")
                failed += 1
    if not as_json:
        report.say(f"{done} written, {skipped} skipped, {failed} failed")
    return 1 if failed else 0
