"""The options that travel through the engine, the batch and training, with their defaults, written once: the CLI
reads its flags' defaults from here, the engine and the scripts take them from here. Torch-free, so that
`refsr --help` and `refsr info` stay fast."""
import math
import numbers
from dataclasses import dataclass
from pathlib import Path

from .errors import RefsrError

SCALES = (2, 4, 8)  # the upscaling factors refsr has networks for
MAX_FLAG_INT = 10 ** 20 - 1  # the most an integer flag takes: 20 digits (cli.Integer), which a record holds
MAX_SEED = 2 ** 63 - 1  # torch's generators take a 64-bit seed; refsr's seeds are the non-negative int64s
DEVICES = ("auto", "cpu", "cuda", "mps")  # --device: auto picks CUDA, then MPS, then the CPU
MIN_TILE = 16  # --tile: LR pixels; smaller tiles are all context
SAMPLE_TEMPERATURE = 1.0  # the temperature of `sample`, of walks between seeds and of eval's samples (upscale: 0)
SAMPLES = 10  # sample --n
MAX_SAMPLES = 10_000
MAX_MEASURED_SAMPLES = 100  # eval --samples and train --val-samples: samples decoded per image, all held at once
MAX_COPIES = 1_000_000  # --shard K/N and a launcher's world size: more copies than any cluster runs
WALK_FRAMES = 8  # walk --steps: frames, both ends included
MAX_WALK_FRAMES = 1000
MAX_SHEET_TILES = 100  # --sheet: a sheet's tiles are held until it is written: 100 of 256 px are 20 Mpx
OUTPUT_FORMATS = ("png", "jpg", "webp", "tiff")  # --format: the formats that can carry refsr's record (not BMP)
DEFAULT_MAX_PIXELS = 64_000_000  # an LR image this large is already a 4 Gpx output at 8x
TEXTURES = ("analogy", "learned")  # where a sample's or a reference output's detail comes from (BatchOptions.texture)
MAX_STRENGTH = 4.0  # --strength: beyond it the pasted detail is all that is seen
# --consistency-steps: far past where back-projection has converged (4 rounds: 45.5 dB LR-PSNR or more on every
# benchmark output); a million rounds ran for 44 s on a 24-pixel image.
MAX_CONSISTENCY_STEPS = 32
MAX_IMLE_SAMPLES = 32  # --imle-samples: the nearest-sample search decodes at most 32 outputs a pass (train.py)
MAX_TEMPERATURE = 10.0  # --temperature: far past where the texture stops changing (analogy: 4; the learned z: ~3)


def finite(value) -> bool:
    """math.isfinite, and False for a number past any float (10**400: math.isfinite raised OverflowError)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_number(name: str, value, low: float, high: float, integer: bool = False) -> None:
    """A value given through the Python API as its flag would take it: a finite number in [low, high] (a whole one
    for `integer`), else a RefsrError naming it (nan would give a black image, 2^70 an overflow deep inside)."""
    kind = numbers.Integral if integer else numbers.Real  # numpy's numbers too
    if isinstance(value, bool) or not isinstance(value, kind) or not finite(value) or not low <= value <= high:
        top = str(int(high)) if integer and high != math.inf else f"{high:g}"
        bounds = f"{low:g} or more" if high == math.inf else f"from {low:g} to {top}"
        raise RefsrError(f"{name}={value!r}: give {'a whole number' if integer else 'a number'} {bounds}")


def check_scale(scale) -> None:
    """An upscale factor of the Python API, as --scale takes it: one of SCALES ("2" or 2.0 named another file)."""
    check_number("scale", scale, min(SCALES), max(SCALES), integer=True)
    if scale not in SCALES:
        raise RefsrError(f"scale={scale!r}: give one of {', '.join(map(str, SCALES))}")


@dataclass
class EngineOptions:
    """How the inference engine runs a model: tiles, back-projection, device and precision."""
    tile: int = 256  # LR pixels a side of a tile: bounds the network's memory on large images
    tile_pad: int = 32  # LR pixels of context around each tile (the network's reach is about 24)
    consistency_steps: int = 4  # back-projection rounds (4: every benchmark output at 45.5 dB LR-PSNR or more)
    device: str = "auto"
    half: bool = False


@dataclass
class BatchOptions(EngineOptions):
    """`refsr upscale`, `sample` and `walk`: what to write, where, and how."""
    scale: int = 8
    out: Path = Path(".")
    fmt: str | None = None  # --format: of files written into a folder
    weights: str | None = None
    temperature: float = 0.0
    seed: int = 0  # upscale: the draw at temperature > 0, and the grain of reference outputs
    # "analogy": the detail of the reference (or of the shipped texture bank, for samples) matched to the input and
    # pasted onto the faithful output (refsr_cli.analogy); "learned": the network's texture branch, decoded from z.
    texture: str = "analogy"
    # Analogy: how much of the matched detail is pasted (0: the faithful output). 0.5 on val_hr's crops at 8x: samples
    # 0.9 dB above bicubic, diversity 12.2; 1.0 reached diversity 16.0 at 1.2 dB less, under bicubic + 0.5 dB, and a
    # worse LPIPS (docs/notebook.md, "The front").
    strength: float = 0.5
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


@dataclass
class TrainOptions:
    """`refsr train`: what to train on, how long, and the objective's weights."""
    data: list
    out: Path = Path("runs/refsr")
    refs: list | None = None  # gallery references (artworks) for the texture stage's reference path
    # "trunk": the fidelity trunk of every `scales` at once, pixel losses alone; "texture": the texture branch of
    # `scale` on a frozen trunk (IMLE samples, reference outputs).
    stage: str = "texture"
    scale: int = 8
    scales: tuple = SCALES
    steps: int = 2000
    batch: int = 8
    lr_patch: int = 24  # LR crop side: 24 px is a 192-pixel HR crop at x8
    learning_rate: float = 1e-4
    # Learning-rate factor of the zero-initialised parameters that let z and the noise reach the image (noise
    # strengths, noise gates, z modulation): at the base rate they stayed near zero.
    modulation_lr_scale: float = 1.0
    # Pixel terms (both stages): L1 to the HR crop, L1 of the bicubic downscale to the LR crop.
    l1_weight: float = 1.0
    lr_consistency_weight: float = 1.0
    # Texture stage, prior samples by implicit maximum likelihood: imle_samples latents per crop are decoded
    # without gradients, and the one nearest the HR crop (VGG16 feature distance) is trained towards it.
    imle_samples: int = 8
    imle_weight: float = 1.0
    # Texture stage, reference outputs: a share of each batch is decoded from the mean z of a reference (another
    # crop of the same photo, or with `refs` a gallery image for a `ref_mix` share), trained towards the HR crop
    # (content, the feature distance) and the reference's VGG16 feature statistics (style).
    ref_share: float = 0.5
    ref_mix: float = 0.5
    content_weight: float = 1.0
    style_weight: float = 1.0
    # Where the style term takes its statistics: "everywhere" (the whole output against the whole reference), or
    # "textured" (the output where its HR crop has detail, against the reference where it has): with "everywhere",
    # a flat crop asked for a painting's contrast could only draw it on its few edges and its border.
    style_where: str = "everywhere"
    kl_weight: float = 1e-3
    # Texture stage: IMLE trains only the nearest of the m samples, so the others may spread grain where the photo is
    # flat (where the LR leaves no room). This term takes one other sample a crop, and the reference outputs, and
    # penalises their fine detail (the image minus its blur) where the HR crop has none (0: off).
    flat_weight: float = 0.0
    adv_weight: float = 0.0  # a PatchGAN discriminator on the outputs (0: none)
    perceptual_crop: int = 96  # HR pixels a side seen by the feature distance and the discriminator
    pool_size: int = 256  # texture stage: crops held with the frozen trunk's outputs ...
    crop_uses: int = 4  # ... each used by about this many batches
    val: Path | None = None  # HR images measured every val_every steps
    val_every: int = 500
    val_samples: int = 4  # texture stage: prior samples per validation image (mean measures, diversity)
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # start afresh in an --out that holds checkpoints (they are replaced as the run saves)
    # Weights to start from: the texture stage takes one checkpoint (default: the shipped weights of `scale`); the
    # trunk stage one per scale.
    init: list | None = None
    device: str = "auto"
    config: object = None  # a RefVAEConfig for a freshly initialised model (None: the default architecture)


@dataclass
class EvalOptions(EngineOptions):
    """`refsr eval`: which checkpoint is measured on which HR images, and what besides its main rows."""
    hr_dir: Path = Path(".")
    scale: int = BatchOptions.scale
    weights: str | None = None
    temperature: float = BatchOptions.temperature  # the z of the main "refsr" rows
    seed: int = BatchOptions.seed
    samples: int = 0  # prior samples per image (seeds seed, seed + 1, ...): their means and the diversity score
    sample_temperature: float = SAMPLE_TEMPERATURE
    refs: tuple = ()  # references (files, folders, globs): their means and, from two, the influence score
    num_refs: int | None = None  # K of the references, evenly spaced in sorted order (None: all)
    match_protocol: str | None = None  # "warp", "half" or "unrelated": also measure upscale --match
    texture: str = BatchOptions.texture
    strength: float = BatchOptions.strength
    baseline: bool = True  # bicubic rows
    json: Path | None = None  # also write the rows and means there ...
    overwrite: bool = False  # ... replacing a file of that name
