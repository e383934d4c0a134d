"""Texture transfer by correspondence (`upscale --ref similar.jpg --match`): the sharp detail of a content-similar
reference (the same building from another spot, the next frame, a sharp shot of the scene) brought in where the
reference matches the LR image. SRNTT's idea (Zhang et al. 2019) with a classical pipeline: nothing here is trained.

Everything is compared at LR resolution, where the two images look alike: the reference is downscaled exactly as an
LR image is made.
1. Matching: each LR pixel finds the reference pixel whose 5x5 colour patch matches it best, by normalised
   cross-correlation times SSIM's contrast term (a flat patch does not match a textured one). Coarse to fine, as
   MASA-SR does: brute force on a pyramid level small enough, then PatchMatch (propagation from neighbours, random
   search around the current match) on each finer level, so time and memory grow with the image, not with
   image x reference.
2. Alignment: a match at whole-pixel precision pastes detail up to half an LR pixel off, which costs more than it
   gives (measured: -0.9 dB). Two candidate position fields, each refined by Lucas-Kanade steps to a fraction of
   an LR pixel: the matches themselves, averaged with the neighbours that agree (any content, any motion); and one
   affine map fitted by RANSAC to the distinctive matches (a second shot or the next frame, rotated, rescaled or
   shifted a little, for which it is far more precise than any one match).
3. Confidence, per pixel for each candidate, and the higher one kept: SSIM, in windows, between the LR image and
   the reference as aligned (at LR resolution), from 0 at `LOW` to 1 at `HIGH`; times the LR's structure there (a
   flat window matches anything); for the matches' own field, times their coherence (an unrelated reference gives
   each pixel a match of its own, and those scatter). Where nothing matches, the weight is 0 and the output is the
   one without a reference.
4. Transfer: the reference's HR pixels, resampled along the aligned positions and given the LR image's local gain
   and offset, are blended into the network's output by the confidence; the Upscaler's back-projection then gives
   the blend the LR image's low frequencies.

The correspondence is computed once per image over the whole LR (`correspond`); each tile then resamples its part
of the references from it (`Transfer.blend`), so tiles agree with the untiled output.

Memory: every reference's HR pixels are held for the whole batch, so they are held as the 8- or 16-bit integers
they were read from (a quarter or half of float32; `prepare_reference`), and only one reference at a time is turned
back into float32 (`reference_pixels`), to be downscaled for matching or sampled by a tile's blend.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import RefsrError, check_torch_defaults
from .model import downscale
from .options import MAX_SEED, check_number, check_scale

PATCH = 5  # LR pixels per side of a matched patch
BRUTE_PAIRS = 1 << 24  # query x reference pixels compared exhaustively on the coarsest pyramid level
PATCHMATCH_ROUNDS = 4  # propagation + random search rounds per pyramid level
LK_STEPS = 5  # Lucas-Kanade refinement steps at LR resolution
WINDOW_SIGMA = 1.5  # LR pixels: the Gaussian window of the confidence and of the gain and offset
LK_SIGMA = 3.0  # LR pixels: the Gaussian window of the alignment (wide enough to hold corners, not just edges)
LOW, HIGH = 0.5, 0.9  # windowed SSIM of confidence 0 and of confidence 1 (chosen on val_hr)
MAX_REFERENCE_PIXELS = 4096 * 4096  # larger references are downscaled to this many pixels (memory bound)
TEXTURED = 0.02  # LR standard deviation in a window above which a match there counts in full (below: in part)
LK_RIDGE = 1e-5  # keeps flat windows, whose shift is undetermined, where they are
COHERENT_LOW = 0.5  # share of agreeing neighbours below which a local match is not trusted at all
CONTRAST_C = 1e-4  # SSIM's C2 on [0, 1] images, about (0.01)^2: patches flatter than that count as flat
GAIN_RANGE = (0.5, 2.0)  # a reference's local contrast against the LR image's, as far as it is corrected
MAX_POSITION = 1e6  # reference LR pixels: far past any position in a reference of MAX_REFERENCE_PIXELS


def prepare_reference(image: np.ndarray, scale: int, name: str = "reference") -> torch.Tensor:
    """HxWx3 float reference -> (1, 3, H, W) tensor, downscaled to at most MAX_REFERENCE_PIXELS and cropped to a
    multiple of the scale; uint8 or uint16 where the pixels are exactly 8- or 16-bit values (reference_pixels gives
    them back as float32, bit for bit), else float32. `name`: what an error calls it (the file)."""
    from .engine import checked_image  # (the engine imports this module)
    check_scale(scale)
    image = checked_image(image, name)
    h, w = image.shape[:2]
    if h * w > MAX_REFERENCE_PIXELS:
        factor = math.sqrt(MAX_REFERENCE_PIXELS / (h * w))
        pixels = integer_pixels(image)  # without a float temporary as large as the image, when it is 8-bit
        if pixels is None or pixels.dtype != np.uint8:
            pixels = (image * 255).round().astype(np.uint8)
        resized = Image.fromarray(pixels).resize((int(w * factor), int(h * factor)), Image.BICUBIC)
        del pixels  # the full-size 8-bit copy
        image = np.asarray(resized, dtype=np.float32) / 255
        h, w = image.shape[:2]
    if h < PATCH * scale or w < PATCH * scale:
        raise RefsrError(f"{name}: too small to match at x{scale} (at least {PATCH * scale} pixels on each side)")
    crop = image[:h - h % scale, :w - w % scale]
    compact = integer_pixels(crop)
    if compact is None:
        compact = np.ascontiguousarray(crop, dtype=np.float32)
    return torch.from_numpy(compact).permute(2, 0, 1)[None]


# Integer types a reference is held in, and the divisor that gives its float32 values back (as images.py reads them).
PEAKS = ((np.uint8, torch.uint8, 255), (np.uint16, torch.uint16, 65535))


def integer_pixels(image: np.ndarray, rows: int = 256) -> np.ndarray | None:
    """HxWx3 float `image` as the uint8 (else uint16) array whose values divided by 255 (65535) give `image` exactly,
    or None when there is none (a float image). Checked `rows` rows at a time: no temporary as large as the image."""
    for np_type, _, peak in PEAKS:
        out = np.empty(image.shape, np_type)
        for top in range(0, image.shape[0], rows):
            block = image[top:top + rows]
            values = np.rint(block * np.float32(peak))
            if not (values.min() >= 0 and values.max() <= peak and np.array_equal(values / np.float32(peak), block)):
                break
            out[top:top + rows] = values
        else:
            return out
    return None


def reference_pixels(reference: torch.Tensor) -> torch.Tensor:
    """A prepared reference's pixels as float32 in [0, 1], in the same memory layout (the same values, bit for bit,
    as the float image it was prepared from)."""
    for _, torch_type, peak in PEAKS:
        if reference.dtype == torch_type:
            return reference.float().div_(peak)  # in place: one float32 copy, not two
    return reference.float()


def patch_descriptors(image: torch.Tensor, patch: int = PATCH, stride: int = 1, pad: bool = True):
    """(1, C, H, W) -> (N, C*patch^2) patches with each channel's mean removed, scaled to unit length, and the
    patches' standard deviations (N,). With `pad`, one patch centred on each pixel (edges replicated); without, one
    patch at each top-left position `stride` apart that fits inside the image.

    One descriptor for both uses of correspondence: `--match` (5x5 colour patches at LR resolution) and the texture
    analogy (refsr_cli.analogy: 4x4 luminance cells of a fidelity output)."""
    c = image.shape[1]
    if pad:
        image = F.pad(image, (patch // 2,) * 4, mode="replicate")
    patches = F.unfold(image, patch, stride=stride)[0]  # (C*patch^2, N)
    patches = patches.view(c, patch * patch, -1)
    patches = (patches - patches.mean(1, keepdim=True)).flatten(0, 1)
    norm = patches.norm(dim=0)
    return (patches / (norm + 1e-6)).T.contiguous(), norm / patches.shape[0] ** 0.5


def top_matches(q: torch.Tensor, k: torch.Tensor, score, top: int = 1) -> tuple:
    """The `top` best keys of each query by exhaustive search, in chunks of BRUTE_PAIRS query x key pairs:
    `score(rows, k)` gives the (len(rows), len(k)) scores (higher is better) of query rows `rows` of `q`.
    Returns their key indices and scores, (len(q), top) each, best first."""
    index = torch.empty(len(q), top, dtype=torch.int64)
    best = torch.empty(len(q), top)
    chunk = max(1, BRUTE_PAIRS // max(len(k), 1))
    for start in range(0, len(q), chunk):
        rows = slice(start, start + chunk)
        values = score(rows, k)
        if top == 1:
            best[rows, 0], index[rows, 0] = values.max(1)
        else:
            best[rows], index[rows] = values.topk(top, dim=1)
    return index, best


def match_score(q, q_std, k, k_std):
    """Normalised cross-correlation times SSIM's contrast term of descriptor rows `q` and `k` (broadcasting)."""
    contrast = (2 * q_std * k_std + CONTRAST_C) / (q_std ** 2 + k_std ** 2 + CONTRAST_C)
    return (q * k).sum(-1) * contrast


def pyramid(image: torch.Tensor, levels: int) -> list:
    """[image, image/2, image/4, ...]: `levels` levels, finest first."""
    out = [image]
    for _ in range(levels - 1):
        out.append(downscale(out[-1], 2))
    return out


def brute_force(query: torch.Tensor, reference: torch.Tensor) -> tuple:
    """(h, w, 2) integer (y, x) positions in `reference` of each query pixel's best patch, by exhaustive search,
    and their scores (h, w)."""
    q, q_std = patch_descriptors(query)
    k, k_std = patch_descriptors(reference)

    def score(rows, k):  # match_score, with the dot products as one matrix product
        contrast = ((2 * q_std[rows, None] * k_std[None] + CONTRAST_C)
                    / (q_std[rows, None] ** 2 + k_std[None] ** 2 + CONTRAST_C))
        return (q[rows] @ k.T) * contrast

    best, best_score = top_matches(q, k, score)
    best, best_score = best[:, 0], best_score[:, 0]
    width, shape = reference.shape[-1], query.shape[-2:]
    return torch.stack([best // width, best % width], -1).view(*shape, 2), best_score.view(shape)


def patchmatch(query: torch.Tensor, reference: torch.Tensor, start: torch.Tensor, generator) -> tuple:
    """Improve integer positions `start` (h, w, 2) by PATCHMATCH_ROUNDS rounds of PatchMatch (Barnes et al. 2009),
    vectorised: each pixel tries its neighbours' matches shifted by one (and two, four) pixels and random positions
    around its own, and keeps the best. Returns the positions and their scores (h, w)."""
    q, q_std = patch_descriptors(query)
    k, k_std = patch_descriptors(reference)
    height, width = reference.shape[-2:]
    limit = torch.tensor([height - 1, width - 1])
    pos = start.clone()
    flat = lambda p: p[..., 0].flatten() * width + p[..., 1].flatten()
    best = match_score(q, q_std, k[flat(pos)], k_std[flat(pos)])
    for round_ in range(PATCHMATCH_ROUNDS):
        candidates = []
        for jump in (1, 2, 4):
            for dy, dx in ((jump, 0), (-jump, 0), (0, jump), (0, -jump)):
                # The match of the neighbour at (y - dy, x - dx), moved by (dy, dx).
                shifted = torch.roll(pos, (dy, dx), (0, 1)) + torch.tensor([dy, dx])
                candidates.append(shifted)
        radius = max(1, 8 >> round_)
        for r in (radius, max(1, radius // 2)):
            candidates.append(pos + torch.randint(-r, r + 1, pos.shape, generator=generator))
        for cand in candidates:
            cand = torch.minimum(cand.clamp_min(0), limit)
            index = flat(cand)
            score = match_score(q, q_std, k[index], k_std[index])
            better = score > best
            best = torch.where(better, score, best)
            pos = torch.where(better.view(*pos.shape[:2], 1), cand, pos)
    return pos, best.view(pos.shape[:2])


def match_positions(lr: torch.Tensor, ref_lr: torch.Tensor, generator) -> tuple:
    """(h, w, 2) integer positions in `ref_lr` of the best match of each pixel of `lr`, coarse to fine, and the
    matches' scores (h, w)."""
    levels = 1
    # One level more while the next one is still two patches wide and this one is too big for brute force.
    shortest, pairs = min(*lr.shape[-2:], *ref_lr.shape[-2:]), lr[0, 0].numel() * ref_lr[0, 0].numel()
    while shortest >> levels >= 2 * PATCH and pairs >> (4 * (levels - 1)) > BRUTE_PAIRS:
        levels += 1
    queries, references = pyramid(lr, levels), pyramid(ref_lr, levels)
    pos, score = brute_force(queries[-1], references[-1])
    for query, reference in zip(queries[-2::-1], references[-2::-1]):
        h, w = query.shape[-2:]
        # Each coarse match seeds the 2x2 block below it.
        up = pos.repeat_interleave(2, 0).repeat_interleave(2, 1)
        up = F.pad(up.permute(2, 0, 1)[None].float(), (0, max(0, w - up.shape[1]), 0, max(0, h - up.shape[0])),
                   mode="replicate")[0].permute(1, 2, 0).long()[:h, :w]
        parity = pixel_grid(h, w) % 2
        pos, score = patchmatch(query, reference, 2 * up + parity, generator)
    return pos, score


def sample(image: torch.Tensor, pos: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """`image` (1, C, H, W) read at float pixel positions `pos` (h, w, 2) as (y, x): (1, C, h, w)."""
    height, width = image.shape[-2:]
    grid = torch.stack([2 * pos[..., 1] / max(width - 1, 1) - 1, 2 * pos[..., 0] / max(height - 1, 1) - 1], -1)
    return F.grid_sample(image, grid[None].to(image.dtype), mode=mode, padding_mode="border", align_corners=True)


def window(x: torch.Tensor, sigma: float = WINDOW_SIGMA) -> torch.Tensor:
    """Gaussian-weighted local mean (`sigma` LR pixels), separable, each channel on its own."""
    radius = math.ceil(3 * sigma)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype) / sigma) ** 2)
    taps = (taps / taps.sum()).to(x.device)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), taps.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
                 groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), taps.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
                    groups=c)


def pixel_grid(h: int, w: int) -> torch.Tensor:
    """(h, w, 2) int64: each pixel's own (y, x)."""
    return torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)


def gradients(image: torch.Tensor):
    """Central differences (d/dy, d/dx) of (1, C, H, W), edges replicated."""
    pad = F.pad(image, (1, 1, 1, 1), mode="replicate")
    return (pad[..., 2:, 1:-1] - pad[..., :-2, 1:-1]) / 2, (pad[..., 1:-1, 2:] - pad[..., 1:-1, :-2]) / 2


def displacement_neighbourhoods(pos: torch.Tensor, radius: int):
    """Each pixel's displacement (position minus its own), (2, 1, h*w), and those of its (2 radius + 1)^2
    neighbours, (2, (2 radius + 1)^2, h*w)."""
    h, w = pos.shape[:2]
    d = (pos - pixel_grid(h, w)).float().permute(2, 0, 1)[None]  # (1, 2, h, w)
    k = 2 * radius + 1
    return d.view(2, 1, h * w), F.unfold(F.pad(d, (radius,) * 4, mode="replicate"), k).view(2, k * k, h * w)


def smooth_displacements(pos: torch.Tensor, weight: torch.Tensor, radius: int = 3, agree: float = 1.0):
    """Each displacement (position minus the pixel's own) replaced by the average of its (2 radius + 1)^2
    neighbours' that agree with it (within about `agree` pixels), weighted by `weight` (h, w) and a Gaussian of the
    distance. Where the reference moves smoothly (a shift, a small rotation or zoom) the matches' rounding and
    noise average out; neighbours that matched elsewhere take no part, so edges between matched regions stay."""
    h, w = pos.shape[:2]
    k = 2 * radius + 1
    d, around = displacement_neighbourhoods(pos, radius)
    weights = F.unfold(F.pad(weight.clamp_min(0)[None, None].float(), (radius,) * 4, mode="replicate"), k)[0]
    offsets = torch.arange(k, dtype=torch.float32) - radius
    spatial = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (radius ** 2)).flatten()[:, None]
    weights = weights * spatial * torch.exp(-((around - d) ** 2).sum(0) / (2 * agree ** 2))
    d = (around * weights).sum(1) / weights.sum(0).clamp_min(1e-8)
    return pixel_grid(h, w).float() + d.view(2, h, w).permute(1, 2, 0)


def fit_affine(pos: torch.Tensor, score: torch.Tensor, distinct: torch.Tensor, generator, trials: int = 1024):
    """The affine map own position -> reference position that most confident matches follow (RANSAC: 3 random
    matches per trial, inliers within one pixel, then least squares on the best trial's inliers), as an (h, w, 2)
    field; None when under a fifth of the confident matches follow one. A reference that is the same scene seen
    a little rotated, rescaled or shifted (a second shot, the next frame) is such a map: fitted over the whole
    image, it is far more precise than any one match. Only distinctive pixels (`distinct`, (h, w) bool) take
    part: a flat patch matches anywhere, an edge anywhere along itself."""
    h, w = pos.shape[:2]
    own = pixel_grid(h, w).float().view(-1, 2)
    target = pos.float().view(-1, 2)
    confident = (score.flatten() > 0.8) & distinct.flatten()
    if confident.sum() < 16:
        return None
    x, y = own[confident], target[confident]
    ones = torch.ones(len(x), 1)
    design = torch.cat([x, ones], 1)  # (n, 3)
    picks = torch.randint(len(x), (trials, 3), generator=generator)
    maps = torch.linalg.solve_ex(design[picks].double(), y[picks].double())[0].float()  # (trials, 3, 2)
    inliers = ((design @ maps - y).norm(dim=-1) < 1.0)  # (trials, n)
    # Three points close together or on a line fix no map: such trials do not count.
    corners = x[picks]
    e1, e2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    area = (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]).abs() / 2
    best = (inliers.sum(1) * (area > h * w / 200)).argmax()
    keep = inliers[best]
    if keep.sum() < max(16, 0.2 * len(x)):
        return None
    # Normal equations in float64 (torch.linalg.lstsq returned a wrong solution here for tall float32 systems).
    a, b = design[keep].double(), y[keep].double()
    fitted = torch.linalg.solve(a.T @ a, a.T @ b).float()
    return (torch.cat([own, torch.ones(len(own), 1)], 1) @ fitted).view(h, w, 2)


def refine(lr: torch.Tensor, ref_lr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Sub-pixel positions: LK_STEPS Lucas-Kanade steps, each the least-squares shift of a Gaussian window's
    positions that best explains the LR image by the reference's gradients there (colour channels pooled). At most
    half a pixel a step; flat windows, whose shift is undetermined, hardly move (LK_RIDGE); after each step the
    field is averaged with the neighbours that agree, which keeps it from fitting the LR image's aliasing."""
    grad_y, grad_x = gradients(ref_lr)
    # The reference may be brighter, or of another colour balance: a per-channel gain and offset, fitted once, keep
    # that from pulling the positions along the gradients.
    aligned = sample(ref_lr, pos, mode="bicubic")
    gain, offset = global_fit(lr, aligned)
    for i in range(LK_STEPS):
        if i:
            aligned = sample(ref_lr, pos, mode="bicubic")
        residual = lr - (gain * aligned + offset)
        gy, gx = gain * sample(grad_y, pos), gain * sample(grad_x, pos)
        terms = torch.cat([(gy * gy).sum(1, keepdim=True), (gy * gx).sum(1, keepdim=True),
                           (gx * gx).sum(1, keepdim=True), (gy * residual).sum(1, keepdim=True),
                           (gx * residual).sum(1, keepdim=True)], 1)
        a, b, c, u, v = window(terms, LK_SIGMA)[0]
        a, c = a + LK_RIDGE, c + LK_RIDGE
        det = a * c - b * b
        step = torch.stack([(c * u - b * v) / det, (a * v - b * u) / det], -1).clamp(-0.5, 0.5)
        pos = smooth_displacements(pos + step, torch.ones(pos.shape[:2]), agree=0.5)
        pos = torch.stack([pos[..., 0].clamp(0, ref_lr.shape[-2] - 1), pos[..., 1].clamp(0, ref_lr.shape[-1] - 1)], -1)
    return pos


def global_fit(lr: torch.Tensor, aligned: torch.Tensor):
    """Per-channel gain and offset (1, 3, 1, 1) mapping the aligned reference onto the LR image, by least squares
    over the pixels where the two agree best (the better half by absolute difference, after a first fit)."""
    x, y = aligned.flatten(2), lr.flatten(2)
    keep = torch.ones_like(x, dtype=torch.bool)
    for _ in range(2):
        w = keep.float()
        n = w.sum(-1).clamp_min(1)
        mx, my = (x * w).sum(-1) / n, (y * w).sum(-1) / n
        var = (((x - mx[..., None]) ** 2) * w).sum(-1) / n
        cov = ((x - mx[..., None]) * (y - my[..., None]) * w).sum(-1) / n
        gain = (cov / var.clamp_min(1e-6)).clamp(*GAIN_RANGE)
        offset = my - gain * mx
        error = (y - gain[..., None] * x - offset[..., None]).abs()
        keep = error <= error.median(-1, keepdim=True).values
    return gain[..., None, None], offset[..., None, None]


def distinctive(image: torch.Tensor, share: float = 0.3) -> torch.Tensor:
    """(h, w) bool: the `share` of pixels whose neighbourhood is the most distinctive, by the smaller eigenvalue of
    the windowed structure tensor (Shi-Tomasi): corners and texture, which locate a match in both directions, and
    not edges or gradients (a sky's), along which any position fits."""
    gy, gx = gradients(image)
    a, b, c = window(torch.cat([(gy * gy).sum(1, keepdim=True), (gy * gx).sum(1, keepdim=True),
                                (gx * gx).sum(1, keepdim=True)], 1))[0]
    smallest = (a + c) / 2 - (((a - c) / 2) ** 2 + b ** 2).sqrt()
    values = smallest.flatten()
    if values.numel() > 1 << 24:  # torch.quantile's limit: a strided sample of a million
        values = values[::values.numel() // (1 << 20)]
    return smallest >= values.quantile(1 - share)


def coherence(pos: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """(h, w) in [0, 1]: the share of each pixel's neighbours whose displacement agrees with its own within about
    half a pixel. The same content seen again moves as a whole; an unrelated reference gives each pixel a match of
    its own, and those scatter."""
    h, w = pos.shape[:2]
    d, around = displacement_neighbourhoods(pos, radius)
    agree = torch.exp(-((around - d) ** 2).sum(0) / (2 * 0.5 ** 2)).mean(0)
    return ((agree.view(h, w) - COHERENT_LOW) / (1 - COHERENT_LOW)).clamp(0, 1)


def local_fit(lr: torch.Tensor, aligned: torch.Tensor, sigma: float = WINDOW_SIGMA):
    """Windowed SSIM between the LR image and the aligned reference (mean over channels; (1, 1, h, w)), and the
    per-channel gain and offset that map the aligned reference onto the LR image (a local linear fit, as a guided
    filter makes; the gain kept within [0.5, 2])."""
    mu_l, mu_a = window(lr, sigma), window(aligned, sigma)
    var_l = (window(lr * lr, sigma) - mu_l ** 2).clamp_min(0)
    var_a = (window(aligned * aligned, sigma) - mu_a ** 2).clamp_min(0)
    cov = window(lr * aligned, sigma) - mu_l * mu_a
    c1 = (0.01) ** 2
    ssim = ((2 * mu_l * mu_a + c1) * (2 * cov + CONTRAST_C)) / ((mu_l ** 2 + mu_a ** 2 + c1) * (var_l + var_a + CONTRAST_C))
    gain = ((cov + CONTRAST_C / 2) / (var_a + CONTRAST_C / 2)).clamp(*GAIN_RANGE)
    return ssim.mean(1, keepdim=True), gain, mu_l - gain * mu_a


@dataclass
class ReferenceMatch:
    """One reference's part of a transfer: its HR pixels, where each LR pixel lies in it (in reference LR pixels,
    sub-pixel), the local gain and offset, and the confidence (h, w) in [0, 1]."""
    reference: torch.Tensor  # (1, 3, H, W) HR, as prepare_reference holds it (reference_pixels: float32)
    positions: torch.Tensor  # (h, w, 2) float (y, x)
    gain: torch.Tensor  # (1, 3, h, w)
    offset: torch.Tensor  # (1, 3, h, w)
    confidence: torch.Tensor  # (h, w)


@dataclass
class Transfer:
    """The correspondence of one LR image with its references, and how it enters the network's output."""
    matches: list
    scale: int

    def check(self, lr_size: tuple, scale: int) -> None:
        """A Transfer as correspond() makes one for an LR image of `lr_size` (h, w) at `scale`, else a RefsrError:
        checked by Upscaler.upscale, as its fields may be set after it was made (a nan gain: a black image)."""
        h, w = lr_size
        if self.scale != scale or not isinstance(self.matches, list) or not self.matches:
            raise RefsrError(f"transfer: made at x{self.scale} with {type(self.matches).__name__} matches; give "
                             f"correspond()'s Transfer of this lr at x{scale}")
        # Each field's shape and range as correspond() makes it, in float32 as blend() takes it: a position of
        # 3e38, finite, blended a black image.
        shapes = {"positions": (h, w, 2), "gain": (1, 3, h, w), "offset": (1, 3, h, w), "confidence": (h, w)}
        ranges = {"positions": (-MAX_POSITION, MAX_POSITION), "gain": GAIN_RANGE, "offset": (-2, 2),
                  "confidence": (0, 1)}
        for i, m in enumerate(self.matches):
            fields = ({k: getattr(m, k, None) for k in shapes} if isinstance(m, ReferenceMatch) else {})
            if not fields or any(not isinstance(t, torch.Tensor) or tuple(t.shape) != shapes[k] or t.is_meta
                                 or t.layout != torch.strided or not t.is_floating_point()
                                 or not in_range(t.float(), *ranges[k]) for k, t in fields.items()):
                raise RefsrError(f"transfer: match {i} is not one correspond() made for this {w}x{h} lr (positions, "
                                 "gain, offset and confidence of its size, in their ranges)")
            check_pixels(m.reference, f"transfer: match {i}'s reference", (torch.uint8, torch.uint16, torch.float32))

    @property
    def confidence(self) -> torch.Tensor:
        """(h, w): per LR pixel, the most confident reference's confidence (what --match-map writes)."""
        return torch.stack([m.confidence for m in self.matches]).amax(0)

    def blend(self, sr: torch.Tensor, y0: int, x0: int) -> torch.Tensor:
        """`sr` (1, 3, H, W): the network's output for the LR region whose top-left pixel is (y0, x0), blended with
        the references' aligned pixels by their confidences (each reference weighted by its confidence squared where
        several match)."""
        s, device, dtype = self.scale, sr.device, sr.dtype
        sr = sr.float().cpu()
        # LR coordinates of each HR pixel centre of the region, and the fields interpolated there.
        ys = (torch.arange(sr.shape[-2], dtype=torch.float32) + 0.5) / s - 0.5 + y0
        xs = (torch.arange(sr.shape[-1], dtype=torch.float32) + 0.5) / s - 0.5 + x0
        grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1)
        total = torch.zeros_like(sr, dtype=torch.float32)
        weights = torch.zeros_like(sr[:, :1], dtype=torch.float32)
        strongest = torch.zeros_like(weights)
        for m in self.matches:
            fields = torch.cat([m.positions.permute(2, 0, 1)[None], m.gain, m.offset, m.confidence[None, None]], 1)
            at = sample(fields, grid)  # (1, 9, H, W)
            pos_hr = (at[0, :2].permute(1, 2, 0) + 0.5) * s - 0.5
            # One reference's float32 pixels at a time (a 4096² one is 192 MiB); freed once sampled.
            pixels = sample(reference_pixels(m.reference), pos_hr, mode="bicubic")
            pixels = at[:, 2:5] * pixels + at[:, 5:8]
            confidence = at[:, 8:9].clamp(0, 1)
            total += confidence ** 2 * pixels
            weights += confidence ** 2
            strongest = torch.maximum(strongest, confidence)
        aligned = total / weights.clamp_min(1e-8)
        return (sr * (1 - strongest) + aligned * strongest).to(device, dtype)


def in_range(t: torch.Tensor, low: float, high: float) -> bool:
    return bool(torch.isfinite(t).all()) and (t.numel() == 0 or low <= float(t.min()) and float(t.max()) <= high)


def check_pixels(tensor, name: str, dtypes: tuple) -> None:
    """A (1, 3, H, W) image tensor of one of `dtypes`, its float pixels finite and in [0, 1] (a nan pixel in a
    reference or the LR image blended a black output), else a RefsrError naming it."""
    if (not isinstance(tensor, torch.Tensor) or tensor.is_meta or tensor.layout != torch.strided or tensor.ndim != 4
            or tuple(tensor.shape[:2]) != (1, 3) or 0 in tensor.shape or tensor.dtype not in dtypes):
        raise RefsrError(f"{name}: give a (1, 3, H, W) tensor of {' or '.join(str(t) for t in dtypes)}, not "
                         f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}"
                         f"{' ' + str(tensor.dtype) if isinstance(tensor, torch.Tensor) else ''}")
    if tensor.is_floating_point() and not (torch.isfinite(tensor).all() and 0 <= tensor.min() and tensor.max() <= 1):
        raise RefsrError(f"{name}: holds pixels that are not numbers in [0, 1]")


def correspond(lr: torch.Tensor, references: list, scale: int, seed: int = 0) -> Transfer:
    """The Transfer of LR image `lr` (1, 3, h, w) from HR references (each (1, 3, H, W), from prepare_reference)."""
    check_torch_defaults()
    check_scale(scale)
    check_number("seed", seed, 0, MAX_SEED, integer=True)
    check_pixels(lr, "lr", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if not isinstance(references, (list, tuple)) or not references:
        raise RefsrError("references: give a list of one or more prepare_reference tensors")
    for i, reference in enumerate(references):
        check_pixels(reference, f"references[{i}]", (torch.uint8, torch.uint16, torch.float32))
        if min(reference.shape[-2:]) < PATCH * scale:
            raise RefsrError(f"references[{i}]: too small to match at x{scale} (at least {PATCH * scale} pixels on "
                             "each side; prepare_reference checks it)")
        if reference.shape[-2] * reference.shape[-1] > MAX_REFERENCE_PIXELS:  # memory: prepare_reference bounds it
            raise RefsrError(f"references[{i}]: {reference.shape[-1]}x{reference.shape[-2]} is more than "
                             f"{MAX_REFERENCE_PIXELS} pixels; give prepare_reference's tensor")
    generator = torch.Generator().manual_seed(int(seed))
    lr = lr.float().cpu()
    # A flat LR window matches any flat reference window, yet the reference may hold detail there that its
    # downscale hides (grain, fine stripes): only where the LR image has structure is a match evidence.
    spread = (window(lr * lr) - window(lr) ** 2).clamp_min(0).mean(1)[0].sqrt()
    structure = (spread / TEXTURED).clamp(0, 1)
    distinct = distinctive(lr)
    matches = []
    for reference in references:
        ref_lr = downscale(reference_pixels(reference), scale)  # the float32 HR pixels live only for this line
        pos, score = match_positions(lr, ref_lr, generator)
        local = refine(lr, ref_lr, smooth_displacements(pos, score))
        candidates = [(local, coherence(local))]
        affine = fit_affine(pos, score, distinct, generator)
        if affine is not None:
            candidates.append((refine(lr, ref_lr, affine), 1.0))
        # Per pixel, the candidate trusted most.
        trusted = []
        for positions, coherent in candidates:
            aligned = sample(ref_lr, positions, mode="bicubic")
            ssim = local_fit(lr, aligned, LK_SIGMA)[0][0, 0]
            trusted.append(((ssim - LOW) / (HIGH - LOW)).clamp(0, 1) * structure * coherent)
        confidence, choice = torch.stack(trusted).max(0)
        pos = torch.stack([c for c, _ in candidates]).gather(0, choice[None, ..., None].expand(1, *pos.shape))[0]
        _, gain, offset = local_fit(lr, sample(ref_lr, pos, mode="bicubic"))
        matches.append(ReferenceMatch(reference, pos, gain, offset, confidence))
    return Transfer(matches, scale)
