"""The inference engine: a RefVAE run on images of any size, a tile at a time, the LR image encoded once for every
latent, each output made consistent with its input by back-projection."""
import functools
import math
import numbers
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .analogy import LUMA, TEXTURE_BANK, Matcher, Texture, TexturePlan, load_bank
from .checkpoint import load_weights, not_finite
from .errors import RefsrError, check_torch_defaults, memory_named
from .match import Transfer
from .model import RefVAE, as_built, downscale, model_tensors, noise_tables, resampling_matrix, upsample
from .images import MIN_SIDE
from .options import (DEVICES, MAX_CONSISTENCY_STEPS, MAX_SEED, MAX_TEMPERATURE, MIN_TILE, SAMPLE_TEMPERATURE,
                      BatchOptions, EngineOptions, check_number)
from .report import warning_line


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
    # NCHW: the resampling matrix products are twice as fast on it as on the decoder's channels-last output.
    sr = sr.contiguous().clamp(0, 1)
    lr = lr.contiguous()
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
    goes from 0 to 1."""
    z: torch.Tensor | None
    noise_seed: int = 0
    noise_to: int | None = None
    noise_t: float = 0.0


# Output pixels decoded in one batch: the latents of `sample --n N` go through the texture branch together, as many
# as fit (4 for a 128-pixel LR image at 8x). On the 2-core CPU this saves only 3 % a sample (its convolutions are
# already large); on a GPU, where a 1 Mpx decode leaves the device half idle, batches pay more.
DECODE_PIXELS = 1 << 22
MAX_Z = 1e6  # the largest |z| entry the engine takes: a prior z at the largest temperature is within 1e3


def tile_spans(length: int, tile: int):
    """[start, end) spans of at most `tile` covering 0..length."""
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


def checked_image(image, name: str, channels: int | None = 3) -> np.ndarray:
    """An image as the engine takes one: an HxWx3 (channels None: HxW) float array in [0, 1], as images.read_rgb
    gives, returned as native float32 (the commands check their files; this is the Python API's check). A nan pixel
    would give a black output, and uint8 pixels of 0-255 a white one."""
    shape = getattr(image, "shape", type(image).__name__)
    if not isinstance(image, np.ndarray) or (image.ndim != 2 if channels is None else
                                             image.ndim != 3 or image.shape[2] != channels):
        raise RefsrError(f"{name}: give an {'HxW' if channels is None else 'HxWx3 RGB'} array, not {shape}")
    image = np.asarray(image)  # the data the network gets: a masked array's checks would skip its masked values
    if min(image.shape[:2]) < MIN_SIDE:
        raise RefsrError(f"{name}: {image.shape[1]}x{image.shape[0]} is too small (at least {MIN_SIDE} pixels a side)")
    if image.dtype.kind != "f":
        raise RefsrError(f"{name}: give floats in [0, 1], not {image.dtype} (divide 8-bit pixels by 255)")
    with memory_named(f"{name}: {image.shape[1]}x{image.shape[0]}"):  # its checks' and copy's arrays
        return checked_values(image, name)


def checked_values(image: np.ndarray, name: str) -> np.ndarray:
    """checked_image's pixels: finite, in [0, 1], as a writable native float32 array."""
    if not np.isfinite(image).all():
        raise RefsrError(f"{name}: holds pixels that are not finite numbers (nan or inf)")
    if image.min() < 0 or image.max() > 1:
        raise RefsrError(f"{name}: holds values from {image.min():g} to {image.max():g}; give floats in [0, 1]")
    image = image.astype(np.float32, copy=False)  # big-endian or float64 arrays too: torch takes native float32
    return image if image.flags.writeable else image.copy()  # torch warns of a read-only array it is given


def check_flag(name: str, value) -> None:
    """A yes-or-no argument of the Python API as a bool (numpy's too): "no" is a true string, 1 a number."""
    if not isinstance(value, (bool, np.bool_)):
        raise RefsrError(f"{name}={value!r}: give True or False")


def check_draw(seed, temperature) -> tuple:
    """The seed of a draw as an int and its temperature as a float (numpy's numbers and Fractions too: torch's
    manual_seed takes only Python's ints, and a tensor is not multiplied by a Fraction)."""
    check_number("seed", seed, 0, MAX_SEED, integer=True)
    check_number("temperature", temperature, 0, MAX_TEMPERATURE)
    return int(seed), float(temperature)


def checked_tiling(tile, tile_pad, consistency_steps) -> tuple:
    """The tiles and back-projection as the flags bound them, as Python ints: numpy's small or unsigned ones wrapped
    around in the tiles' arithmetic (y0 - pad)."""
    check_number("tile", tile, MIN_TILE, math.inf, integer=True)
    check_number("tile_pad", tile_pad, 0, math.inf, integer=True)
    check_number("consistency_steps", consistency_steps, 0, MAX_CONSISTENCY_STEPS, integer=True)
    return int(tile), int(tile_pad), int(consistency_steps)


INFERENCE_TENSORS = ("model: its tensors were made under torch.inference_mode (inference tensors, which refsr cannot "
                     "check outside it); build or load it outside inference_mode (load_weights does)")


class Upscaler:
    """Runs a RefVAE on images of any size, a tile at a time.

    Each tile is cut with `tile_pad` LR pixels of context on every side and only its centre is kept. The network's
    receptive field is about 24 LR pixels, so with enough context a tiled result equals the untiled one (up to the
    far tail of the back-projection); no blending is needed, and each finished tile goes straight into the uint8
    output.
    """

    @torch.inference_mode(False)  # (as load_weights: the channels-last copies of a model made in inference_mode)
    def __init__(self, model: RefVAE, device, *, tile: int = EngineOptions.tile, tile_pad: int = EngineOptions.tile_pad,
                 consistency_steps: int = EngineOptions.consistency_steps, half: bool = EngineOptions.half,
                 weights_path=None, weights_sha256=None, texture_trained: bool = True, warn=None):
        check_flag("half", half)
        # A network with a config, as RefVAE is (not isinstance: the speed bench runs the paper's graph through this).
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise RefsrError(f"model: give a RefVAE (checkpoint.load_weights), not {type(model).__name__}")
        if any(t.is_inference() for t in model_tensors(model).values()):
            raise RefsrError(INFERENCE_TENSORS)
        from .device import usable_device
        self.device = usable_device(device)
        if half and self.device.type == "cpu":
            raise RefsrError("half=True needs a GPU (CUDA or MPS); float16 on the CPU is slower, not faster")
        if warn is not None and not callable(warn):
            raise RefsrError(f"warn: give a function of one line, or None, not {type(warn).__name__}")
        self.warn = warn or warning_line
        self.dtype = torch.float16 if half else torch.float32
        # Channels-last: oneDNN's (and cuDNN's) preferred layout; a quarter off the decoder on a 2-core x86 CPU
        # (docs/benchmarks.md).
        self.model = model.to(self.device, self.dtype).to(memory_format=torch.channels_last).eval()
        self.scale = model.config.scale
        self.weights_path = weights_path  # the checkpoint file, when loaded from one (for the outputs' provenance)
        self.weights_sha256 = weights_sha256  # its sha256, as it was read
        self.texture_trained = texture_trained  # checkpoint.texture_trained: whether z and references matter
        self._bank = None  # texture_bank()
        self.tile, self.tile_pad, self.consistency_steps = tile, tile_pad, consistency_steps
        self.check_settings()

    @classmethod
    def from_weights(cls, weights=None, scale: int | None = 8, options: EngineOptions | None = None,
                     warn=None) -> "Upscaler":
        """The engine for `weights` (a .safetensors file, a Hub reference OWNER/REPO[@REV][:FILE], or None: the
        shipped weights of `scale`) on the device and with the tiles, back-projection and precision of `options`:
        what the commands use, and the Python API's way in.

            up = Upscaler.from_weights(scale=8)
            lr = np.asarray(Image.open("photo.png").convert("RGB"), np.float32) / 255
            bank = up.reference_bank(np.asarray(Image.open("painting.jpg").convert("RGB"), np.float32) / 255)
            faithful, painted, sample = up.upscale(lr, [None, Texture(bank, strength=0.5),
                                                        Texture(up.texture_bank(), seed=3, temperature=1.0)])
        """
        from .device import pick_device
        options = options or EngineOptions()
        if not isinstance(options, EngineOptions):
            raise RefsrError(f"options: give an EngineOptions, not {type(options).__name__}")
        check_flag("half", options.half)
        if options.device not in DEVICES:
            raise RefsrError(f"device={options.device!r}: give one of {', '.join(DEVICES)}")
        device = pick_device(options.device)
        if options.half and device.type == "cpu":  # before the weights are loaded (Upscaler() checks it too)
            raise RefsrError("--half needs a GPU (CUDA or MPS); float16 on the CPU is slower, not faster")
        loaded = load_weights(weights, scale)
        return cls(loaded.model, device, tile=options.tile, tile_pad=options.tile_pad,
                   consistency_steps=options.consistency_steps, half=options.half, weights_path=loaded.path,
                   weights_sha256=loaded.sha256, texture_trained=loaded.texture_trained, warn=warn)

    def check_settings(self, finite: bool = True) -> None:
        """The tiles and back-projection as the flags bound them, and the model as made (placed, and with `finite`
        weights), for the Python API: when made, and again before each image (a field may have been set since: a
        negative tile returned an uninitialised buffer, a nan weight a black image); and torch's defaults."""
        check_torch_defaults()
        self.tile, self.tile_pad, self.consistency_steps = checked_tiling(self.tile, self.tile_pad,
                                                                          self.consistency_steps)
        config = getattr(self.model, "config", None)
        tensors = model_tensors(self.model) if isinstance(self.model, torch.nn.Module) else {}
        device = self.device if isinstance(self.device, torch.device) else None
        # Every tensor a plain one where the engine puts its own, in its precision ("cuda" is the weights' "cuda:0",
        # and "cpu:0" their "cpu"); float16 only on a GPU. An int or sparse weight raised deep inside.
        placed = tensors and device is not None and all(
            w.layout == torch.strided and w.dtype == self.dtype and w.device.type == device.type
            and (device.type == "cpu" or device.index in (None, w.device.index)) for w in tensors.values())
        # And the names and shapes its config builds: a submodule swapped for another raised deep inside.
        built = config is not None and as_built(self.model, tensors)
        if (getattr(config, "scale", None) != self.scale or not isinstance(self.scale, numbers.Integral)
                or isinstance(self.scale, bool) or self.dtype not in (torch.float32, torch.float16)
                or not placed or not built or device.type == "cpu" and self.dtype != torch.float32
                or not callable(self.warn)):
            raise RefsrError("Upscaler: its scale, model, device, precision or warn is not as made (changed since, "
                             "or given so); make another (Upscaler.from_weights)")
        if any(t.is_inference() for t in tensors.values()):
            raise RefsrError(INFERENCE_TENSORS)
        bad = not_finite(tensors) if finite else None
        if bad is not None:  # a model handed in, or changed since: a nan weight gave a black image
            raise RefsrError(f"Upscaler: its model's weights are not all finite numbers ({bad} holds nan or inf)")

    def _within_memory(self, what: str, work):
        """work() under the out-of-memory rules. A GPU's: started again with tiles of half the size, which stay for
        the images after it (a record gives the tile it was made with). The computer's (numpy's MemoryError, or
        torch's CPU allocator's RuntimeError): an OutOfMemory naming `what`."""
        while True:
            try:
                with memory_named(what):
                    return work()
            except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one; MPS raises a plain RuntimeError
                if "out of memory" not in str(e):
                    raise
                if self.tile // 2 < MIN_TILE:
                    raise RefsrError(f"{what}: out of GPU memory even with {self.tile}-pixel tiles; try --device "
                                     "cpu") from None
                self.tile //= 2
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.warn(f"out of GPU memory; retrying with --tile {self.tile}")

    def _tensor(self, image: np.ndarray) -> torch.Tensor:
        """HxWxC array -> (1, C, H, W) tensor, channels-last (the HWC memory as it is)."""
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(
            self.device, self.dtype, memory_format=torch.channels_last)

    @torch.inference_mode()
    def reference_z(self, image: np.ndarray, temperature: float = BatchOptions.temperature,
                    seed: int = BatchOptions.seed) -> Latent:
        """z from a reference image, mu + temperature * sigma * eps (eps and the texture noise of `seed`)."""
        image = checked_image(image, "reference")
        seed, temperature = check_draw(seed, temperature)
        self.check_settings()
        size = self.model.config.ref_size
        resized = self._within_memory(f"reference: {image.shape[1]}x{image.shape[0]}", lambda: Image.fromarray(
            (image * 255).round().astype(np.uint8)).resize((size, size), Image.BICUBIC))
        mu, logvar = self.model.encode_reference(self._tensor(np.asarray(resized, dtype=np.float32) / 255))
        eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(seed)).to(mu)
        return Latent(self.finite_output(mu + temperature * torch.exp(0.5 * logvar) * eps, "its reference's z"),
                      seed)

    def finite_output(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        """`tensor`, what the network computed, when it is all finite numbers; else a RefsrError. Finite weights can
        still overflow (3e38 in one layer; float16's 65504 sooner): the nan gave a black image."""
        if not torch.isfinite(tensor).all():
            half = "; try full precision (leave out --half)" if self.dtype == torch.float16 else ""
            raise RefsrError(f"the network's weights overflow in {str(self.dtype).removeprefix('torch.')} "
                             f"arithmetic: {what} is not finite numbers{half}")
        return tensor

    def reference_bank(self, image: np.ndarray, name: str = "reference"):
        """The texture bank of a reference (HxWx3 float): the reference at several scales, each paired with this
        network's fidelity output of its LR (refsr_cli.analogy)."""
        from .analogy import bank_part, check_reference, make_bank, reference_pairs
        image = checked_image(image, name)
        check_reference(image, name)
        self.check_settings()
        return self._within_memory(f"{name}: {image.shape[1]}x{image.shape[0]}", lambda: make_bank(
            [bank_part(sharp, faithful) for sharp, faithful in reference_pairs(image, self.scale, self._faithful,
                                                                                name)], name, scale=self.scale))

    def texture_bank(self):
        """The shipped texture bank of this scale (weights/texture-bank-xS.safetensors), loaded on first use."""
        self.check_settings(finite=False)  # (9 ms of the x8 network's weights: not for each of --n 1000 samples)
        if self._bank is None or self._bank.scale != self.scale:  # (the model may be another scale's since)
            from .checkpoint import weights_dir
            self._bank = load_bank(weights_dir() / TEXTURE_BANK.format(scale=self.scale), self.scale)
        return self._bank

    def prior_z(self, seed: int, temperature: float = SAMPLE_TEMPERATURE) -> Latent:
        """z ~ N(0, temperature^2 I), drawn on the CPU so that a seed gives the same z on every device, and the
        texture noise of the same seed; at temperature 0, the fidelity output."""
        seed, temperature = check_draw(seed, temperature)
        self.check_settings(finite=False)  # (no weight is used to draw z)
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
        return self.model.condition_cell(latent.z.to(self.device, self.dtype), noise)

    def tiles(self, height: int, width: int):
        return [(y, x) for y in tile_spans(height, self.tile) for x in tile_spans(width, self.tile)]

    def upscale(self, lr: np.ndarray, latents, *, transfer: Transfer | None = None, alpha=None, grayscale=False,
                bits=8, on_tile=None) -> list:
        """lr HxWx3 float in [0, 1] -> one (H*s)x(W*s)xC image per latent (None: the fidelity output), uint8 (or
        uint16 for bits=16), C = 1 or 3 colour channels (grayscale or not) plus alpha, when given (HxW float),
        upscaled bicubically on its own. `transfer` (`--match`): content-similar references' pixels blended into
        every output where they match (the decoded ones: None and Latents; a Texture is refused beside it).

        On a GPU out-of-memory error the image is started again with tiles of half the size."""
        lr = checked_image(lr, "lr")
        if alpha is not None:
            alpha = checked_image(alpha, "alpha", channels=None)
            if alpha.shape != lr.shape[:2]:
                raise RefsrError(f"alpha: {alpha.shape} is not the lr's {lr.shape[:2]}")
        from .analogy import Texture
        if not isinstance(latents, (list, tuple)) or not latents:
            raise RefsrError("latents: give a list of one or more (None for the faithful output)")
        for latent in latents:
            if latent is not None and not isinstance(latent, (Latent, Texture)):
                raise RefsrError(f"latents: give None, Latents (prior_z, reference_z) or Textures, not "
                                 f"{type(latent).__name__}")
            if isinstance(latent, Latent):
                self.check_latent(latent)
            ends = [latent, latent.to] if isinstance(latent, Texture) else []
            for end in (end for end in ends if end is not None):  # latent.check() has made sure `to` is a Texture
                end.check()  # again: a field may have been set since it was made
                if end.bank.scale not in (None, self.scale):
                    raise RefsrError(f"Texture: {end.bank.name}'s scale is {end.bank.scale!r}, and this Upscaler's "
                                     f"is {self.scale}; make the bank with this Upscaler")
        if transfer is not None and not isinstance(transfer, Transfer):
            raise RefsrError(f"transfer: give a match.Transfer (correspond) or None, not {type(transfer).__name__}")
        if transfer is not None:
            transfer.check(lr.shape[:2], self.scale)
            if any(isinstance(latent, Texture) for latent in latents):  # (it was silently not applied to them)
                raise RefsrError("transfer: its pixels are blended into decoded outputs (None, Latents), not into a "
                                 "Texture's; upscale them in two calls")
        if on_tile is not None and not callable(on_tile):
            raise RefsrError(f"on_tile: give a function or None, not {type(on_tile).__name__}")
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in (8, 16):
            raise RefsrError(f"bits={bits!r}: give 8 or 16")
        bits = int(bits)  # a numpy integer too: the outputs' dtype is looked up by it
        check_flag("grayscale", grayscale)
        self.check_settings()
        return self._within_memory(f"lr: {lr.shape[1]}x{lr.shape[0]} at x{self.scale}", lambda: self._upscale(
            lr, latents, transfer, alpha, grayscale, bits, on_tile))

    def check_latent(self, latent: Latent) -> None:
        """A Latent as prior_z and reference_z make one, else a RefsrError (a nan z gave a black image)."""
        z = latent.z
        if z is not None:
            # A plain tensor with data: a nested one has no shape to check, a meta one no numbers.
            if isinstance(z, torch.Tensor) and (z.is_nested or z.layout != torch.strided or z.is_meta):
                raise RefsrError("Latent: z must be a plain (strided) tensor with data, not a nested, sparse or "
                                 "meta one")
            if not isinstance(z, torch.Tensor) or not z.is_floating_point() or tuple(z.shape) != (
                    1, self.model.config.z_dim):
                given = f"{tuple(z.shape)} {z.dtype}" if isinstance(z, torch.Tensor) else type(z).__name__
                raise RefsrError(f"Latent: z must be a (1, {self.model.config.z_dim}) float tensor, not {given}")
            # In float32, as the network takes it (a float64 1e300 is an inf there); and bounded, far past any
            # prior or reference z: 1e20 is finite, and overflowed inside the network (a black image).
            z32 = z.float()
            if not torch.isfinite(z32).all() or z32.abs().max() > MAX_Z:
                raise RefsrError(f"Latent: z holds numbers that are not finite or past {MAX_Z:g} in size")
        check_number("noise_seed", latent.noise_seed, 0, MAX_SEED, integer=True)
        if latent.noise_to is not None:
            check_number("noise_to", latent.noise_to, 0, MAX_SEED, integer=True)
        check_number("noise_t", latent.noise_t, 0, 1)

    def faithful(self, lr: np.ndarray) -> torch.Tensor:
        """The fidelity output of `lr` (HxWx3 float), back-projected, as a (1, 3, H*s, W*s) float32 CPU tensor: what
        the texture analogy matches and pastes onto (refsr_cli.analogy)."""
        lr = checked_image(lr, "lr")
        self.check_settings()
        return self._faithful(lr)

    def _faithful(self, lr: np.ndarray) -> torch.Tensor:
        """faithful() of an image already checked, by an Upscaler already checked: a reference's bank takes it for
        each of its scales, and the weights' scan (9 ms at x8) is not made again for each."""
        image = self._within_memory(f"lr: {lr.shape[1]}x{lr.shape[0]} at x{self.scale}", lambda: self._upscale(
            lr, [None], None, None, False, None, None))[0]
        return torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()

    @torch.inference_mode()
    def _upscale(self, lr, latents, transfer, alpha, grayscale, bits, on_tile) -> list:
        network = self.network()
        h, w = lr.shape[:2]
        s = self.scale
        # bits None: float32 values in [0, 1], unquantised (the base textures are pasted onto).
        peak = {None: 1.0, 16: 65535.0}.get(bits, 255.0)
        channels = (1 if grayscale else 3) + (alpha is not None)
        dtype = {None: np.float32, 16: np.uint16}.get(bits, np.uint8)
        outputs = [np.empty((h * s, w * s, channels), dtype=dtype) for _ in latents]
        # Textures by analogy are pasted onto the fidelity output of the whole image, matched once over all of it.
        textured = [i for i, latent in enumerate(latents) if isinstance(latent, Texture)]
        faithful = textures = None
        if textured:
            faithful = self._faithful(lr)  # (the image and this Upscaler are checked: upscale() did)
            textures = TexturePlan(Matcher(faithful), [latents[i] for i in textured])
        # Read once and checked as read, after the fidelity output (an out-of-memory retry there halves the tile
        # for what follows): a field set meanwhile (by another thread, or an on_tile callback) is not taken up
        # half-way (a negative tile returned an unfilled buffer, a negative step count half a projection).
        tile, pad, steps = checked_tiling(self.tile, self.tile_pad, self.consistency_steps)
        place = {i: k for k, i in enumerate(textured)}  # each textured latent's index in `textures`
        decoded = [i for i in range(len(latents)) if i not in place]
        conditions = {i: self.condition(latents[i], (h, w)) for i in decoded}
        lr_t = self._tensor(lr)
        alpha_t = None if alpha is None else self._tensor(alpha[..., None])
        for (y0, y1), (x0, x1) in [(y, x) for y in tile_spans(h, tile) for x in tile_spans(w, tile)]:
            py0, px0, py1, px1 = max(y0 - pad, 0), max(x0 - pad, 0), min(y1 + pad, h), min(x1 + pad, w)
            keep = (slice(None), slice(None), slice((y0 - py0) * s, (y1 - py0) * s),
                    slice((x0 - px0) * s, (x1 - px0) * s))
            patch = lr_t[..., py0:py1, px0:px1]
            code = self.model.encode_lr(patch) if decoded else None
            extra = None
            if alpha_t is not None:
                extra = F.interpolate(alpha_t[..., py0:py1, px0:px1].float(), scale_factor=s, mode="bicubic",
                                      align_corners=False)[keep].clamp_(0, 1)
            group = max(1, DECODE_PIXELS // (patch.shape[-2] * patch.shape[-1] * s * s))
            batches = [decoded[i:i + group] for i in range(0, len(decoded), group)]
            batches += [textured[i:i + group] for i in range(0, len(textured), group)]
            for members in batches:
                self.check_network(network)
                if members[0] in conditions:  # decoded by the network
                    # Checked before the blend and the back-projection, whose clamp makes an overflow's inf a 0 or 1.
                    sr = self.finite_output(self.decode_together(patch, code, [conditions[i] for i in members],
                                                                 (py0, px0)), "its output")
                    if transfer is not None:
                        sr = transfer.blend(sr, py0, px0)
                    sr = back_project(sr, patch, s, steps)
                else:  # textures by analogy
                    sr = self.textured_tile(faithful, textures, [place[i] for i in members], patch,
                                            (py0 * s, py1 * s, px0 * s, px1 * s), steps)
                values = tile_values(sr[keep], grayscale, extra, peak, quantise=bits is not None)
                for i, value in zip(members, values):
                    outputs[i][y0 * s:y1 * s, x0 * s:x1 * s] = value
                    if on_tile is not None:
                        on_tile()
        return outputs

    def network(self) -> tuple:
        """What every helper a tile calls reads of this Upscaler: its network, scale, device and precision."""
        return self.model, self.scale, self.device, self.dtype

    def check_network(self, network: tuple) -> None:
        """One set during a call (an on_tile callback, another thread) is refused, not taken up at the next tile
        (another x2 network's tiles were mixed into the image, exit 0; an x4 one's raised deep inside)."""
        if self.model is not network[0] or self.network()[1:] != network[1:]:
            raise RefsrError("Upscaler: its model, scale, device or precision was set during this call (by an "
                             "on_tile callback, or another thread); set them between calls")

    def textured_tile(self, faithful, textures, indices, patch, region, steps: int):
        """One padded tile (`region` of the output) of textures by analogy: the fidelity output, with each of
        `textures`' textures `indices` pasted on, made consistent with the input in `steps`."""
        base = faithful[..., region[0]:region[1], region[2]:region[3]]
        pasted = [textures.texture(k, *region) for k in indices]
        sr = torch.cat([base + texture for texture in pasted]).to(self.device, self.dtype)
        # Where nothing was pasted (a flat tile, strength 0) the output is the fidelity output as it is, to the bit;
        # elsewhere it is made consistent with the input again.
        moved = [k for k, texture in enumerate(pasted) if texture.any()]
        if moved:
            sr[moved] = back_project(sr[moved], patch, self.scale, steps)
        return sr

    def decode_together(self, patch, code, conditions, origin):
        """The outputs of several latents' conditions on one encoded patch, as one batch: the texture branch runs
        once for all of them (the patch's code is broadcast), the fidelity output is shared by those without one."""
        textured = [c for c in conditions if c is not None]
        if not textured:
            return self.model.decode(patch, code, None).expand(len(conditions), -1, -1, -1).clone()
        cells, styles, noise = zip(*textured)
        together = (torch.cat(cells), None if styles[0] is None else torch.cat(styles),
                    None if noise[0] is None else [torch.cat(stage) for stage in zip(*noise)])
        decoded = self.model.decode(patch, code, together, origin=origin)
        if len(textured) == len(conditions):
            return decoded
        decoded, fidelity = iter(decoded), code[2][0]
        return torch.stack([next(decoded) if c is not None else fidelity for c in conditions])


class Latents:
    """What each output is decoded from, by --texture: a Texture by analogy (refsr_cli.analogy), or a z of the
    learned texture branch (Latent); None is the faithful output. Used alike by the batch and by `refsr eval`."""

    def __init__(self, upscaler: Upscaler, texture: str, strength: float):
        self.upscaler, self.texture, self.strength = upscaler, texture, strength

    def prior(self, seed: int, temperature: float):
        """A sample of `seed` without a reference (at temperature 0: the faithful output)."""
        if self.texture == "learned":
            return self.upscaler.prior_z(seed, temperature)
        return Texture(self.upscaler.texture_bank(), seed, temperature, self.strength) if temperature > 0 else None

    def reference(self, image: np.ndarray, name: str):
        """What a reference gives every output drawn from it: its bank (analogy), or the image (learned)."""
        return image if self.texture == "learned" else self.upscaler.reference_bank(image, name)

    def draw(self, source, seed: int, temperature: float):
        """The output of `seed` from what `reference` gave."""
        if self.texture == "learned":
            return self.upscaler.reference_z(source, temperature, seed)
        return Texture(source, seed, temperature, self.strength)


def tile_values(sr: torch.Tensor, grayscale: bool, extra, peak: float, quantise: bool) -> np.ndarray:
    """A finished tile's outputs (N, 3, h, w) as the numbers of the output arrays (N, h, w, C): grayscale in,
    grayscale out; the alpha (`extra`, upscaled on its own) beside; scaled to `peak`, and rounded when `quantise`."""
    sr = sr.float()
    if not torch.isfinite(sr).all():  # (what was checked before the call holds a nan now: black pixels, exit 0)
        raise RefsrError("an output tile is not finite numbers: a Texture's or Transfer's tensors were set during "
                         "this call (by an on_tile callback, or another thread)")
    if grayscale:
        sr = (sr * LUMA.to(sr)).sum(1, keepdim=True)
    if extra is not None:
        sr = torch.cat([sr, extra.expand(len(sr), -1, -1, -1)], 1)
    values = sr.mul_(peak).round_() if quantise else sr.mul_(peak)
    return values.permute(0, 2, 3, 1).cpu().numpy()


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation: the in-between z of two prior draws keeps a prior draw's length (a straight line
    through the middle would be a z of small norm, a blander image)."""
    cos = F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-4:
        return a + t * (b - a)
    return ((torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)).to(a.dtype)


def walk_latent(first, last, t: float, from_prior: bool):
    """What frame t (0..1) of a walk between two ends (Latents or Textures) decodes. By analogy, the texture turns
    from the first end's into the second's (refsr_cli.analogy.Texture). Learned: slerp between prior draws, a
    straight line between the means of two references; the texture noise turns from the first end's into the
    second's the same way, so that the grain changes as smoothly as the look."""
    check_number("t", t, 0, 1)
    check_flag("from_prior", from_prior)
    if isinstance(first, Texture):
        return Texture(first.bank, first.seed, first.temperature, first.strength, to=last, t=float(t))
    if not all(isinstance(end, Latent) and end.z is not None for end in (first, last)):
        raise RefsrError("walk_latent: give two Textures, or two Latents with a z (prior_z or reference_z at a "
                         "temperature above 0: at 0 there is no z, only the fidelity output)")
    if not all(isinstance(end.z, torch.Tensor) and end.z.is_floating_point() for end in (first, last)) or (
            first.z.shape != last.z.shape):
        raise RefsrError("walk_latent: the ends' z must be float tensors of one shape (as prior_z and reference_z "
                         "make them)")
    t = float(t)
    with torch.no_grad():  # (reference_z's z is an inference tensor: beside one that requires grad, torch refused)
        z = slerp(first.z, last.z, t) if from_prior else first.z + t * (last.z - first.z)
    return Latent(z, first.noise_seed, last.noise_seed if last.noise_seed != first.noise_seed else None, t)
