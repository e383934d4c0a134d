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
        outputs.append(Output(Path(f"{base}_match_map.png"), "map"))
    if opt.animate:
        outputs.append(Output(Path(f"{base}_walk.{opt.animate}"), "animation"))
    return outputs


def outputs_of(plan, stem: str) -> list:
    """Every file the input of `stem` gives, under the output rules (see the module's docstring)."""
    opt = plan.opt
    outputs = output_names(plan, stem)
    for output in outputs:
        if len(output.path.name.encode()) > NAME_MAX:
            raise RefsrError(f"{output.path}: a name of {len(output.path.name.encode())} bytes, more than the "
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


def check_kept_images(outputs: list, record: dict) -> None:
    """A sidecar (a walk's animation, a --match-map map) tells of this run's images: an image --skip-existing keeps
    beside one that is written must be this very image (its provenance is what this run would record), not another
    run's (other seeds or references, other weights) nor a file of the user's that took its name."""
    sidecar = next(o for o in outputs if o.kind in ("animation", "map") and o.todo)
    for output in outputs:
        if output.kind != "image" or output.todo:
            continue
        expected = json.loads(json.dumps(record | output.variant.fields))  # as it reads back: lists, not tuples
        try:
            kept = read_provenance(output.path)
        except (OSError, ValueError, SyntaxError):
            kept = None
        if kept != expected:
            what = (f"frame {output.variant.fields['frame']} of this walk" if sidecar.kind == "animation"
                    else "the image this run would write")
            raise RefsrError(f"{output.path}: kept by --skip-existing, but not {what} (another run's, or not "
                             f"refsr's); {sidecar.path.name} tells only of this run's images: move it away, or "
                             "--overwrite")
