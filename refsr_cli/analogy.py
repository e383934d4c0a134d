"""Texture by analogy (`upscale --ref ANY`, `sample`): the invented detail of an output taken from a reference's
own detail, where the reference's structure is like the input's. Nothing here is trained (DESIGN.md section 10;
Hertzmann et al. 2001, "Image Analogies"; Freeman et al. 2002, example-based super-resolution).

A bank is a pair A : A'. A' is a sharp image (a user's reference, or the CC-licensed photos of the shipped bank);
A is the fidelity network's own output of A''s LR (A' downscaled as an LR image is made). A and the input's
fidelity output B are renderings of the same kind (equally soft, the same network's edges), so their patches
compare like with like, and the residual A' - A at a matched patch is exactly the detail the network could not
know there, in the reference's style.

1. Descriptors (`keys`, `queries`): luminance averaged over 4x4-pixel cells, 4x4 cells a patch (16 output pixels),
   mean removed: the patch's structure and contrast, not its brightness or colour (the input pins those).
   The descriptor of refsr_cli.match, `patch_descriptors`, on cells instead of LR pixels.
2. Search (`Matcher`): every 16-pixel patch of B, 8 pixels apart, finds the bank's patches nearest it, by
   exhaustive search (`match.top_matches`: the search of --match's coarsest level), once per image and bank; each
   output then picks one of each patch's candidates with its seed, the temperature setting how far down the list.
3. Paste (`paste`): the chosen residual patches, weighted by how much room B leaves there (none on flat areas, where
   a face's skin or a sky is; in full on textured ones) and by the strength, are overlap-added under a Hann window,
   whose copies half a patch apart sum to one: no seams at the patch grid. The engine adds this to B and
   back-projects (refsr_cli.engine.back_project), so every output stays consistent with its input.

The search runs once on the whole image (its cost grows with the output's area over 64 and the bank's size); each
tile then pastes its own part, so tiled outputs equal untiled ones.
"""
import math
import numbers
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import RefsrError
from .files import safetensors_name
from .match import patch_descriptors, top_matches
from .options import MAX_SEED, MAX_STRENGTH, MAX_TEMPERATURE, BatchOptions, check_number, finite

CELL = 4  # output pixels a side of a descriptor cell
WINDOW = 4  # cells a side of a patch
PATCH = CELL * WINDOW  # output pixels a side of a pasted patch
STRIDE = PATCH // 2  # between patches: the Hann windows of neighbours sum to one
CANDIDATES = 8  # nearest candidates a seed picks among at temperature 1 (DESIGN.md's probe)
MAX_CANDIDATES = 32  # temperature 4 and above
REFERENCE_SIDE = 512  # a reference's long side in its bank (a reference's scale is arbitrary; this bounds the search)
REFERENCE_SCALES = (1.0, 0.5)  # the reference at several scales: texture at the scale that fits the input
CHROMA = 0.5  # share of a reference's colour residual pasted with its luminance residual (the LR pins colour hardest)
# The largest residual value a bank may hold: A' - A of pixels in [0, 1] lies within [-1, 1]. A hand-made bank's 1e300
# (finite in float64) overflowed into a black image.
MAX_RESIDUAL = 2.0
FLAT, TEXTURED = 0.005, 0.03  # a patch's detail (cell standard deviation less a plane): no pasted texture, all of it
LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # luminance (ITU-R 601): grayscale in, grayscale out


@dataclass
class Bank:
    """Patches to paste: their keys (descriptors of A, augmented so that one matrix product gives the squared
    distance's ranking) and, for each, where its 16-pixel residual patch lies in the flattened residual images."""
    keys: torch.Tensor  # (K, WINDOW^2 + 1): [descriptor, |descriptor|^2]
    starts: torch.Tensor  # (K,) int64: flat index of each patch's top-left pixel in `residual`
    widths: torch.Tensor  # (K,) int64: the row length of the image it lies in
    residual: torch.Tensor  # (3, N): A' - A of every image, flattened and concatenated (float32 or int8)
    step: float  # the residual's value of one unit (1.0 for float32, BANK_STEP for the shipped bank's int8)
    name: str  # what a message calls it (a reference's file, "the texture bank")
    # The upscale factor its patches were made at (their texture's grain is that scale's): an Upscaler of another
    # refuses it. None: made by hand, for any.
    scale: int | None = None


def luminance_cells(image: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) -> (1, 1, H / CELL, W / CELL): luminance averaged over each cell (H, W multiples of CELL)."""
    return F.avg_pool2d((image * LUMA.to(image)).sum(1, keepdim=True), CELL)


def descriptors(cells: torch.Tensor, stride: int) -> torch.Tensor:
    """(N, WINDOW^2) mean-removed patches of WINDOW x WINDOW cells, `stride` cells apart, top-left first."""
    unit, std = patch_descriptors(cells, WINDOW, stride, pad=False)
    return unit * (std * WINDOW)[:, None]  # back to their contrast: the distance compares it too


def residual_of(sharp: torch.Tensor, faithful: torch.Tensor) -> torch.Tensor:
    """A' - A of one pair, (3, H, W): the luminance residual in full, the colour residual at CHROMA."""
    residual = sharp - faithful
    luma = (residual * LUMA).sum(1, keepdim=True)
    return (luma + CHROMA * (residual - luma))[0]


def keyed_part(cells: torch.Tensor, residual: torch.Tensor, stride: int):
    """A bank part from the fidelity output's luminance cells (1, 1, h, w) and the residual (3, h CELL, w CELL): the
    keys of a patch every `stride` cells, their top-left pixels (y, x), and the residual."""
    keys = descriptors(cells, stride)
    rows = (cells.shape[-2] - WINDOW) // stride + 1
    cols = (cells.shape[-1] - WINDOW) // stride + 1
    ys, xs = torch.meshgrid(torch.arange(rows) * stride * CELL, torch.arange(cols) * stride * CELL, indexing="ij")
    return keys, ys.flatten(), xs.flatten(), residual


def bank_part(sharp: torch.Tensor, faithful: torch.Tensor, stride: int = 1):
    """The bank part of one pair A' (`sharp`) : A (`faithful`), (1, 3, H, W) each with H, W multiples of CELL."""
    return keyed_part(luminance_cells(faithful), residual_of(sharp, faithful), stride)


def make_bank(parts, name: str, step: float = 1.0, scale: int | None = None) -> Bank:
    """One Bank from keyed_part results (residuals as float32, or as integers of `step` a unit), of `scale`."""
    keys, starts, widths, residuals, offset = [], [], [], [], 0
    for part_keys, ys, xs, residual in parts:
        width = residual.shape[-1]
        keys.append(part_keys)
        starts.append(offset + ys * width + xs)
        widths.append(torch.full_like(ys, width))
        residuals.append(residual.flatten(1))
        offset += residual[0].numel()
    if not keys:
        raise RefsrError(f"{name}: holds no patch")
    keys = torch.cat(keys)
    residual = torch.cat(residuals, 1)
    return Bank(torch.cat([keys, (keys ** 2).sum(1, keepdim=True)], 1), torch.cat(starts), torch.cat(widths),
                residual, step, name, scale)


def reference_pairs(image: np.ndarray, scale: int, faithful, name: str) -> list:
    """(A', A) pairs of a user's reference at each of REFERENCE_SCALES: the reference resized to at most
    REFERENCE_SIDE on its long side, then by the factor, cropped to a multiple of the scale and of CELL; A from
    `faithful`, which gives the fidelity network's output of an LR image (HxWx3 float -> (1, 3, H*s, W*s))."""
    h, w = image.shape[:2]
    pixels = Image.fromarray((image * 255).round().astype(np.uint8))
    pairs = []
    multiple = scale * CELL // math.gcd(scale, CELL)  # a reference's sides: whole LR pixels and whole cells
    for factor in REFERENCE_SCALES:
        size = factor * min(1.0, REFERENCE_SIDE / max(h, w))
        rh, rw = (int(round(n * size)) // multiple * multiple for n in (h, w))
        if min(rh, rw) < PATCH or min(rh, rw) < multiple:
            if factor == REFERENCE_SCALES[0]:  # too small at full size: no smaller scale can do better
                # A long, thin reference is shrunk to REFERENCE_SIDE on its long side first: say so, or "too
                # small" of a 2000-pixel image reads as a bug.
                shrunk = (f" (its long side brought to {REFERENCE_SIDE}, its short one is {min(rh, rw)})"
                          if max(h, w) > REFERENCE_SIDE else "")
                raise RefsrError(f"{name}: {w}x{h} is too small to give texture at x{scale}{shrunk}: at least "
                                 f"{max(PATCH, multiple)} pixels on each side")
            continue
        resized = pixels.resize((rw, rh), Image.BICUBIC) if (rh, rw) != (h, w) else pixels
        pairs.append(sharp_pair(np.asarray(resized, dtype=np.float32) / 255, scale, faithful))
    return pairs


def sharp_pair(sharp: np.ndarray, scale: int, faithful) -> tuple:
    """(A', A) of a sharp HxWx3 image (sides multiples of the scale and of CELL): A is `faithful` (the fidelity
    network's output of an LR image) of the image downscaled as an LR image is made."""
    from .model import downscale
    a = torch.from_numpy(np.ascontiguousarray(sharp)).permute(2, 0, 1)[None].contiguous()
    return a, faithful(downscale(a, scale).clamp(0, 1)[0].permute(1, 2, 0).numpy())


def check_reference(image: np.ndarray, name: str) -> None:
    """A reference with no detail to give (one colour, or flat to within a grey level) is refused: its outputs
    would be the faithful output under another name."""
    if float(image.std(axis=(0, 1)).max()) < 1 / 255:
        raise RefsrError(f"{name}: a flat, one-colour image gives no texture; use a reference with detail")


# --- the input's side: queries, candidates, the choice of each output, the paste -----------------------------------

def detail(patches: torch.Tensor) -> torch.Tensor:
    """(N,) the standard deviation of each mean-removed WINDOW x WINDOW patch (N, WINDOW^2) of cells, less the part
    a plane (a slope in y and in x) explains."""
    ramp = torch.arange(WINDOW, dtype=torch.float32) - (WINDOW - 1) / 2
    slopes = torch.stack([ramp[:, None].expand(WINDOW, WINDOW).flatten(), ramp[None, :].expand(WINDOW, WINDOW).flatten()])
    slopes = slopes / slopes.norm(dim=1, keepdim=True)  # orthonormal, and orthogonal to a constant
    rest = patches - (patches @ slopes.T) @ slopes
    return rest.norm(dim=1) / WINDOW


class Matcher:
    """The input's patches and their candidates in each bank: built once per image from its fidelity output B
    (1, 3, H, W) float32, then asked for the choice of each output."""

    def __init__(self, faithful: torch.Tensor):
        h, w = faithful.shape[-2:]
        self.size = (h, w)
        self.grid = (math.ceil(h / STRIDE) + 1, math.ceil(w / STRIDE) + 1)  # patch (i, j) has its top-left at
        # (STRIDE i - STRIDE, STRIDE j - STRIDE): half a patch of context beyond each border, edges replicated
        rows, cols = self.grid
        padded = F.pad(faithful, (STRIDE, STRIDE * cols - w, STRIDE, STRIDE * rows - h), mode="replicate")
        cells = luminance_cells(padded)
        self.queries = descriptors(cells, STRIDE // CELL)
        # How much room B leaves for invented detail: none on flat or smoothly shaded areas (skin, sky), all of it on
        # textured ones. The cells' standard deviation once their best plane is taken off: a cheek's shading is a
        # slope, grass and fur are not.
        self.room = ((detail(self.queries) - FLAT) / (TEXTURED - FLAT)).clamp(0, 1)
        self.candidates = {}  # id(bank) -> (index (nq, n), of which bank)

    def candidate_list(self, bank: Bank, count: int) -> torch.Tensor:
        """(nq, count) key indices of each patch's nearest bank patches, best first (searched once per bank)."""
        known = self.candidates.get(id(bank))
        if known is not None and known[0].shape[1] >= count:
            return known[0]
        count = max(count, CANDIDATES)
        live = (self.room > 0).nonzero()[:, 0]  # flat patches take no texture: they need no search
        index = torch.zeros(len(self.queries), min(count, len(bank.keys)), dtype=torch.int64)
        if len(live):
            q = torch.cat([2 * self.queries[live], -torch.ones(len(live), 1)], 1)  # q . [k, |k|^2] = 2 q.k - |k|^2
            index[live] = top_matches(q, bank.keys, lambda rows, k: q[rows] @ k.T, index.shape[1])[0]
        self.candidates[id(bank)] = (index, bank)
        return index

    def choose(self, bank: Bank, seed: int, temperature: float) -> torch.Tensor:
        """(nq,) the key each patch takes for an output of `seed`: at temperature T one of the round(CANDIDATES T)
        nearest (at least the nearest, at most MAX_CANDIDATES), uniformly by a draw of the seed on the CPU: the
        same choice on every device, and for one seed the same draw at every temperature."""
        count = candidate_count(temperature)
        index = self.candidate_list(bank, count)
        count = min(count, index.shape[1])
        draw = torch.rand(len(index), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        rank = (draw * count).long().clamp_max(count - 1)
        return index.gather(1, rank[:, None])[:, 0]


def candidate_count(temperature: float) -> int:
    """How many of each patch's nearest candidates a seed picks among at `temperature`."""
    return min(MAX_CANDIDATES, max(1, round(CANDIDATES * temperature)))


def hann() -> torch.Tensor:
    """(PATCH, PATCH) window whose copies STRIDE apart sum to one: sin^2 over the patch, separable."""
    n = torch.sin(math.pi * (torch.arange(PATCH, dtype=torch.float32) + 0.5) / PATCH) ** 2
    return n[:, None] * n[None, :]


def paste(matcher: Matcher, bank: Bank, choice: torch.Tensor, weight: torch.Tensor, y0: int, y1: int, x0: int,
          x1: int) -> torch.Tensor:
    """The texture of one output over its pixels [y0, y1) x [x0, x1): the chosen residual patches, each times its
    `weight` (nq,), overlap-added under the Hann window. (1, 3, y1 - y0, x1 - x0) float32."""
    rows, cols = matcher.grid
    i0, i1 = y0 // STRIDE, min(rows, -(-y1 // STRIDE) + 1)
    j0, j1 = x0 // STRIDE, min(cols, -(-x1 // STRIDE) + 1)
    keys = choice.view(rows, cols)[i0:i1, j0:j1].flatten()
    scale = weight.view(rows, cols)[i0:i1, j0:j1].flatten()
    offsets = torch.arange(PATCH)
    index = (bank.starts[keys, None, None] + offsets[None, :, None] * bank.widths[keys, None, None]
             + offsets[None, None, :]).view(len(keys), -1)
    patches = bank.residual[:, index].float() * bank.step  # (3, n, PATCH^2)
    patches = patches * (hann().flatten()[None, None] * scale[None, :, None])
    height, width = STRIDE * (i1 - i0) + STRIDE, STRIDE * (j1 - j0) + STRIDE
    folded = F.fold(patches.permute(0, 2, 1).reshape(1, 3 * PATCH * PATCH, -1), (height, width), PATCH,
                    stride=STRIDE)
    top, left = y0 - (STRIDE * i0 - STRIDE), x0 - (STRIDE * j0 - STRIDE)
    return folded[..., top:top + y1 - y0, left:left + x1 - x0]


@dataclass
class Texture:
    """One output's texture by analogy: from `bank`, the choice of `seed` at `temperature`, pasted at `strength`;
    on a walk, it turns into `to`'s texture as `t` goes from 0 to 1 (along a quarter circle: two unrelated
    textures half mixed keep their contrast)."""
    bank: Bank
    seed: int = 0
    temperature: float = 0.0
    strength: float = BatchOptions.strength
    to: "Texture | None" = None
    t: float = 0.0

    def __post_init__(self):
        self.check()

    def check(self):
        """What the flags would refuse, refused here too (the Python API); run again by Upscaler.upscale, as a
        field may be set after the Texture is made. A bank made by hand must hold finite numbers (a nan: black)."""
        if not isinstance(self.bank, Bank):
            raise RefsrError(f"Texture: give a bank (reference_bank, texture_bank), not {type(self.bank).__name__}")
        check_bank(self.bank)
        if self.to is not None and not isinstance(self.to, Texture):
            raise RefsrError(f"Texture: to= takes a Texture, not {type(self.to).__name__}")
        check_number("seed", self.seed, 0, MAX_SEED, integer=True)
        self.seed = int(self.seed)  # numpy's integers too: torch's manual_seed takes only Python's
        check_number("temperature", self.temperature, 0, MAX_TEMPERATURE)
        check_number("strength", self.strength, 0, MAX_STRENGTH)
        check_number("t", self.t, 0, 1)


def check_bank(bank: Bank) -> None:
    """A Bank as make_bank builds one, for a bank made or changed by hand (the Python API): keys of WINDOW^2 + 1
    finite floats, each patch's start and row length inside the residual, and residual values that paste() takes
    to float32 within +-MAX_RESIDUAL a pixel (a float64 1e300, or a step of 1e300, pasted a black image). Else a
    RefsrError; out-of-range patches raised IndexErrors deep inside."""
    keys, starts, widths, residual, step = bank.keys, bank.starts, bank.widths, bank.residual, bank.step
    tensors = (keys, starts, widths, residual)
    if (not all(isinstance(t, torch.Tensor) and not t.is_meta and t.layout == torch.strided for t in tensors)
            or keys.dtype != torch.float32 or keys.ndim != 2 or keys.shape[1] != WINDOW * WINDOW + 1
            or not len(keys) or starts.dtype != torch.int64 or widths.dtype != torch.int64
            or starts.shape != (len(keys),) or widths.shape != (len(keys),)
            or residual.ndim != 2 or residual.shape[0] != 3
            or residual.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8)):
        raise RefsrError(f"Texture: {bank.name} is not a bank as make_bank builds one (keys, starts, widths and a "
                         "(3, N) residual)")
    size = residual.shape[1]
    # Bounded before the sum: int64 starts or widths near 2^63 wrapped around to a small index.
    if (not torch.isfinite(keys).all() or starts.min() < 0 or starts.max() >= size or widths.min() < PATCH
            or widths.max() > size or (starts + (PATCH - 1) * widths + PATCH - 1).max() >= size):
        raise RefsrError(f"Texture: {bank.name}'s keys are not finite, or its patches lie outside its residual")
    if residual.is_floating_point():
        values = residual.float()  # as paste() takes them (a float64 1e39 is an inf there); float32 is not copied
        largest = float(values.abs().max()) if torch.isfinite(values).all() else math.inf
    else:  # the shipped bank's int8: no float copy of it each call
        largest = max(-int(residual.min()), int(residual.max()))
    if (isinstance(step, bool) or not isinstance(step, numbers.Real) or not finite(step) or step <= 0
            or largest * float(step) > MAX_RESIDUAL):
        raise RefsrError(f"Texture: {bank.name}'s residual or step is not finite numbers (within +-{MAX_RESIDUAL:g} "
                         "a pixel)")
    bank.step = float(step)  # numpy's numbers too, as a Python float: paste() multiplies a tensor by it


class TexturePlan:
    """Every Texture of one image resolved against its Matcher: what each tile's paste needs. (Pasting a share of
    the candidates' mean with the seed's pick was tried, and moved samples along the same front of LPIPS against
    diversity as the strength does: docs/notebook.md, "The front".)"""

    def __init__(self, matcher: Matcher, textures):
        self.matcher = matcher
        self.parts = []  # per texture: [(bank, choice, weight), ...] (two on a walk)
        for texture in textures:
            ends = [(texture, 1.0)]
            if texture.to is not None:
                angle = texture.t * math.pi / 2
                ends = [(texture, math.cos(angle)), (texture.to, math.sin(angle))]
            self.parts.append([(end.bank, matcher.choose(end.bank, end.seed, end.temperature),
                                matcher.room * (end.strength * factor)) for end, factor in ends])

    def texture(self, k: int, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
        """Texture k over output pixels [y0, y1) x [x0, x1)."""
        return sum(paste(self.matcher, bank, choice, weight, y0, y1, x0, x1)
                   for bank, choice, weight in self.parts[k])


# --- the shipped bank: natural-photo texture for `sample` -----------------------------------------------------------

TEXTURE_BANK = "texture-bank-x{scale}.safetensors"  # the shipped bank of each scale, in weights/
# (scripts/make_texture_bank.py)
BANK_STEP = 1 / 254  # the shipped residual's int8 unit: residuals within +-0.5, to half a grey level
BANK_STRIDE = 2  # cells between the shipped bank's patches (8 pixels: half a patch)


def bank_tensors(pairs, scale: int) -> dict:
    """What the shipped bank file holds for one scale: per image, its fidelity output's luminance cells (float32,
    the keys are computed from them on loading) and its residual (int8, BANK_STEP a unit)."""
    tensors = {}
    for i, (sharp, faithful) in enumerate(pairs):
        residual = residual_of(sharp, faithful)
        tensors[f"x{scale}.{i}.cells"] = luminance_cells(faithful)[0, 0].contiguous()
        tensors[f"x{scale}.{i}.residual"] = (residual / BANK_STEP).round().clamp(-127, 127).to(torch.int8).contiguous()
    return tensors


def load_bank(path, scale: int) -> Bank:
    """The shipped bank's patches of `scale` from its safetensors file; RefsrError (naming the file) when the file
    is missing, damaged, or holds no usable part of that scale."""
    from safetensors import SafetensorError, safe_open
    name = f"texture bank {path}"
    parts = []
    if os.path.exists(path) and not os.path.isfile(path):  # a FIFO: safetensors' open would wait for ever
        raise RefsrError(f"{name}: not a regular file (reinstall refsr)")
    try:
        with safe_open(safetensors_name(path), "pt") as f:
            names = {k.rsplit(".", 1)[0] for k in f.keys() if k.startswith(f"x{scale}.")}
            odd = sorted(k for k in names if not re.fullmatch(rf"x{scale}\.[0-9]{{1,6}}", k))
            if odd:  # (x2.cells: no part index, which the sort below read as an IndexError)
                raise RefsrError(f"{name}: damaged ({odd[0]} is not a bank part)")
            for prefix in sorted(names, key=lambda k: int(k.split(".")[1])):
                cells, residual = f.get_tensor(f"{prefix}.cells"), f.get_tensor(f"{prefix}.residual")
                ok = (cells.dtype == torch.float32 and residual.dtype == torch.int8 and cells.dim() == 2
                      and residual.dim() == 3 and residual.shape[0] == 3
                      and tuple(residual.shape[1:]) == (cells.shape[0] * CELL, cells.shape[1] * CELL)
                      and min(cells.shape) >= WINDOW and bool(torch.isfinite(cells).all()))
                if not ok:
                    raise RefsrError(f"{name}: damaged ({prefix} is not a bank part)")
                parts.append(keyed_part(cells[None, None], residual, BANK_STRIDE))
    except FileNotFoundError:
        raise RefsrError(f"{name}: missing (reinstall refsr)") from None
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise RefsrError(f"{name}: damaged ({(str(e).splitlines() or [''])[0]})") from None
    if not parts:
        raise RefsrError(f"{name}: holds no texture for x{scale}")
    return make_bank(parts, "the texture bank", BANK_STEP, scale)