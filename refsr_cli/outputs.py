"""The files a batch writes, by the naming rules: STEM_xSCALE[_SUFFIX].EXT for each variant of an input (the
reference's stem, sSEED, walkNNN, match), _sheet, _match_map and _walk for the sidecars; and the rules that decide,
before anything is written, which of them are written: never an input, never two outputs of one name, an existing
file kept unless --overwrite (skipped with --skip-existing), an animation only of frames this run verified."""
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import RefsrError
from .files import NAME_MAX
from .images import IMAGE_SUFFIXES, output_format
from .provenance import read_provenance


def plan_outputs(out: Path, fmt: str | None):
    """(folder, single output file or None, extension) from -o and --format."""
    if out.suffix.lower() in IMAGE_SUFFIXES and not out.is_dir():
        if fmt is not None and output_format(out) != output_format(f"x.{fmt}"):
            raise RefsrError(f"--format {fmt} and -o {out} disagree: a file's extension sets its format; drop one")
        output_format(out)
        return out.parent, out, out.suffix
    return out, None, "." + (fmt or "png")


@dataclass
class Output:
    """One file an input gives, and whether it is to be written."""
    path: Path
    kind: str  # "image", "sheet", "map" or "animation"
    variant: object = None  # the batch.Variant of an image
    todo: bool = True
    fields: dict | None = None  # a sidecar's provenance beside the run's record


def check_names(plan, named) -> None:
    """Refuse a run two of whose outputs would take one name (`a.png` with `--ref x2_b.png` and `a_x2.png` with
    `--ref b.png` both give a_x2_x2_b.png): found before anything is written, so that no output replaces another."""
    seen = {}
    for lr_path, stem in named:
        for output in output_names(plan, stem):
            if output.path in seen:
                raise RefsrError(f"{output.path} would be written twice, for {seen[output.path]} and for {lr_path}: "
                                 "rename an input or a reference, or run them apart")
            seen[output.path] = lr_path


def output_names(plan, stem: str) -> list:
    """Every file the input of `stem` gives, by the naming rules alone."""
    opt = plan.opt
    base = plan.folder / f"{stem}_x{opt.scale}"
    if opt.sheet:
        outputs = [Output(plan.single or Path(f"{base}_sheet{plan.ext}"), "sheet")]
    else:
        outputs = [Output(plan.single or Path(f"{base}{'_' + v.suffix if v.suffix else ''}{plan.ext}"), "image", v)
                   for v in plan.variants]
    if opt.match_map:
        outputs.append(Output(Path(f"{base}_match_map.png"), "map", fields=plan.variants[-1].fields | {"map": True}))
    if opt.animate:
        walk = {k: v for k, v in plan.variants[0].fields.items() if k != "frame"}
        outputs.append(Output(Path(f"{base}_walk.{opt.animate}"), "animation", fields=walk | {"animate": opt.animate}))
    return outputs


def others_sidecars(plan, stem: str) -> list:
    """(path, provenance fields) of each sidecar name of `stem` this run does not write (its images' map without
    --match-map, a walk's animation without --animate, or of the other format): one there is another run's."""
    opt, base = plan.opt, plan.folder / f"{stem}_x{plan.opt.scale}"
    found = []
    match = next((v for v in plan.variants if v.suffix == "match"), None)
    if match is not None and not opt.match_map:
        found.append((Path(f"{base}_match_map.png"), match.fields | {"map": True}))
    if opt.walk is not None and not opt.sheet:
        walk = {k: v for k, v in plan.variants[0].fields.items() if k != "frame"}
        found += [(Path(f"{base}_walk.{fmt}"), walk | {"animate": fmt}) for fmt in ("gif", "webp")
                  if fmt != opt.animate]
    return found


def check_others_sidecars(plan, stem: str, outputs: list, record: dict) -> None:
    """Refuse to write images anew beside a sidecar of theirs this run does not write, unless it tells of these very
    images: it would be left telling of another run's (other references, other seeds). A sidecar of other files
    (another --format's, or beside the folder's images where -o names one file) is not theirs, nor is a file that
    holds no record of refsr's, or one of an image, not a sidecar."""
    if plan.single is not None or not any(o.todo and o.kind == "image" for o in outputs):
        return
    for path, fields in others_sidecars(plan, stem):
        told = record_of(path) if os.path.isfile(path) else None
        # Not a sidecar at all (no "map" or "animate" key): another image of refsr's that took the name (an output of
        # --ref match_map.png).
        if told is None or told.get("format", "png") != record.get("format") or not {"map", "animate"} & set(told):
            continue
        if not same_record(told, record | fields, {"match_map", "tile"}):
            what = "map" if "map" in fields else "animation"
            flag = "--match-map" if "map" in fields else f"--animate {fields['animate']}"
            raise RefsrError(f"{path}: another run's {what} of these images, which this run writes anew without "
                             f"one: it would tell of other images than theirs; move it away, or give {flag} too")


def outputs_of(plan, stem: str) -> list:
    """Every file the input of `stem` gives, under the output rules (see the module's docstring)."""
    opt = plan.opt
    outputs = output_names(plan, stem)
    for output in outputs:
        if len(os.fsencode(output.path.name)) > NAME_MAX:  # (fsencode: a name that is not UTF-8 is bytes too)
            raise RefsrError(f"{output.path}: a name of {len(os.fsencode(output.path.name))} bytes, more than the "
                             f"{NAME_MAX} a file name may hold; rename the input, or give -o FILE")
        if output.path.resolve() in plan.passed_in:
            raise RefsrError(f"{output.path} is an input of this run; refsr never overwrites its inputs")
        if output.path.exists() and not output.path.is_file():  # --overwrite would replace /dev/null itself
            raise RefsrError(f"{output.path}: not a regular file (a folder, device or FIFO); refsr writes only files")
        if os.path.lexists(output.path):  # a dangling link too: replaced only with --overwrite, as a file is
            if opt.skip_existing:
                output.todo = False
            elif not opt.overwrite:
                raise RefsrError(f"{output.path} exists (use --overwrite to replace, or --skip-existing)")
    return outputs


def check_sidecars(outputs: list, record: dict, written_too: bool = False) -> None:
    """A sidecar (a walk's animation, a --match-map map) tells of this run's images, so the two must agree. Beside a
    sidecar that is written, an image --skip-existing keeps must be this very image (its provenance is what this run
    would record), not another run's (other seeds or references, other weights) nor a file of the user's that took
    its name; with `written_too`, the images this run wrote as well (checked again just before an animation is made
    of the files: one replaced meanwhile is not taken). And a sidecar --skip-existing keeps beside images this run
    writes must be this run's too."""
    images = [o for o in outputs if o.kind == "image"]
    # A GPU out-of-memory retry halves the tile within one run: a walk's frames this run made before the retry and
    # after it are still this walk's (each record gives its own tile). One an earlier run made with another --tile
    # is not (at a small --tile-pad, tiles change more than the last grey level): the sidecar's record, and its
    # redo, give this run's.
    for sidecar in (o for o in outputs if o.kind in ("animation", "map")):
        if sidecar.todo:
            # An image made without --match-map is the same image: a map may be added beside it later.
            ignoring = {"match_map"} if sidecar.kind == "map" else set()
            for image in images:
                if (written_too or not image.todo) and not holds(image.path, record | image.variant.fields,
                                                                 ignoring | ({"tile"} if image.todo else set())):
                    what = (f"frame {image.variant.fields['frame']} of this walk" if sidecar.kind == "animation"
                            else "the image this run would write")
                    how = "kept by --skip-existing" if not image.todo else "changed since this run wrote it"
                    raise RefsrError(f"{image.path}: {how}, but not {what} (another run's, or not refsr's); "
                                     f"{sidecar.path.name} tells only of this run's images: move it away, or "
                                     "--overwrite")
        elif any(image.todo for image in images) and not holds(sidecar.path, record | sidecar.fields):
            raise RefsrError(f"{sidecar.path}: kept by --skip-existing, but it tells of another run's images, and "
                             "this run writes them anew: move it away, or --overwrite")


def holds(path: Path, provenance: dict, ignoring: set = frozenset()) -> bool:
    """Whether the file at `path` holds this provenance, but for the keys `ignoring`."""
    found = record_of(path)
    return found is not None and same_record(found, provenance, ignoring)


def record_of(path: Path) -> dict | None:
    """The refsr record a file holds, or None (none, or not a file refsr reads)."""
    try:
        found = read_provenance(path)
    except (OSError, ValueError, SyntaxError):
        return None
    return found if isinstance(found, dict) else None


def same_record(found: dict, provenance: dict, ignoring: set = frozenset()) -> bool:
    """Whether a record read back is this provenance (as it reads back: lists, not tuples), but for `ignoring`."""
    expected = json.loads(json.dumps(provenance))
    return {k: v for k, v in found.items() if k not in ignoring} == {k: v for k, v in expected.items()
                                                                     if k not in ignoring}
