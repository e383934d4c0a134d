"""`refsr eval`: a checkpoint measured by the protocol of docs/evaluation.md, next to the bicubic baseline.

HR is cropped to a multiple of the scale, LR is its PIL-bicubic downscale; PSNR and SSIM on Y with `scale` pixels of
border shaved, LPIPS (AlexNet, v0.1) on RGB, LR-PSNR of the SR image downscaled the same way.

Besides the one z of the main "refsr" rows, each LR image can be decoded
- for N prior samples: their mean measures, the lowest LR-PSNR among them, and the NTIRE 2021 diversity score;
- for K references: their mean measures, the lowest LR-PSNR, and the reference influence (below).
"""
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .checkpoint import load_backbone, weights_dir
from .engine import Latents, Upscaler
from .errors import RefsrError, engine_errors_named, memory_named, memory_trouble
from .files import sha256_of
from .images import IMAGE_SUFFIXES, MIN_SIDE, expand_inputs, read_rgb, source_images
from .match import correspond, prepare_reference
from .metrics import LPIPSVGG, LPIPSAlex, bicubic_resize, modcrop, psnr, psnr_y, ssim_y, to_float
from .model import VGG16Features
from .options import MAX_SEED, EvalOptions
from .report import reraise_signal

STATS_SIDE = 512  # images are compared by feature statistics at (at most) the size of the reference gallery
STATS_MIN_SIDE = 16  # VGG16's three max-pools before relu4_1 leave 2x2 of this: a standard deviation to take
ALEX_STATS_SIDE = 48  # AlexNet's stride 4 and two 3x3 max-pools of stride 2 leave 2x2 of 47 pixels
LPIPS_MIN_SIDE = 32  # LPIPS's AlexNet (stride 4, then two 3x3 max-pools of stride 2) needs 31 pixels a side


# Published results on the standard benchmarks (PSNR-Y dB / SSIM-Y / LPIPS-alex, bicubic degradation), shown next to
# ours when HR_DIR is one of these sets. RefVAE: Liu et al. 2022, Table 1 (its best row of each column); SRFlow:
# as reported there. SRCNN, VDSR, LapSRN, EDSR: as tabulated in the EDSR and LapSRN papers.
PUBLISHED = {
    ("set5", 8): [("RefVAE (paper)", {"psnr": 25.94, "ssim": 0.72, "lpips": 0.224}),
                  ("SRFlow (paper)", {"psnr": 24.18, "ssim": 0.650, "lpips": 0.237}),
                  ("SRCNN", {"psnr": 25.33}), ("LapSRN", {"psnr": 26.15}), ("EDSR", {"psnr": 26.96})],
    ("set14", 8): [("RefVAE (paper)", {"psnr": 24.28, "ssim": 0.60, "lpips": 0.328}),
                   ("SRCNN", {"psnr": 23.76}), ("LapSRN", {"psnr": 24.35}), ("EDSR", {"psnr": 24.91})],
    ("set5", 4): [("SRCNN", {"psnr": 30.48}), ("VDSR", {"psnr": 31.35}), ("EDSR", {"psnr": 32.46})],
    ("set14", 4): [("SRCNN", {"psnr": 27.49}), ("VDSR", {"psnr": 28.01}), ("EDSR", {"psnr": 28.80})],
    ("set5", 2): [("SRCNN", {"psnr": 36.66}), ("VDSR", {"psnr": 37.53}), ("EDSR", {"psnr": 38.11})],
    ("set14", 2): [("SRCNN", {"psnr": 32.45}), ("VDSR", {"psnr": 33.03}), ("EDSR", {"psnr": 33.92})],
}


def published_rows(hr_dir, scale: int) -> list:
    """The published rows for a folder named like a standard benchmark (Set5, Set14), else none."""
    from pathlib import Path
    return [{"image": "published", "method": method, **values}
            for method, values in PUBLISHED.get((Path(hr_dir).name.lower(), scale), [])]


def as_tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float()


def measure(sr: Image.Image, hr: Image.Image, lr: Image.Image, scale: int, lpips: LPIPSAlex,
            lpips_vgg: LPIPSVGG | None = None) -> dict:
    """The protocol's measures of one output; LPIPS-vgg where `lpips_vgg` is given (training's validation leaves
    it out: on a CPU it costs more than the rest together)."""
    sr_f, hr_f = to_float(sr), to_float(hr)
    with torch.inference_mode():
        values = {"psnr": psnr_y(sr_f, hr_f, scale), "ssim": ssim_y(sr_f, hr_f, scale),
                  "lpips": lpips(as_tensor(sr_f), as_tensor(hr_f)).item()}
        if lpips_vgg is not None:
            values["lpips_vgg"] = lpips_vgg(as_tensor(sr_f), as_tensor(hr_f)).item()
    return values | {"lr_psnr": psnr(to_float(bicubic_resize(sr, lr.size)), to_float(lr))}


@torch.inference_mode()
def diversity_score(samples, hr: Image.Image, lpips: LPIPSAlex) -> float:
    """NTIRE 2021 SR-space diversity: spatial LPIPS maps of the samples against HR; local = mean over pixels of the
    per-pixel minimum over samples, global = minimum over samples of the mean; (global - local) / global * 100."""
    target = as_tensor(to_float(hr))
    maps = torch.cat([lpips(as_tensor(to_float(s)), target, spatial=True) for s in samples])  # (N, 1, H, W)
    local = maps.min(dim=0).values.mean()
    global_ = maps.mean(dim=(1, 2, 3)).min()
    if global_ <= 0:  # a sample is the HR image to LPIPS everywhere (a flat image): no room, and not 0/0 = nan
        return 0.0
    return float((global_ - local) / global_ * 100)


@torch.inference_mode()
def feature_stats(features, image: np.ndarray) -> torch.Tensor:
    """Channel means and standard deviations of the feature maps `features(x)` returns (VGG16 relu1_2 .. relu4_1,
    or LPIPS's AlexNet conv1 .. conv5), with the image resized to at most STATS_SIDE pixels on its long side, and
    one under ALEX_STATS_SIDE pixels on its short side enlarged to it (AlexNet's conv5 is 2x2 there: a standard
    deviation to take)."""
    x = as_tensor(image)
    long_side, short_side = max(x.shape[-2:]), min(x.shape[-2:])
    factor = min(1.0, STATS_SIDE / long_side)
    factor = max(factor, ALEX_STATS_SIDE / short_side)
    if factor != 1:
        size = [max(1, round(n * factor)) for n in x.shape[-2:]]
        x = F.interpolate(x, size=size, mode="bicubic", antialias=factor < 1, align_corners=False).clamp(0, 1)
    return torch.cat([torch.cat([f.mean((2, 3)), f.std((2, 3))], 1) for f in features(x)], 1)[0]


def reference_influence(output_stats, reference_stats) -> float:
    """Does output k look more like reference k than like the others? D[k][j] = L1 distance between the feature
    statistics of output k and of reference j; each column has its mean over k taken off (some references are
    closer to every output); the score is the fraction of rows whose minimum lies on the diagonal (chance 1/K)."""
    d = torch.cdist(torch.stack(output_stats)[None], torch.stack(reference_stats)[None], p=1)[0]
    d = d - d.mean(dim=0, keepdim=True)
    return float((d.argmin(dim=1) == torch.arange(len(d))).float().mean())


def check_hr_folder(hr_dir, paths: list, match_protocol: str | None = None) -> None:
    """Refuse a folder that gives nothing to measure: no images; or, under the "unrelated" protocol (each image's
    reference is the next one), a single image, which would be its own reference."""
    if not paths:
        raise RefsrError(f"{hr_dir}: no images to evaluate ({', '.join(sorted(IMAGE_SUFFIXES))}; refsr's own "
                         "outputs are left out)")
    if match_protocol == "unrelated" and len(paths) < 2:
        raise RefsrError(f"--match-protocol unrelated takes the next image of {hr_dir} as each image's reference: "
                         f"it needs at least two images, and {hr_dir} has one")


def plan_evaluation(opt: EvalOptions) -> "Evaluation":
    """Everything that does not depend on an image, with everything that can be refused refused before the weights
    are loaded and any image measured (RefsrError: nothing could start)."""
    if opt.seed + max(opt.samples - 1, 0) > MAX_SEED:
        raise RefsrError(f"--seed {opt.seed} --samples {opt.samples}: sample i uses seed SEED+i, and seeds go up to "
                         f"{MAX_SEED}")
    paths = source_images(opt.hr_dir)
    check_hr_folder(opt.hr_dir, paths, opt.match_protocol)
    ref_paths = expand_inputs(opt.refs, skip_outputs=True) if opt.refs else []
    named = paths + ref_paths  # every file the user passed in, those --num-refs leaves out too
    if opt.num_refs is not None:
        if opt.num_refs > len(ref_paths):
            raise RefsrError(f"--num-refs {opt.num_refs}: --ref gives {len(ref_paths)} image(s)" if opt.refs
                             else "--num-refs needs --ref")
        ref_paths = [ref_paths[i * len(ref_paths) // opt.num_refs] for i in range(opt.num_refs)]
    if len(ref_paths) >= 2:  # two copies of one image forced the influence to chance, measured as if it were one
        seen = {}
        for path in ref_paths:
            first = seen.setdefault(sha256_of(path), path)
            if first is not path:
                raise RefsrError(f"--ref {first} and --ref {path} are the same image; the reference influence tells "
                                 "references apart: give different ones")
    if opt.json is not None:
        if opt.json.is_dir():
            raise RefsrError(f"--json {opt.json}: is a folder; give a file name")
        if opt.json.exists() and not opt.json.is_file():  # /dev/null, a FIFO: --overwrite would replace the node
            raise RefsrError(f"--json {opt.json}: not a regular file (a device or FIFO); give a file name")
        if weights_dir().resolve() in (opt.json.parent.resolve(), opt.json.resolve().parent):  # there, or a link into it
            raise RefsrError(f"--json {opt.json}: in refsr's own weights folder, which refsr never writes")
        if not opt.json.parent.is_dir() or not os.access(opt.json.parent, os.W_OK):
            raise RefsrError(f"--json {opt.json}: {opt.json.parent} is not a folder that can be written to")
        if opt.json.resolve() in {p.resolve() for p in named}:
            raise RefsrError(f"--json {opt.json} is an input of this run; refsr never overwrites its inputs")
        if opt.json.exists() and not opt.overwrite:
            raise RefsrError(f"--json {opt.json} exists (use --overwrite to replace it)")
    upscaler = Upscaler.from_weights(opt.weights, opt.scale, opt)
    if opt.json is not None and opt.json.resolve() == upscaler.weights_path.resolve():
        raise RefsrError(f"--json {opt.json} is the weights of this run; refsr never overwrites its inputs")
    latents = Latents(upscaler, opt.texture, opt.strength)
    references = []
    for path in ref_paths:
        try:
            with engine_errors_named(path), memory_named(str(path)):  # reading it, its bank or its z
                image = read_rgb(path)
                if len(ref_paths) >= 2 and min(image.shape[:2]) < STATS_MIN_SIDE:
                    raise RefsrError(f"{path}: too small for the reference influence (at least {STATS_MIN_SIDE} "
                                     "pixels on each side)")
                references.append((latents.draw(latents.reference(image, str(path)), opt.seed, 0.0), image))
        except RefsrError as e:
            hint = "; give smaller references" if isinstance(e, MemoryError) else ""
            raise RefsrError(f"reference {e}{hint}") from None
    return Evaluation(opt, paths, ref_paths, upscaler, latents.prior(opt.seed, opt.temperature),
                      [latents.prior(opt.seed + i, opt.sample_temperature) for i in range(opt.samples)], references,
                      lambda image, name: latents.draw(latents.reference(image, name), opt.seed, 0.0))


class Judges:
    """The networks that measure: LPIPS (AlexNet and VGG16), and with two or more references the feature statistics
    of the reference influence, by VGG16 and by AlexNet."""

    def __init__(self, references: list):
        self.lpips, self.lpips_vgg = LPIPSAlex(), LPIPSVGG()
        load_backbone(self.lpips, "lpips_alex")
        load_backbone(self.lpips_vgg, "vgg16_relu4_1", "lpips_vgg_conv4", "lpips_vgg_conv5")
        self.views = {}
        if len(references) >= 2:
            vgg = VGG16Features()
            load_backbone(vgg, "vgg16_relu4_1")
            # Two views of "looks like its reference": VGG16's statistics are what the texture stage's style term
            # matches, so a second network's (AlexNet, which no loss sees) tells whether the look moved or only them.
            self.views = {"influence": lambda x: vgg(x, all_layers=True), "influence_alex": self.lpips.features}
        self.reference_stats = {k: [feature_stats(f, image) for _, image in references] for k, f in self.views.items()}

    def measure(self, sr, hr, lr, scale: int) -> dict:
        return measure(sr, hr, lr, scale, self.lpips, self.lpips_vgg)

    def influence(self, outputs) -> dict:
        return {k: reference_influence([feature_stats(f, to_float(o)) for o in outputs], self.reference_stats[k])
                for k, f in self.views.items()}


def image_error(path, e: Exception) -> str:
    """The line for an image that could not be measured."""
    if memory_trouble(e) is not None:  # numpy's MemoryError, the engine's OutOfMemory, torch's CPU allocator's
        return f"{path}: {memory_trouble(e)}; give smaller images"
    if isinstance(e, RefsrError):
        return str(e)
    reason = (str(e).strip().splitlines() or [""])[0]  # a bug of ours
    return f"{path}: internal error, please report it ({type(e).__name__}: {reason})"


@dataclass
class Evaluation:
    """One `refsr eval` run, planned: rows of {image, method, psnr, ssim, lpips, lpips_vgg, lr_psnr[, diversity |
    influence | confidence]} for each image, their means per method, and the images that could not be measured.

    z: the z of the "refsr" rows; sample_zs: the N zs of the "samples" rows (diversity when N >= 2); references:
    (z, HxWx3 image) pairs of the "references" rows (influence when K >= 2); with a match protocol: "match" rows,
    the `upscale --match` output with the reference of that protocol (protocol_pair), its mean confidence and the
    seconds its matching took, and "protocol reference" rows, `upscale --ref` with that reference (no matching), as
    `reference_latent(image, name)` makes its latent."""
    opt: EvalOptions
    paths: list
    ref_paths: list
    upscaler: Upscaler
    z: object
    sample_zs: list
    references: list
    reference_latent: object

    def run(self, on_image=None, on_error=None) -> dict:
        """Every image measured; an image that fails is in "failed" ({image, error}, the error also passed to
        `on_error` as it happens) and the others are measured all the same."""
        judges = Judges(self.references)
        rows, failed = [], []
        for index, path in enumerate(self.paths):
            error = None
            try:
                rows += self.image_rows(index, judges)
            except Exception as e:  # one line, and the other images are measured
                reraise_signal()
                error = image_error(path, e)
            if error is not None:
                failed.append({"image": path.name, "error": error})
                if on_error is not None:
                    on_error(error)
            if on_image is not None:
                on_image(path.name)
        return {"rows": rows, "means": method_means(rows), "failed": failed}

    def image_rows(self, index: int, judges: Judges) -> list:
        """All the rows of one image (an error: none of them, so that every mean is over the same images)."""
        opt, path, scale = self.opt, self.paths[index], self.opt.scale
        hr, lr, match_ref = protocol_images(self.paths, index, scale, opt.match_protocol)
        lr_array = np.asarray(lr, dtype=np.float32) / 255

        def upscale(zs, transfer=None):
            with engine_errors_named(path):
                return [Image.fromarray(a) for a in self.upscaler.upscale(lr_array, zs, transfer=transfer)]

        rows = []
        if opt.baseline:
            rows.append({"image": path.name, "method": "bicubic",
                         **judges.measure(bicubic_resize(lr, hr.size), hr, lr, scale)})
        rows.append({"image": path.name, "method": "refsr", **judges.measure(upscale([self.z])[0], hr, lr, scale)})
        groups = []
        if self.sample_zs:
            samples = upscale(list(self.sample_zs))
            extra = {"diversity": diversity_score(samples, hr, judges.lpips)} if len(samples) >= 2 else {}
            groups.append(("samples", samples, extra))
        if self.references:
            outputs = upscale([rz for rz, _ in self.references])
            groups.append(("references", outputs, judges.influence(outputs)))
        if opt.match_protocol is not None:
            started = time.perf_counter()
            name = (f"{path}: its reference {self.paths[(index + 1) % len(self.paths)]}"
                    if opt.match_protocol == "unrelated" else f"{path}: its {opt.match_protocol} reference")
            transfer = correspond(as_tensor(lr_array), [prepare_reference(to_float(match_ref), scale, name)], scale)
            extra = {"confidence": float(transfer.confidence.mean()), "seconds": time.perf_counter() - started}
            groups.append(("match", upscale([None], transfer), extra))
            # The same reference as RefVAE takes one (its mean z: the look, not the place): with the photo's other
            # half (protocol half) it should lower LPIPS against T = 0 where no placement could raise PSNR.
            latent = self.reference_latent(to_float(match_ref).astype(np.float32), name)
            groups.append(("protocol reference", upscale([latent]), {}))
        for method, outputs, extra in groups:
            each = [judges.measure(o, hr, lr, scale) for o in outputs]
            mean = {k: float(np.mean([m[k] for m in each])) for k in each[0]}
            mean["lr_psnr"] = min(m["lr_psnr"] for m in each)  # "LR-PSNR of every sample": the worst one
            rows.append({"image": path.name, "method": method, **mean, **extra})
        return rows


def method_means(rows: list) -> dict:
    """The mean of each measure per method (the lowest LR-PSNR, for the methods of several outputs an image)."""
    means = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        means[method] = {k: float(np.mean([r[k] for r in mine])) for k in mine[0] if k not in ("image", "method")}
        if method != "refsr" and method != "bicubic":
            means[method]["lr_psnr"] = min(r["lr_psnr"] for r in mine)
    return means


# --- content-similar references (`--match`): the protocols of docs/evaluation.md ------------------------------------

def protocol_images(paths: list, index: int, scale: int, match_protocol: str | None = None):
    """Image `index` of an HR folder as `refsr eval` measures it: the HR image (8-bit RGB; under a protocol, as
    protocol_pair makes it; cropped to a multiple of `scale`), its PIL-bicubic LR, and the protocol's reference
    (None without a protocol; "unrelated" takes the next image of the folder)."""
    path = paths[index]
    rgb = read_rgb(path)
    # The smallest image every measure takes: an LR of MIN_SIDE pixels, and LPIPS's (under "half": each half).
    need, half = max(MIN_SIDE * scale, LPIPS_MIN_SIDE), match_protocol == "half"
    (h, w), long_need = rgb.shape[:2], 2 * need if half else need
    if min(h, w) < need or max(h, w) < long_need:
        raise RefsrError(f"{path}: {w}x{h} is too small to evaluate at x{scale} (at least {need} pixels on each side"
                         + (f" and {long_need} on the long one, under --match-protocol half)" if half else ")"))
    eight_bit = lambda a: Image.fromarray((a * 255).round().astype(np.uint8))
    hr, reference = eight_bit(rgb), None
    if match_protocol is not None:
        other = None
        if match_protocol == "unrelated":
            if len(paths) < 2:  # the next image would be this one: its own reference
                raise RefsrError(f"{path}: --match-protocol unrelated needs another image in its folder")
            other_path = paths[(index + 1) % len(paths)]
            try:
                other = eight_bit(read_rgb(other_path))
            except RefsrError as e:
                raise RefsrError(f"{path}: its reference {e}") from None
        hr, reference = protocol_pair(hr, match_protocol, index, other)
    hr = modcrop(hr, scale)
    return hr, bicubic_resize(hr, (hr.width // scale, hr.height // scale)), reference


def protocol_pair(hr: Image.Image, protocol: str, seed: int, other: Image.Image | None = None):
    """(HR image to super-resolve, its reference) under a protocol:
    warp: the HR image under a seeded random similarity transform (rotation within +-5 degrees, shift within +-8 %
    of each side, scale 0.9-1.1) and brightness x0.9-1.1 (SRNTT's "HR warp" level);
    half: one half of the photo (along its long side) as the image, the other half as the reference, no pixel shared;
    unrelated: `other`, another photo, as the reference (a reference that does not match must do no harm)."""
    rng = np.random.default_rng(seed)
    if protocol == "warp":
        angle, zoom = np.deg2rad(rng.uniform(-5, 5)), rng.uniform(0.9, 1.1)
        shift = rng.uniform(-0.08, 0.08, 2) * hr.size
        gain = rng.uniform(0.9, 1.1)
        # PIL's AFFINE maps output pixels to input pixels: the inverse of rotate-and-scale about the centre, shifted.
        cx, cy = hr.width / 2, hr.height / 2
        cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
        a, b, d, e = cos, sin, -sin, cos
        c = cx - a * (cx + shift[0]) - b * (cy + shift[1])
        f = cy - d * (cx + shift[0]) - e * (cy + shift[1])
        warped = hr.transform(hr.size, Image.AFFINE, (a, b, c, d, e, f), resample=Image.BICUBIC)
        ref = Image.fromarray(np.clip(np.asarray(warped, dtype=np.float32) * gain, 0, 255).round().astype(np.uint8))
        return hr, ref
    if protocol == "half":
        if hr.width >= hr.height:
            half = hr.width // 2
            return hr.crop((0, 0, half, hr.height)), hr.crop((half, 0, hr.width, hr.height))
        half = hr.height // 2
        return hr.crop((0, 0, hr.width, half)), hr.crop((0, half, hr.width, hr.height))
    return hr, other
