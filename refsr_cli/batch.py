"""The batch behind `refsr upscale`, `sample` and `walk`: inputs and references found, the outputs of each input
planned under one set of rules, the engine run, every file written atomically, recorded and reported.

The rules, for every file a run writes (images, contact sheets, --match-map maps, walk animations): a temporary
name in the output folder, renamed when complete; an existing file is kept unless --overwrite, and skipped, not
an error, with --skip-existing; no file the user passed in (input or reference, resolved through links) is ever
written; each carries a `Software: refsr` tag and its provenance; each is reported (`wrote FILE`, or a JSON line).
A bad input is reported and skipped, the others are done. Exit code 0: all done; 1: some inputs failed; 2: nothing
could start; 130/143: interrupted by SIGINT/SIGTERM.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import recorded_weights
from .device import launcher_shard
from .engine import Latent, Latents, Upscaler, walk_latent
from .errors import OutOfMemory, RefsrError, engine_errors_named, memory_named, memory_trouble, name_trouble
from .files import AppearedMeanwhile, read_unchanged
from .images import (check_animation, check_record, check_side, expand_inputs, read_picture, read_rgb, software_tag,
                     unique_stems, write_animation, write_picture)
from .match import Transfer, correspond, prepare_reference
from .options import MAX_SHEET_TILES, BatchOptions
from .outputs import Output, check_names, check_others_sidecars, check_sidecars, outputs_of, plan_outputs
from .provenance import sheet_labels
from .report import Reporter, Terminated, reraise_signal, signals_held
from .sheet import contact_sheet, sheet_window

OUTPUTS_BUDGET = 1 << 30  # bytes of finished outputs held at once; more latents are decoded in several passes


@dataclass
class Variant:
    """One output of every input: its name suffix, what its provenance records of it, its latent (None: the
    fidelity output, or with --match the output the references' matched pixels are blended into)."""
    suffix: str
    fields: dict
    latent: Latent | None


@dataclass
class Plan:
    """What a run does to every input, settled before the first input is read."""
    opt: BatchOptions
    command: str  # "upscale", "sample" or "walk"
    upscaler: object
    folder: Path
    single: Path | None  # -o FILE: the one output's name
    ext: str
    variants: list  # of Variant
    match_refs: list = field(default_factory=list)  # --match: the references' prepared pixels
    passed_in: set = field(default_factory=set)  # inputs and references, resolved: never written
    record: dict = field(default_factory=dict)  # the provenance every output shares


def run_batch(command: str, inputs, refs, seeds, opt: BatchOptions) -> int:
    """Upscale every input once per reference (refs), or once per seed (seeds), or once (the fidelity output at
    temperature 0, else a prior sample of opt.seed); with opt.walk, frames between the two seeds or references.
    Returns the exit code."""
    report = Reporter(opt.quiet, opt.as_json)
    try:  # (SIGTERM raises Terminated from the start of the command: cli.Commands)
        with report:
            code = run(report, command, inputs, refs, seeds, opt)
    except KeyboardInterrupt:
        report.error("interrupted; finished outputs are kept, none is half-written")
        code = 130
    except Terminated:
        report.error("terminated; finished outputs are kept, none is half-written")
        code = 143
    if code != 2 and not opt.as_json:
        report.say("{written} written, {skipped} skipped, {failed} failed".format(**report.counts))
    return code


def run(report: Reporter, command: str, inputs, refs, seeds, opt: BatchOptions) -> int:
    lr_paths = []
    for spec in inputs:
        try:
            lr_paths += [p for p in expand_inputs([spec], skip_outputs=True) if p not in lr_paths]
        except RefsrError as e:
            report.failed(str(e))
    try:
        launched = launcher_shard()  # checked even with --shard: a bad RANK is one line whatever the flags
        if opt.shard and launched:
            raise RefsrError(f"--shard and a launcher's copies (rank {launched[0]} of {launched[1]}) both split the "
                             "inputs: give one")
        shard = opt.shard or launched
        plan = make_plan(report, command, lr_paths, refs, seeds, opt)
    except RefsrError as e:
        reraise_signal()  # an interruption C code turned into an error of its own ("damaged")
        report.error(str(e))
        return 2
    # Names come from the whole list, so that a sharded run writes exactly the files an unsharded one would.
    named = list(zip(lr_paths, unique_stems(lr_paths)))
    try:
        check_names(plan, named)
    except RefsrError as e:
        reraise_signal()
        report.error(str(e))
        return 2
    if shard is not None:
        named = named[shard[0]::shard[1]]
    for lr_path, stem in named:
        try:
            upscale_one(report, plan, lr_path, stem)
        except Exception as e:  # one line, and the batch goes on
            reraise_signal()
            report.failed(failure_line(lr_path, e))
    return 1 if report.counts["failed"] else 0


def failure_line(lr_path: Path, e: Exception) -> str:
    """The line for an input that failed."""
    if memory_trouble(e) is not None:  # numpy's MemoryError, the engine's OutOfMemory, torch's CPU allocator's
        return (f"{lr_path}: {memory_trouble(e)}; lower --max-pixels, or "
                "upscale at a smaller --scale")
    if isinstance(e, (RefsrError, AppearedMeanwhile)):
        return str(e)
    if isinstance(e, OSError):
        return f"{lr_path}: cannot write the output ({e.strerror or e})"
    # A loop of links at an output's name (a RuntimeError of Path.resolve), or a bug of ours.
    return f"{lr_path}: {name_trouble(e) or f'internal error, please report it ({type(e).__name__}: {e})'}"


def tiles_of(opt: BatchOptions, ref_paths: list, seeds) -> int:
    """The images a run makes of each input, or the tiles of its --sheet: a walk's frames, --n draws of each
    reference (or of the prior), one of all --match's references, one of each reference."""
    return (opt.walk if opt.walk is not None else len(dict.fromkeys(seeds)) * max(len(ref_paths), 1)
            if seeds is not None else 1 if opt.match else max(len(ref_paths), 1))


def check_sheet_tiles(tiles: int) -> None:
    if tiles > MAX_SHEET_TILES:
        raise RefsrError(f"--sheet: a contact sheet holds at most {MAX_SHEET_TILES} tiles (each 256 px at 100 %), "
                         f"and this run gives {tiles}; write the images, or fewer")


def make_plan(report: Reporter, command: str, lr_paths, refs, seeds, opt: BatchOptions) -> Plan:
    """Everything that does not depend on the input: the engine, each reference encoded once, the variants, the
    provenance they share. A RefsrError here means nothing could start."""
    check_flags(opt, refs, seeds)
    folder, single, ext = plan_outputs(opt.out, opt.fmt)
    ref_paths = expand_inputs(refs, skip_outputs=True) if refs else []  # a folder of references: not our outputs
    tiles = tiles_of(opt, ref_paths, seeds)
    if opt.sheet:  # before any reference is read (110 were read and encoded first: minutes, their banks all held)
        check_sheet_tiles(tiles)
    images = 1 if opt.sheet else tiles
    planned = len(lr_paths) * (images + opt.match_map + bool(opt.animate))
    if single is not None and planned > 1:
        raise RefsrError(f"-o {opt.out} names one file, but this run writes {planned}; give a folder")
    upscaler = Upscaler.from_weights(opt.weights, opt.scale, opt, report.warn)
    record = {"refsr": software_tag(), "command": command, "scale": opt.scale, "temperature": opt.temperature,
              "weights": recorded_weights(opt.weights, upscaler.weights_path),
              "weights_sha256": upscaler.weights_sha256,
              "tile": opt.tile, "tile_pad": opt.tile_pad, "consistency_steps": opt.consistency_steps,
              "max_pixels": opt.max_pixels,
              # Where and in what precision, when not the CPU's float32 (a GPU's pixels differ by a few levels,
              # float16's more): absent, the record of a CPU run is as it was.
              **({"device": upscaler.device.type} if upscaler.device.type != "cpu" else {}),
              **({"half": True} if opt.half else {}),
              "texture": opt.texture, "strength": opt.strength,
              "format": {"jpeg": "jpg", "tif": "tiff"}.get(ext[1:].lower(), ext[1:].lower())}
    plan = Plan(opt, command, upscaler, folder, single, ext, [], record=record,
                passed_in={p.resolve() for p in lr_paths + ref_paths + [upscaler.weights_path]})
    if single is not None and single.resolve() in plan.passed_in:
        raise RefsrError(f"-o {single} is an input of this run; refsr never overwrites its inputs")
    latents = Latents(upscaler, opt.texture, opt.strength)
    if seeds is not None and not ref_paths:
        plan.variants = [Variant(f"s{seed}", {"seed": seed}, latents.prior(seed, opt.temperature))
                         for seed in dict.fromkeys(seeds)]  # walk --seed 3 --seed 3: one seed, as a ref named twice
    add_reference_variants(report, plan, latents, ref_paths, seeds)
    if not plan.variants:  # no reference: the fidelity output (temperature 0), or a prior sample of --seed
        plan.variants = [Variant(f"s{opt.seed}", {"seed": opt.seed}, latents.prior(opt.seed, opt.temperature))
                         if opt.temperature > 0 else Variant("", {}, None)]
    if opt.walk is not None:
        if len(plan.variants) != 2:
            raise RefsrError(f"a walk goes between two different seeds or references, and this one has "
                             f"{len(plan.variants)} (one named twice counts once)")
        ends = [v.fields.get("reference_sha256") for v in plan.variants]
        if ends[0] is not None and ends[0] == ends[1]:  # two names of one image: every frame the same
            raise RefsrError(f"--ref {ref_paths[0]} and --ref {ref_paths[1]} are the same image; a walk goes between "
                             "two different ones")
        plan.variants = walk_variants(plan.variants, opt.walk, from_prior=seeds is not None)
    if opt.sheet:
        check_sheet_tiles(len(plan.variants))
    if (opt.texture == "learned" and not upscaler.texture_trained
            and (any(v.latent is not None for v in plan.variants) or opt.temperature > 0)):
        report.warn("these weights come from the trunk stage, whose texture branch is untrained: every sample "
                    "and reference gives the fidelity output")
    try:  # last: a run refused above leaves no empty folder behind
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = (in_the_way(folder) if isinstance(e, FileExistsError) else None) or e.strerror or e
        raise RefsrError(f"{opt.out}: cannot create the output folder ({reason})") from None
    return plan


def check_flags(opt: BatchOptions, refs, seeds) -> None:
    """Flags that contradict each other, refused before anything is loaded."""
    if opt.overwrite and opt.skip_existing:
        raise RefsrError("--overwrite and --skip-existing contradict each other")
    if opt.match and (not refs or opt.temperature > 0):
        raise RefsrError("--match needs at least one --ref, and gives the fidelity output where nothing matches "
                         "(no --temperature)")
    if opt.animate and opt.sheet:
        raise RefsrError("--animate animates the frames, which --sheet does not write: choose one")

    if opt.match_map and opt.sheet:
        raise RefsrError("--match-map writes the map beside the images, which --sheet does not write: choose one")
    if opt.walk is not None and seeds is not None and opt.temperature == 0:
        raise RefsrError("a walk between seeds needs a --temperature above 0 (at 0 every seed gives the same image)")


def in_the_way(folder: Path) -> str | None:
    """What stops mkdir making `folder` where it says only "File exists": a file, or a link to nothing, at the
    folder's name or at one above it."""
    for path in (folder, *folder.parents):
        if path.is_symlink() and not path.exists():
            return f"{path} is a link to nothing"
        if path.exists() and not path.is_dir():
            return f"{path} is a file, not a folder"
    return None


def add_reference_variants(report: Reporter, plan: Plan, latents: Latents, ref_paths: list, seeds) -> None:
    """The variants of the references, each read and encoded once: one output a reference (sample --ref: --n
    draws a reference), or with --match one output from all of them together. A reference that cannot be read is
    reported and left out; none usable stops the run."""
    opt = plan.opt
    matched = []
    for path, stem in zip(ref_paths, unique_stems(ref_paths)):  # each reference read and encoded once
        try:
            with engine_errors_named(path), memory_named(str(path)):  # reading it, its bank or its z
                image, sha256 = read_unchanged(path, lambda p: read_rgb(p, opt.max_pixels))
                if opt.match:
                    plan.match_refs.append(prepare_reference(image, opt.scale, str(path)))
                    matched.append((path, sha256))
                    del image  # its float copy, before the next reference is read
                    continue
                source = latents.reference(image, str(path))
                fields = {"reference": str(path), "reference_sha256": sha256}
                if seeds is not None:  # sample --ref: --n draws from each reference
                    drawn = [Variant(f"{stem}_s{seed}", fields | {"seed": seed},
                                     latents.draw(source, seed, opt.temperature)) for seed in seeds]
                else:  # another --seed is another grain (and draw): another name
                    drawn = [Variant(f"{stem}_s{opt.seed}" if opt.seed else stem, fields | {"seed": opt.seed},
                                     latents.draw(source, opt.seed, opt.temperature))]
        except RefsrError as e:
            reraise_signal()  # not a reference passed over: the user's Ctrl-C, which C code made an error
            if len(ref_paths) == 1 or opt.walk is not None:  # the one reference, or an end of a walk (which cannot
                # go on without it): its line is the run's error
                raise RefsrError(f"reference {e}") from None
            report.failed(f"reference {e}")
            continue
        plan.variants += drawn
    if matched:  # one output per input from all the references together
        plan.variants.append(Variant("match", {"references": [str(p) for p, _ in matched],
                                               "references_sha256": [sha256 for _, sha256 in matched],
                                               "match_map": opt.match_map}, None))
    if ref_paths and not plan.variants:
        raise RefsrError("no usable reference")


def upscale_one(report: Reporter, plan: Plan, lr_path: Path, stem: str) -> None:
    """Every output of one input."""
    opt = plan.opt
    outputs = outputs_of(plan, stem)
    skipped = sum(not o.todo for o in outputs)  # counted once the input passes its checks: else it failed
    if not skipped < len(outputs):
        report.counts["skipped"] += skipped
        return
    # The input as the command line named it (a file of a folder: folder/name), like the references and weights: the
    # redo command of `refsr info` runs from where this one ran.
    picture, sha256 = read_unchanged(lr_path, lambda p: read_picture(p, opt.max_pixels))
    record = plan.record | {"input": str(lr_path), "input_sha256": sha256}
    check_sidecars(outputs, record)
    check_others_sidecars(plan, stem, outputs, record)
    for output in outputs:
        if output.todo and output.kind in ("image", "animation"):
            check_side(output.path, picture.rgb.shape[0] * opt.scale, picture.rgb.shape[1] * opt.scale)
        if output.todo and output.kind == "animation":
            check_animation(output.path, opt.walk, picture.rgb.shape[0] * opt.scale, picture.rgb.shape[1] * opt.scale)
        if output.todo and output.kind in ("image", "sheet"):  # the whole record each will carry: --match's and a
            # sheet's lists of references are most of it
            fields = output.variant.fields if output.kind == "image" else sheet_fields(plan)
            check_record(output.path, record | fields)
    report.counts["skipped"] += skipped
    for message in picture.warnings:
        report.warn(message)
    if picture.alpha is not None and any(o.todo and o.kind in ("animation", "sheet") for o in outputs):
        report.warn(f"{lr_path}: its transparency is kept in the images, not in the "
                    f"{'contact sheet' if opt.sheet else 'animation'}, which is opaque")

    def publish(output: Output, write, fields: dict, **extra) -> None:
        """One file written and reported, with SIGINT and SIGTERM held between the two."""
        # The tile the image was made with: after a GPU out-of-memory retry it is smaller than --tile, and tiles
        # change the last grey level, so the redo must ask for it.
        provenance = record | {"tile": plan.upscaler.tile} | fields
        with signals_held():
            write(provenance)
            report.wrote({"input": str(lr_path), "output": str(output.path), "scale": opt.scale, **fields, **extra})

    transfer = matched(report, plan, lr_path, picture.rgb, outputs)
    images = [o for o in outputs if o.kind == "image" and o.todo]
    sheet = next((o for o in outputs if o.kind == "sheet" and o.todo), None)
    variants = plan.variants if sheet else [o.variant for o in images]
    h, w = picture.rgb.shape[:2]
    tick = report.task(lr_path.name, len(plan.upscaler.tiles(h, w)) * len(variants))
    if sheet:  # only the same window of each output is kept
        window = sheet_window(picture.rgb, opt.scale)
        crops = sheet_crops(plan, lr_path, picture, variants, transfer, tick, window)
        labels = sheet_labels([v.fields for v in variants], opt.temperature)
        publish(sheet, lambda provenance: write_picture(np.asarray(contact_sheet(crops, labels)), sheet.path,
                                                         None, provenance, opt.overwrite), sheet_fields(plan),
                sheet=labels)
    for output, image in zip(images, [] if sheet else decoded(plan, lr_path, picture, variants, transfer, tick)):
        publish(output, lambda provenance: write_picture(image, output.path, picture.icc_profile, provenance,
                                                         opt.overwrite), output.variant.fields)
    write_sidecars(plan, outputs, transfer, publish, record)


def matched(report: Reporter, plan: Plan, lr_path: Path, rgb: np.ndarray, outputs: list) -> Transfer | None:
    """With --match, the input's correspondence with the references, when an output still to write needs it."""
    if not plan.match_refs or not any(o.todo and o.kind in ("image", "map", "sheet") for o in outputs):
        return None
    report.say(f"{lr_path.name}: matching {len(plan.match_refs)} reference(s)")
    try:  # on the CPU in float32 whatever the device: matching is done there (refsr_cli.match)
        with memory_named(str(lr_path)):
            return correspond(torch.from_numpy(rgb).permute(2, 0, 1)[None], plan.match_refs, plan.opt.scale)
    except OutOfMemory as e:  # the references' share of it, not the input's (a RefsrError, not a MemoryError)
        raise RefsrError(f"{e} matching its {len(plan.match_refs)} reference(s); give fewer or smaller "
                         "references") from None


def decoded(plan: Plan, lr_path: Path, picture, variants: list, transfer, tick):
    """The outputs of `variants` for one input picture, one by one, decoded a chunk of them at a time: the outputs
    of one pass are held in memory until written, so they are bounded (sample --n 100 on a photo)."""
    h, w = picture.rgb.shape[:2]
    chunk = max(1, OUTPUTS_BUDGET // (h * w * plan.opt.scale ** 2 * 4 * picture.bits // 8))
    for start in range(0, len(variants), chunk):
        with engine_errors_named(lr_path):
            images = plan.upscaler.upscale(picture.rgb, [v.latent for v in variants[start:start + chunk]],
                                           transfer=transfer, alpha=picture.alpha, grayscale=picture.grayscale,
                                           bits=picture.bits, on_tile=tick)
        yield from images


def sheet_crops(plan: Plan, lr_path: Path, picture, variants: list, transfer, tick, window) -> list:
    """The same window of each variant's output, all made with one tile size (the sheet's record gives one): a crop
    made before a GPU out-of-memory retry halved the tiles is made again."""
    crops, tiles = [None] * len(variants), [None] * len(variants)
    while stale := [i for i, tile in enumerate(tiles) if tile != plan.upscaler.tile]:
        # decoded() runs the next chunk only once this one's outputs are taken: the tile now is the one they had
        remade = decoded(plan, lr_path, picture, [variants[i] for i in stale], transfer, tick)
        for i, image in zip(stale, remade):
            crops[i], tiles[i] = image[window].copy(), plan.upscaler.tile
    return crops


def write_sidecars(plan: Plan, outputs: list, transfer, publish, record: dict) -> None:
    """The --match-map map and the walk's animation of one input, once its images are written."""
    opt = plan.opt
    for output in outputs:
        if output.kind == "map" and output.todo:
            publish(output, lambda provenance: write_picture(confidence_image(transfer, opt.scale), output.path,
                                                             None, provenance, opt.overwrite),
                    output.fields, confidence=float(transfer.confidence.mean()))
        if output.kind == "animation" and output.todo:
            check_sidecars(outputs, record, written_too=True)  # the frames are read back from their files
            frames = [o.path for o in outputs if o.kind == "image"]
            publish(output, lambda provenance: write_animation(frames, output.path, provenance, opt.overwrite),
                    output.fields)


def sheet_fields(plan: Plan) -> dict:
    """What a contact sheet's provenance records of its tiles: enough to redo the sheet."""
    fields = {k: v for k, v in plan.variants[0].fields.items() if k not in ("frame", "reference",
                                                                           "reference_sha256")}
    if plan.command == "sample":  # (with --ref, --n seeds for each reference)
        fields["seeds"] = list(dict.fromkeys(v.fields["seed"] for v in plan.variants))
    if plan.command in ("upscale", "sample") and "reference" in plan.variants[0].fields:
        fields["reference_list"] = list(dict.fromkeys(v.fields["reference"] for v in plan.variants))
    fields["sheet"] = sheet_labels([v.fields for v in plan.variants], plan.opt.temperature)
    return fields


def walk_variants(ends, frames: int, from_prior: bool) -> list:
    """`frames` variants from the first end to the second (engine.walk_latent): frame i at i / (frames - 1)."""
    walk = {"from": ends[0].fields, "to": ends[1].fields, "frames": frames}
    return [Variant(f"walk{i:03d}", walk | {"frame": i},
                    walk_latent(ends[0].latent, ends[1].latent, i / max(frames - 1, 1), from_prior))
            for i in range(frames)]


def confidence_image(transfer: Transfer, scale: int) -> np.ndarray:
    """The --match confidence at the output's size, as an 8-bit grey image (white: the reference's pixels)."""
    confidence = F.interpolate(transfer.confidence[None, None], scale_factor=scale, mode="bilinear",
                               align_corners=False)[0, 0].clamp(0, 1)
    return (confidence * 255).round().byte().numpy()[..., None]
