"""The `refsr` command. Only click is imported at the top: `refsr --help` must not pay for importing torch."""
import errno
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

import click

from .errors import shown
from .options import (DEVICES, MAX_CONSISTENCY_STEPS, MAX_COPIES, MAX_IMLE_SAMPLES, MAX_MEASURED_SAMPLES,
                      MAX_SAMPLES, MAX_SEED, MAX_STRENGTH, MAX_TEMPERATURE, MAX_WALK_FRAMES, MIN_TILE, OUTPUT_FORMATS,
                      SAMPLE_TEMPERATURE, SAMPLES, SCALES, TEXTURES, WALK_FRAMES, BatchOptions, EngineOptions,
                      EvalOptions, TrainOptions)

SCALE_CHOICE = click.Choice([str(s) for s in SCALES])
# A number as a command line writes one: ASCII digits. int() and float() also read other scripts' digits ("٣") and
# underscores ("1_000"), which no one types by intent and which would be recorded as something else.
ASCII_INTEGER = re.compile(r"[+-]?[0-9]+")
ASCII_FLOAT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(nan|inf|infinity)", re.IGNORECASE)


class Integer(click.IntRange):
    """click's IntRange, of ASCII digits only, and of at most 20 of them (a seed's 2^64 has 20): a number past any
    use, which a record would hold and `info` refuse (provenance.record_int)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not ASCII_INTEGER.fullmatch(value.strip()):
            self.fail(f"'{shown(value)}' is not a whole number (digits 0-9)", param, ctx)
        if isinstance(value, str) and len(value.strip().lstrip("+-")) > 20:
            self.fail(f"'{shown(value)}' has more than 20 digits", param, ctx)
        return super().convert(value, param, ctx)


SEEDS = Integer(0, MAX_SEED)


class Finite(click.ParamType):
    """A float in [low, high] ((low, high] with `low_open`): nan, inf, and numbers past the bounds (1e308 as a
    temperature) are bad input, refused in one line before anything runs."""
    name = "float"

    def __init__(self, low: float, high: float, low_open: bool = False):
        self.low, self.high, self.low_open = low, high, low_open

    def convert(self, value, param, ctx):
        try:
            if isinstance(value, str) and not ASCII_FLOAT.fullmatch(value.strip()):
                raise ValueError(value)
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"'{shown(str(value))}' is not a number", param, ctx)
        below = number <= self.low if self.low_open else number < self.low
        if not math.isfinite(number) or below or number > self.high:
            bounds = f"{self.low:g}{'<' if self.low_open else '<='}x<={self.high:g}"
            self.fail(f"{shown(str(value))} is not in the range {bounds}", param, ctx)
        return number + 0.0  # -0.0 is 0 (and is recorded as 0)


class NamedPath(click.Path):
    """A file or folder argument that is not "": Path("") is the current folder, and `--out ''` trained there."""

    def __init__(self, **kwargs):
        super().__init__(path_type=Path, **kwargs)

    def convert(self, value, param, ctx):
        if str(value) == "":
            self.fail("'': an empty name, not a file or folder", param, ctx)
        return super().convert(value, param, ctx)


class OutPath(click.Path):
    """-o (a folder or a file) and --json (a file). Not "-" (refsr writes no files to stdout) nor "" (which Path
    reads as the current folder); and not a name that ends in "/" (a folder, to the shell and to the user) where refsr
    would write a file: Path drops the "/", and `-o result.png/` wrote the file result.png."""

    def __init__(self, file_only: bool = False):
        super().__init__(path_type=Path)
        self.file_only = file_only

    def convert(self, value, param, ctx):
        if str(value) in ("-", ""):
            self.fail(f"{str(value)!r}: give a file name (refsr does not write its files to stdout)", param, ctx)
        path = super().convert(value, param, ctx)
        if str(value).endswith(("/", os.sep)) and not path.is_dir():
            from .images import IMAGE_SUFFIXES
            if self.file_only:
                self.fail(f"{str(value)!r} names a folder; give the file's name", param, ctx)
            if path.suffix.lower() in IMAGE_SUFFIXES:
                self.fail(f"{str(value)!r}: a folder named like an image file; create it first to write into it, "
                          "or drop the '/' to write that file", param, ctx)
        return path


class Commands(click.Group):
    """refsr's command group: a usage error (a bad flag or value) is one line and exit 2, as every other error;
    standard output that cannot be written (`| head`, a full disk) ends the run without a traceback."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from .report import (SIGNAL_EXITS, SIGNALLED, Interrupted, StdoutClosed, Terminated, error_line, on_sigint,
                             on_sigterm, stdout_lost, to_stderr)
        # SIGTERM as Ctrl-C, from the first line of every command: the atomic writes clean up, and a signal that
        # comes before a command's own handling (while it imports) is still one line. Both are noted (SIGNALLED), for
        # an error that C code made of them. A SIGINT that is ignored (a job started in the background) stays so.
        SIGNALLED.clear()
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_sigterm)}
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, on_sigint)
        try:
            try:
                return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            finally:
                for number, handler in previous.items():
                    signal.signal(number, handler)
                if sys.stdout is not None:
                    sys.stdout.flush()  # here, not at the interpreter's exit, where a failure is a traceback
        except NO_ARGS_IS_HELP as e:  # `refsr` alone: the help, as it is laid out, not folded into an error line
            to_stderr(e.ctx.get_help())
            sys.exit(2)
        except click.UsageError as e:
            error_line(" ".join(e.format_message().split()))
            sys.exit(2)
        except (click.Abort, Interrupted, Terminated) as e:
            line, code = SIGNAL_EXITS[signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT]
            error_line(line)
            sys.exit(code)
        except StdoutClosed as e:
            sys.exit(stdout_lost(e.error))
        except Exception as e:  # the last resort: never a traceback
            if isinstance(e, OSError) and e.filename is None and e.errno in STDOUT_ERRORS:
                sys.exit(stdout_lost(e))  # click's --help and --version write stdout themselves
            unexpected(e)

    def invoke(self, ctx):
        """The command, its own arguments' parsing included; a Ctrl-C it does not handle is carried past click,
        which would print a blank line before the error's one line."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            from .report import Interrupted
            raise Interrupted() from None


NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click 8.2 on; older ones print the help
STDOUT_ERRORS = (errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EBADF)


def parse_scales(value: str) -> tuple:
    scales = tuple(sorted({s.strip() for s in value.split(",") if s.strip()}))
    if not scales or any(s not in SCALE_CHOICE.choices for s in scales):
        raise click.BadParameter(f"{value!r}: give scales among 2, 4, 8, comma-separated")
    return tuple(int(s) for s in scales)


def parse_shard(value: str | None):
    if value is None:
        return None
    if not re.fullmatch(r"[0-9]+/[0-9]+", value):  # ASCII digits: int() also reads other scripts' digits
        raise click.BadParameter(f"{value!r}: give K/N, as in 0/4")
    k, n = (int(v) for v in value.split("/"))
    if not 0 <= k < n <= MAX_COPIES:
        raise click.BadParameter(f"{value!r}: K must be at least 0 and below N, and N at most {MAX_COPIES}")
    return k, n


def fail(message: str, code: int = 2):
    """The command's one error line and exit code; after SIGINT or SIGTERM, the signal's, whatever the error: C
    code (safetensors', Pillow's) can turn the interruption into an error of its own ("damaged")."""
    from .report import SIGNAL_EXITS, SIGNALLED, error_line
    if SIGNALLED and code not in (130, 143):
        message, code = SIGNAL_EXITS[SIGNALLED[0]]
    error_line(message)
    sys.exit(code)


def unexpected(e: Exception):
    """The one line for an error no handler expected: a file name the system refuses where no check of refsr's
    looked (errors.name_trouble), exit 2; else a bug of ours, exit 1. After SIGINT or SIGTERM, the error C code
    made of the signal (report.reraise_signal): the signal's line and exit code."""
    from .errors import memory_trouble, name_trouble
    from .report import SIGNAL_EXITS, SIGNALLED
    if SIGNALLED:
        fail(*SIGNAL_EXITS[SIGNALLED[0]])
    if memory_trouble(e):  # where no handler of the work expected it (the planning of a run); before a file's
        # ENOMEM is taken for trouble with its name
        fail(memory_trouble(e))
    if name_trouble(e):
        fail(name_trouble(e))
    fail(f"internal error, please report it ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})", 1)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="refsr", prog_name="refsr")
def main():
    """Reference-based super-resolution (RefVAE): upscale photos 2x, 4x or 8x, with the look of a reference image
    or with samples from the learned prior.

    \b
      refsr upscale photo.png --ref painting.jpg -o out/     one 8x image per reference
      refsr sample photo.png --n 10 --seed 0 -o out/         ten plausible 8x images, reproducible
      refsr train --data photos/ --out runs/x8                train weights that upscale and sample load
    """


BATCH = BatchOptions()  # the defaults of upscale's, sample's and walk's flags


def decorated(f, options: list):
    for option in reversed(options):
        f = option(f)
    return f


def engine_options(f):
    """The flags of every command that runs the network: which weights, and how the engine runs them (upscale,
    sample, walk and eval alike)."""
    return decorated(f, [
        click.option("--scale", type=SCALE_CHOICE, default=str(BATCH.scale), show_default=True,
                     help="Upscaling factor."),
        click.option("--weights", metavar="FILE|OWNER/REPO[@REV][:FILE]", default=None,
                     help="Checkpoint: a local .safetensors file or a Hugging Face Hub reference. "
                          "[default: the shipped weights for --scale]"),
        click.option("--strength", type=Finite(0, MAX_STRENGTH), default=BATCH.strength, show_default=True,
                     help="How much of the matched detail is pasted onto the faithful output (0: none, the "
                          "faithful output)."),
        click.option("--texture", type=click.Choice(TEXTURES), default=BATCH.texture, show_default=True,
                     help="Where the invented detail comes from: analogy, the reference's own detail (or, for "
                          "samples, that of the shipped bank of photos) matched to the input; learned, the "
                          "network's texture branch, decoded from z."),
        click.option("--tile", type=Integer(min=MIN_TILE), default=BATCH.tile, show_default=True,
                     help="Tile size in LR pixels; bounds memory on large images."),
        click.option("--tile-pad", type=Integer(min=0), default=BATCH.tile_pad, show_default=True,
                     help="Context around each tile in LR pixels; tiles agree with the untiled result when it "
                          "covers the network's receptive field."),
        click.option("--consistency-steps", type=Integer(0, MAX_CONSISTENCY_STEPS),
                     default=BATCH.consistency_steps, show_default=True,
                     help="Back-projection rounds that make the output's bicubic downscale match the input "
                          "(each an exact projection, then a clamp to the displayable range)."),
        click.option("--no-consistency", is_flag=True,
                     help="Skip the LR-consistency step (same as --consistency-steps 0)."),
        click.option("--device", type=click.Choice(DEVICES), default=BATCH.device, show_default=True,
                     help="auto picks CUDA, then MPS, then CPU."),
        click.option("--half", is_flag=True, help="Half precision (GPU only)."),
    ])


def common_inference_options(f):
    """engine_options, and the flags of the commands that write images (upscale, sample, walk)."""
    return engine_options(decorated(f, [
        click.option("-o", "--out", type=OutPath(), default=BATCH.out, show_default=True,
                     help="Output folder (created if missing), or a file name (its extension sets the format) "
                          "when the run writes one image."),
        click.option("--format", "fmt", type=click.Choice(OUTPUT_FORMATS), default=None,
                     help="Format of files written into a folder. [default: png]"),
        click.option("--max-pixels", type=Integer(min=1), default=BATCH.max_pixels, show_default=True,
                     help="Refuse input images with more pixels than this (decompression bombs), before decoding."),
        click.option("--temperature", type=Finite(0, MAX_TEMPERATURE), default=None,
                     help="How far a sample may stray: with --texture analogy, how far down each patch's list of "
                          "matching candidates the seed may pick (0: the nearest; 1: among the 8 nearest); with "
                          "--texture learned, the spread of z around its mean. [default: sample "
                          f"{SAMPLE_TEMPERATURE:g}, upscale {BATCH.temperature:g}]"),
        click.option("--overwrite", is_flag=True, help="Replace existing output files."),
        click.option("--skip-existing", is_flag=True, help="Skip outputs that already exist (resume a batch)."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar and no messages, only errors."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print one JSON object per written file on stdout (for scripts)."),
        click.option("--shard", metavar="K/N", default=None, callback=lambda ctx, param, value: parse_shard(value),
                     help="Do only inputs K, K+N, K+2N... (K from 0) of the sorted list, for N parallel jobs; under "
                          "torchrun or SLURM the launcher's rank and size are used."),
        click.option("--sheet", is_flag=True,
                     help="Write one contact sheet per input instead of the images: the same 256-pixel window of "
                          "every output at 100 %, labelled with the flag that redoes it (--seed N, --ref NAME)."),
    ]))


def engine_settings(options: dict) -> EngineOptions:
    """The EngineOptions of engine_options' flags, taken out of a command's `options`."""
    if options.pop("no_consistency"):
        if options["consistency_steps"] not in (0, BATCH.consistency_steps):  # (given, unless the default's value)
            fail(f"--no-consistency and --consistency-steps {options['consistency_steps']}: choose one")
        options["consistency_steps"] = 0
    return EngineOptions(**{k: options.pop(k) for k in ("tile", "tile_pad", "consistency_steps", "device", "half")})


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="LR_IMAGE...")
@click.option("--ref", "refs", multiple=True, metavar="IMAGE|FOLDER",
              help="Reference image or folder of them (repeatable): its texture is added. [default: none, the "
                   "faithful output]")
@click.option("--seed", type=SEEDS, default=BATCH.seed, show_default=True,
              help="Seed of the draw when --temperature is above 0, and of the grain of --ref outputs (weights "
                   "with texture noise).")
@click.option("--match", is_flag=True,
              help="The references show the same scene (another shot, the next frame): bring in their real detail "
                   "where they match, one output from all of them (STEM_xSCALE_match.png). Where nothing matches, "
                   "the output is the one without a reference.")
@click.option("--match-map", is_flag=True,
              help="With --match: also write where each reference was used, as a grey image (STEM_xSCALE_match_map"
                   ".png; white: the reference's pixels).")
@common_inference_options
def upscale(inputs, refs, seed, match, match_map, **options):
    """Upscale LR_IMAGE... (files, folders or globs): once per reference, or once without one.

    Outputs are named STEM_xSCALE_REFSTEM.png, or STEM_xSCALE.png without a reference (STEM_xSCALE_sSEED.png for a
    prior sample, --temperature above 0).
    """
    options["temperature"] = BATCH.temperature if options["temperature"] is None else options["temperature"]
    if match_map and not match:
        fail("--match-map needs --match")
    sys.exit(run_inference("upscale", inputs, refs, None, seed=seed, match=match, match_map=match_map, **options))


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="LR_IMAGE...")
@click.option("-n", "--n", "count", type=Integer(1, MAX_SAMPLES), default=SAMPLES, show_default=True,
              help="Number of samples per image.")
@click.option("--seed", type=SEEDS, default=BATCH.seed, show_default=True,
              help="Sample i uses seed SEED+i, so --n 1 --seed 3 reproduces the fourth of --n 10 --seed 0.")
@click.option("--ref", "refs", multiple=True, metavar="IMAGE|FOLDER",
              help="Draw the detail from this reference instead of the shipped bank of photos (repeatable: --n "
                   "samples per reference).")
@common_inference_options
def sample(inputs, count, seed, refs, **options):
    """Draw --n different upscalings of each LR_IMAGE: the faithful output with detail that differs where the input
    leaves room (fine texture), from the shipped bank of photos or from --ref.

    Outputs are named STEM_xSCALE_sSEED.png (STEM_xSCALE_REFSTEM_sSEED.png with --ref).
    """
    options["temperature"] = SAMPLE_TEMPERATURE if options["temperature"] is None else options["temperature"]
    if seed + count - 1 > MAX_SEED:
        fail(f"--seed {seed} --n {count}: sample i uses seed SEED+i, and seeds go up to {MAX_SEED}")
    sys.exit(run_inference("sample", inputs, refs or None, range(seed, seed + count), **options))


def torch_imported():
    """torch, imported with SIGINT and SIGTERM held until it is: its C++ start-up imports Python modules, and a
    KeyboardInterrupt raised in one aborted the process (exit 134, a C++ trace) instead of its one line."""
    from .report import signals_held
    with signals_held():
        import torch
    return torch


def run_inference(command, inputs, refs, seeds, scale, **options) -> int:
    from dataclasses import asdict

    torch_imported()
    from .batch import run_batch
    engine = engine_settings(options)
    return run_batch(command, inputs, refs, seeds, BatchOptions(scale=int(scale), **asdict(engine), **options))


TRAIN = TrainOptions(data=[])  # the defaults of `refsr train`'s flags


@main.command()
@click.option("--data", "data", multiple=True, required=True, type=click.Path(file_okay=False, exists=True,
              path_type=Path), help="Folder of HR training images (repeatable).")
@click.option("--refs", "refs", multiple=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Folder of gallery references (artworks) for the texture stage's reference outputs.")
@click.option("--out", type=NamedPath(), default=TRAIN.out, show_default=True,
              help="Run folder: the checkpoints, last.state.safetensors (for --resume), log.jsonl.")
@click.option("--stage", type=click.Choice(["trunk", "texture"]), default=TRAIN.stage, show_default=True,
              help="trunk: the fidelity trunk of every --scales at once, pixel losses only (writes x2/x4/x8"
                   ".safetensors); texture: the texture branch of --scale on a frozen trunk (writes last.safetensors).")
@click.option("--scale", type=SCALE_CHOICE, default=str(TRAIN.scale), show_default=True)
@click.option("--scales", default=",".join(map(str, TRAIN.scales)), show_default=True,
              callback=lambda ctx, param, value: parse_scales(value),
              help="Scales the trunk stage trains together, comma-separated.")
@click.option("--steps", type=Integer(min=1), default=TRAIN.steps, show_default=True,
              help="Total steps of the run.")
@click.option("--batch", type=Integer(min=1), default=TRAIN.batch, show_default=True, help="Crops per step.")
@click.option("--lr-patch", type=Integer(min=8), default=TRAIN.lr_patch, show_default=True,
              help="LR crop side in pixels.")
@click.option("--learning-rate", type=Finite(0, 1, low_open=True), default=TRAIN.learning_rate,
              show_default=True)
@click.option("--modulation-lr-scale", type=Finite(0, 1e3, low_open=True), default=TRAIN.modulation_lr_scale,
              show_default=True, help="Learning-rate factor of the noise strengths, noise gates and z modulation, "
                                      "which start at zero and must grow for samples to differ.")
@click.option("--l1-weight", type=Finite(0, 1e6), default=TRAIN.l1_weight, show_default=True,
              help="Pixel L1 to the HR crop.")
@click.option("--lr-consistency-weight", type=Finite(0, 1e6), default=TRAIN.lr_consistency_weight,
              show_default=True, help="L1 between the output's bicubic downscale and the LR crop.")
@click.option("--imle-samples", type=Integer(1, MAX_IMLE_SAMPLES), default=TRAIN.imle_samples,
              show_default=True,
              help="Texture stage: latents decoded per crop; the one nearest the HR crop is trained (IMLE).")
@click.option("--imle-weight", type=Finite(0, 1e6), default=TRAIN.imle_weight, show_default=True,
              help="VGG16 feature distance of the chosen sample to the HR crop.")
@click.option("--ref-share", type=Finite(0, 1), default=TRAIN.ref_share, show_default=True,
              help="Share of each batch also decoded from a reference (another crop of the same photo, or --refs).")
@click.option("--ref-mix", type=Finite(0, 1), default=TRAIN.ref_mix, show_default=True,
              help="Share of those references taken from --refs (ignored without --refs).")
@click.option("--content-weight", type=Finite(0, 1e6), default=TRAIN.content_weight, show_default=True,
              help="VGG16 feature distance of the reference outputs to the HR crop.")
@click.option("--style-weight", type=Finite(0, 1e6), default=TRAIN.style_weight, show_default=True,
              help="Channel mean/std of VGG16 features of the reference outputs against their reference.")
@click.option("--style-where", type=click.Choice(["everywhere", "textured"]), default=TRAIN.style_where,
              show_default=True, help="Style statistics of the whole output and reference, or of their textured "
                                      "parts alone (where the HR crop, and the reference, are not flat).")
@click.option("--kl-weight", type=Finite(0, 1e6), default=TRAIN.kl_weight, show_default=True)
@click.option("--flat-weight", type=Finite(0, 1e6), default=TRAIN.flat_weight, show_default=True,
              help="Texture stage: fine detail of a sample the IMLE did not pick, and of the reference outputs, where "
                   "the HR crop is flat (0: off).")
@click.option("--adv-weight", type=Finite(0, 1e6), default=TRAIN.adv_weight, show_default=True,
              help="PatchGAN adversarial loss (0: no discriminator).")
@click.option("--perceptual-crop", type=Integer(min=32), default=TRAIN.perceptual_crop, show_default=True,
              help="HR pixels a side seen by the feature distance and the discriminator (cost control).")
@click.option("--pool-size", type=Integer(min=1), default=TRAIN.pool_size, show_default=True,
              help="Texture stage: crops held in memory with the frozen trunk's outputs.")
@click.option("--crop-uses", type=Integer(1, 1_000_000), default=TRAIN.crop_uses, show_default=True,
              help="Texture stage: batches each pooled crop serves, on average, before it is replaced.")
@click.option("--val", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="Folder of HR images measured during training (centre crops).")
@click.option("--val-every", type=Integer(min=1), default=TRAIN.val_every, show_default=True)
@click.option("--val-samples", type=Integer(1, MAX_MEASURED_SAMPLES), default=TRAIN.val_samples,
              show_default=True,
              help="Texture stage: prior samples per validation image (mean measures; diversity from 2).")
@click.option("--save-every", type=Integer(min=1), default=TRAIN.save_every, show_default=True)
@click.option("--log-every", type=Integer(min=1), default=TRAIN.log_every, show_default=True)
@click.option("--seed", type=SEEDS, default=TRAIN.seed, show_default=True)
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--overwrite", is_flag=True, default=TRAIN.overwrite,
              help="Start afresh in an --out that holds checkpoints; they are replaced as the run saves (one it "
                   "would not replace is refused).")
@click.option("--init", multiple=True, type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Start from these weights (a fresh optimizer). The texture stage takes one checkpoint (default: "
                   "the shipped weights of --scale); the trunk stage one per scale (repeat --init).")
@click.option("--device", type=click.Choice(DEVICES), default=TRAIN.device, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def train(quiet, **options):
    """Train refsr's networks on a folder of HR photos; checkpoints load directly with --weights."""
    torch = torch_imported()
    from .errors import RefsrError
    from .train import STATE_FILE, RankLost, train as run_training
    options["scale"] = int(options["scale"])
    options["data"], options["refs"] = list(options["data"]), list(options["refs"]) or None
    options["init"] = list(options["init"]) or None
    from .device import environment_int
    from .report import Terminated, one_line, say_line, to_stdout
    try:
        # Under torchrun rank 0 alone reports, its rank read as the launcher's check reads it (00 and -0 are 0).
        quiet = quiet or (environment_int("RANK") or 0) != 0
        opt = TrainOptions(**options)
        if quiet:
            last = run_training(opt)
        else:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
            err = Console(stderr=True)  # as every command's messages; no bar into a file or pipe
            with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[info]}"), console=err, disable=not err.is_terminal) as bar:
                task = bar.add_task("train", total=opt.steps, info="")

                def report(step, total, losses, rate):
                    val = {k: v for k, v in losses.items() if k.startswith("val_")}
                    if val:
                        say_line(bar, f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
                    info = " ".join(f"{k} {v:.4f}" for k, v in losses.items() if k not in val)
                    bar.update(task, completed=step, info=info + f" | {rate:.2f} step/s")
                last = run_training(opt, report)
    except RankLost as e:  # (its run's files are closed and its lock given back: the unwinding did that)
        from .report import error_line
        error_line(str(e))
        sys.stdout.flush()
        os._exit(2)
    except RefsrError as e:
        fail(str(e))
    except (KeyboardInterrupt, Terminated) as e:
        stopped, code = ("interrupted", 130) if isinstance(e, KeyboardInterrupt) else ("terminated", 143)
        if (Path(options["out"]) / STATE_FILE).is_file():
            fail(f"{stopped}; the last checkpoint is kept, continue with --resume", code)
        fail(f"{stopped} before the run's first checkpoint: nothing to resume", code)
    except (RuntimeError, MemoryError) as e:
        from .errors import memory_trouble
        kept = ("the last checkpoint is kept" if (Path(options["out"]) / STATE_FILE).is_file() else
                "before the run's first checkpoint")
        if isinstance(e, torch.cuda.OutOfMemoryError):
            fail(f"out of GPU memory; lower --batch or --lr-patch ({kept})")
        if memory_trouble(e):  # torch's CPU allocator, or numpy's
            fail(f"{memory_trouble(e)}; lower --batch, --lr-patch or --pool-size ({kept})")
        unexpected(e)
    except Exception as e:
        unexpected(e)
    if not quiet:
        to_stdout(f"wrote {one_line(last)}")


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="LR_IMAGE...")
@click.option("--ref", "refs", multiple=True, metavar="IMAGE", help="The two references to walk between.")
@click.option("--seed", "seeds", multiple=True, type=SEEDS, help="The two prior seeds to walk between.")
@click.option("--steps", type=Integer(2, MAX_WALK_FRAMES), default=WALK_FRAMES, show_default=True,
              help="Frames, both ends included.")
@click.option("--animate", type=click.Choice(["webp", "gif"]), default=None,
              help="Also write the frames as one looping animation.")
@common_inference_options
def walk(inputs, refs, seeds, steps, animate, **options):
    """Frames of a walk through the latent space of LR_IMAGE..., between two references (--ref a --ref b, along the
    line between their means) or two prior draws (--seed 3 --seed 7, along the sphere).

    Frames are named STEM_xSCALE_walk000.png ...; --animate adds STEM_xSCALE_walk.webp (or .gif).
    """
    if refs and seeds:
        fail("give two --ref or two --seed, not both")
    if not refs and not seeds:
        fail("give the two ends of the walk: two --ref or two --seed")
    if options["temperature"] is None:
        options["temperature"] = SAMPLE_TEMPERATURE if seeds else BATCH.temperature
    sys.exit(run_inference("walk", inputs, refs or None, list(seeds) or None, walk=steps,
                           animate=animate, **options))


@main.command()
@click.argument("outputs", nargs=-1, required=True, type=NamedPath(),
                metavar="IMAGE...")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout.")
def info(outputs, as_json):
    """How refsr made IMAGE...: version, weights and their sha256, scale, seed, temperature, reference and input
    (with sha256), and, as `redo`, the command that makes the same image again when run from the folder the
    original command ran in (it writes into the current folder; add -o to choose another)."""
    from .provenance import DamagedRecord, check_written_as, read_provenance, redo_command
    from .report import error_line, one_line, reraise_signal, to_stdout
    code = 0
    for path in outputs:
        try:
            record = read_provenance(path)
            if record is None:
                raise DamagedRecord("no refsr provenance (not an output of refsr)")
            command = redo_command(record)
            check_written_as(record, path)
        except (DamagedRecord, OSError, ValueError, SyntaxError, MemoryError) as e:
            from .errors import memory_trouble
            reraise_signal()  # a Ctrl-C that Pillow made an error of its own: not this file's trouble
            if isinstance(e, DamagedRecord):
                error_line(f"{path}: {e}")
            elif isinstance(e, MemoryError):  # a large foreign PNG: Pillow decodes it to reach text chunks after
                # its pixels
                error_line(f"{path}: {memory_trouble(e)} reading it")
            elif os.path.isdir(path):
                error_line(f"{path}: is a folder, not an image")
            elif isinstance(e, FileNotFoundError):  # (OSError's text named the file again)
                error_line(f"{path}: no such file")
            else:  # PIL's errors of unreadable and foreign files
                error_line(f"{path}: not a readable image ({e})")
            code = 1
            continue
        if as_json:
            to_stdout(json.dumps({"file": str(path), **record, "redo": command}))
            continue
        to_stdout(one_line(path))
        for key, value in record.items():
            to_stdout(f"  {key:<18} {one_line(value)}")
        to_stdout(f"  {'redo':<18} {one_line(command)}")
    sys.exit(code)


@main.command()
@click.argument("files", nargs=-1, required=True, type=NamedPath(), metavar="CHECKPOINT...")
@click.argument("repo", metavar="OWNER/REPO")
@click.option("--revision", default=None, help="Branch to commit to, created if needed. [default: main]")
@click.option("--private", is_flag=True, help="Create the repository private (if it does not exist yet).")
@click.option("-m", "--message", default=None, help="Commit message.")
@click.option("--no-card", is_flag=True, help="Leave the repository's README.md alone.")
@click.option("--license", "license_id", default=None, metavar="ID",
              help="Licence of the weights for the model card (a Hub licence id, e.g. mit). [default: none stated]")
def push(files, repo, revision, private, message, no_card, license_id):
    """Upload CHECKPOINT... to the Hugging Face Hub model repository OWNER/REPO in one commit, each as
    refsr-x{scale}.safetensors (what --weights OWNER/REPO loads), with a generated model card as README.md.
    Needs a token with write access (HF_TOKEN, or `hf auth login`).

    Exit code 0: pushed (the commit's URL is printed); 2: nothing was sent (a file that is not a refsr checkpoint,
    two of one scale, a bad repository or branch name); 1: the Hub refused the push or it failed on the way (no
    token, no connection), after the repository or the branch may have been created."""
    torch_imported()
    from .errors import RefsrError
    from .hub import UploadFailed, push as push_to_hub
    try:
        url = push_to_hub(files, repo, revision, private, message, card=not no_card, license=license_id)
    except UploadFailed as e:
        fail(str(e), 1)
    except RefsrError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    from .report import one_line, to_stdout
    to_stdout(one_line(url))  # the server's text: a control character in it must not forge a line or clear a screen


@main.command(name="eval")
@click.argument("hr_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--temperature", type=Finite(0, MAX_TEMPERATURE), default=BATCH.temperature, show_default=True,
              help="z of the main refsr rows: the prior's mean (0) or a sample at this temperature.")
@click.option("--seed", type=SEEDS, default=BATCH.seed, show_default=True)
@click.option("--samples", type=Integer(0, MAX_MEASURED_SAMPLES), default=0, show_default=True,
              help="Also decode N prior samples per image (seeds --seed..): their mean measures, their lowest "
                   "LR-PSNR and the NTIRE 2021 diversity score.")
@click.option("--sample-temperature", type=Finite(0, MAX_TEMPERATURE), default=SAMPLE_TEMPERATURE,
              show_default=True)
@click.option("--ref", "refs", multiple=True, metavar="FILE|DIR|GLOB",
              help="Also decode each LR with the mean z of these references (repeatable): their mean measures and, "
                   "with two or more, the reference influence score.")
@click.option("--num-refs", type=Integer(min=1), default=None,
              help="Use K of the --ref images, evenly spaced in the order given (a folder's in sorted order). "
                   "[default: all]")
@click.option("--match-protocol", type=click.Choice(["warp", "half", "unrelated"]), default=None,
              help="Also measure `upscale --match`, with as reference: the HR image under a seeded random "
                   "similarity transform (warp); the photo's other half, the image being one half (half); the next "
                   "photo of HR_DIR (unrelated).")
@click.option("--baseline", type=click.Choice(["bicubic", "none"]), default="bicubic", show_default=True)
@click.option("--json", "json_path", type=OutPath(file_only=True), default=None,
              help="Also write the rows and means (and the images that failed) to this JSON file.")
@click.option("--overwrite", is_flag=True, help="Replace the --json file if it exists.")
@engine_options
def evaluate(baseline, json_path, scale, **options):
    """Measure a checkpoint on the HR images of HR_DIR against bicubic (PSNR/SSIM on Y, LPIPS, LR-PSNR;
    diversity with --samples, reference influence with --ref, content-similar references with
    --match-protocol).

    An image that cannot be measured (unreadable, too small) is reported on stderr and left out; the table and
    --json hold the others. Exit code 0: all measured; 1: some images failed; 2: nothing could start (bad flag,
    weights, reference, an HR_DIR without images) or no image could be measured."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    torch_imported()
    from .errors import RefsrError
    from .evaluate import plan_evaluation
    from .report import say_line
    engine = engine_settings(options)
    opt = EvalOptions(scale=int(scale), baseline=baseline == "bicubic", json=json_path, **asdict(engine), **options)
    try:
        evaluation = plan_evaluation(opt)
        err = Console(stderr=True)
        # No bar into a file or pipe (it left a blank line there).
        with Progress(TextColumn("measuring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True, disable=not err.is_terminal) as bar:
            task = bar.add_task("eval", total=len(evaluation.paths))
            # An image that fails is reported as it happens (above the bar, one line whatever the width).
            report = lambda message: say_line(bar, f"refsr: error: {message}")
            result = evaluation.run(on_image=lambda name: bar.advance(task), on_error=report)
    except RefsrError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    if not result["rows"]:  # each image's line is out already; one image: its line is the run's error
        if len(result["failed"]) == 1:
            sys.exit(2)
        fail(f"no image of {opt.hr_dir} could be measured")
    try:
        print_evaluation(opt, evaluation.ref_paths, result)
    finally:  # the JSON file is written even when stdout is not (a full disk, `| head`)
        write_evaluation(opt, evaluation, result)
    sys.exit(1 if result["failed"] else 0)


def write_evaluation(opt, evaluation, result: dict) -> None:
    """eval's --json file, when asked for; the weights named as the outputs' records name them (a Hub reference
    pinned to its commit: the repository may move on)."""
    if opt.json is None:
        return
    from .checkpoint import recorded_weights
    from .evaluate import published_rows
    from .files import atomic_path
    ref_paths = evaluation.ref_paths
    weights = None if opt.weights is None else recorded_weights(opt.weights, evaluation.upscaler.weights_path)
    text = json.dumps({"scale": opt.scale, "weights": weights, "texture": opt.texture,
                       "strength": opt.strength, "temperature": opt.temperature, "seed": opt.seed,
                       "samples": opt.samples, "sample_temperature": opt.sample_temperature,
                       "references": [str(p) for p in ref_paths], "match_protocol": opt.match_protocol,
                       **result, "published": published_rows(opt.hr_dir, opt.scale)}, indent=1)
    try:
        with atomic_path(opt.json, replace=opt.overwrite) as tmp:
            Path(tmp).write_text(text)
    except OSError as e:  # AppearedMeanwhile too: a file another process wrote there is kept
        fail(f"{opt.json}: cannot write ({e.strerror or e})", 1)


def print_evaluation(opt, ref_paths: list, result: dict) -> None:
    """eval's table of rows and means (and the published rows of the benchmark set), then what they say."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from .evaluate import published_rows
    from .report import one_line, to_stdout
    # Names as plain text, escaped to one line: rich read "[b]" in a name as markup, and a newline split a row.
    table = Table(title=Text(one_line(f"x{opt.scale} on {opt.hr_dir}")))
    columns = [("PSNR-Y", "psnr", ".2f"), ("SSIM-Y", "ssim", ".4f"), ("LPIPS", "lpips", ".4f"),
               ("LPIPS-vgg", "lpips_vgg", ".4f"), ("LR-PSNR", "lr_psnr", ".2f"), ("diversity", "diversity", ".2f"),
               ("influence", "influence", ".2f"), ("infl. AlexNet", "influence_alex", ".2f"),
               ("confidence", "confidence", ".2f"), ("match s", "seconds", ".1f")]
    rows = result["rows"] + [{"image": "mean", "method": m, **v} for m, v in result["means"].items()]
    rows += published_rows(opt.hr_dir, opt.scale)
    columns = [c for c in columns if any(c[1] in r for r in rows)]
    for title in ["image", "method"] + [c[0] for c in columns]:
        table.add_column(title, justify="left" if title in ("image", "method") else "right")
    for r in rows:
        table.add_row(Text(one_line(r["image"])), r["method"],
                      *(format(r[k], f) if k in r else "" for _, k, f in columns))
    terminal = sys.stdout is not None and sys.stdout.isatty()
    console = Console(width=None if terminal else 160)  # a file or pipe gets whole columns
    with console.capture() as captured:  # then written as refsr's other results are (report.to_stdout)
        console.print(table)
    to_stdout(captured.get().rstrip("\n"))
    if opt.match_protocol is not None:
        fidelity = result["means"]["refsr"]
        # The refsr row: the output without a reference, which at a --temperature above 0 is a prior sample.
        against = ("the output without a reference" if opt.temperature == 0 else
                   f"the refsr row (a prior sample at --temperature {opt.temperature:g})")
        for method, how in (("match", "--match"), ("protocol reference", "--ref without --match")):
            to_stdout(f"{how} ({opt.match_protocol}) against {against}: "
                      f"{against_fidelity(result['means'][method], fidelity)}")
    if len(ref_paths) >= 2:
        to_stdout(f"reference influence with K = {len(ref_paths)}: chance is {1 / len(ref_paths):.2f}; by VGG16 "
                  "feature statistics (what training's style term matches) and by AlexNet's (which no loss sees)")


def against_fidelity(got: dict, fidelity: dict) -> str:
    """PSNR-Y and LPIPS of `got` against the fidelity output's, as differences: rounded, then + 0.0, so that one
    which rounds to nothing reads +0.0000, not -0.0000."""
    psnr = round(got["psnr"] - fidelity["psnr"], 2) + 0.0
    lpips = round(got["lpips"] - fidelity["lpips"], 4) + 0.0
    share = round(100 * (got["lpips"] / fidelity["lpips"] - 1), 1) + 0.0 if fidelity["lpips"] else None
    return f"PSNR-Y {psnr:+.2f} dB, LPIPS {lpips:+.4f}" + ("" if share is None else f" ({share:+.1f} %)")
