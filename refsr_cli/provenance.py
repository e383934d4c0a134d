"""Provenance: what every file refsr writes records of how it was made, and the command that makes it again.

Torch-free: `refsr info` reads records and prints redo commands without loading a network. A record is a flat JSON
object (see RECORD_TYPES); images.write_picture and write_animation store it in the file, read_provenance reads it
back (with Pillow alone: no numpy either).
"""
import json
import shlex

from .options import (MAX_CONSISTENCY_STEPS, MAX_FLAG_INT, MAX_SEED, MAX_SHEET_TILES, MAX_STRENGTH, MAX_TEMPERATURE,
                      MAX_WALK_FRAMES, MIN_TILE, OUTPUT_FORMATS, SCALES, TEXTURES, BatchOptions)
from .report import ESCAPES

SOFTWARE = "refsr"  # the Software tag of every output: how a folder's earlier outputs are told from its inputs
PROVENANCE_KEY = "refsr"  # the PNG text chunk that holds an output's provenance


def software_tag() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"{SOFTWARE} {version('refsr')}"
    except PackageNotFoundError:
        return SOFTWARE


def read_provenance(path) -> dict | None:
    """The provenance refsr wrote into an output (see images.write_picture and write_animation), or None."""
    from pathlib import Path

    from PIL import Image
    if Path(path).exists() and not Path(path).is_file():
        raise OSError("not a regular file")  # a FIFO would be waited on forever
    Image.MAX_IMAGE_PIXELS = None  # refsr's own 8x outputs are large; only the header and text chunks are read
    with Image.open(path) as im:
        text = embedded_text(im, PROVENANCE_KEY, 0x010E)  # PNG text chunk, EXIF ImageDescription, GIF comment
    try:
        data = json.loads(text, parse_int=record_int) if isinstance(text, str) else None
    except DamagedRecord:
        raise
    except ValueError:
        return None
    except RecursionError:  # JSON nested thousands deep: not a record refsr wrote
        raise DamagedRecord("its refsr record is nested too deep to be one refsr wrote") from None
    return data if isinstance(data, dict) and "refsr" in data else None


def check_written_as(record: dict, path) -> None:
    """DamagedRecord when a checked record describes a file of another format than the one at `path` (a PNG whose
    record says --format tiff: its redo writes a TIFF), or one image where the file is an animation."""
    from PIL import Image
    if "animate" in record:
        expected = record["animate"].upper()  # GIF, WEBP
    elif "map" in record:
        expected = "PNG"  # a --match-map is a PNG whatever the images' --format
    else:  # (records older than their "format" key are not asked)
        expected = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "tiff": "TIFF", None: None}[record.get("format")]
    with Image.open(path) as im:
        found, frames = im.format, getattr(im, "n_frames", 1)
    if expected is not None and found != expected:
        raise DamagedRecord(f"its refsr record describes a {expected} file, and this one is a {found}")
    if frames > 1 and "animate" not in record:  # (not the other way: libwebp may merge an animation's like frames)
        raise DamagedRecord("its refsr record describes one image, and this file "
                            f"{f'has {frames} pages' if found == 'TIFF' else 'is an animation'}")


def record_int(digits: str) -> int:
    """An integer of a record, refused past 40 digits (2^64 has 20): Python's int() refuses 4300 and more with a
    ValueError that would read as 'no record at all'."""
    if len(digits.lstrip("-")) > 40:
        raise DamagedRecord(f"its refsr record holds a number of {len(digits)} digits, which no flag takes")
    return int(digits)


def embedded_text(im, png_key: str, exif_tag: int):
    """A text refsr embeds in its outputs: a PNG text chunk, an EXIF tag (JPEG, WebP, TIFF), or for a GIF, whose
    only place for text is its comment, the comment (which holds the provenance JSON)."""
    text = im.info.get(png_key) or im.getexif().get(exif_tag)
    if text is None and isinstance(im.info.get("comment"), bytes):
        comment = im.info["comment"].decode("latin-1")
        try:
            record = json.loads(comment)
        except (ValueError, RecursionError):
            return None
        if isinstance(record, dict) and isinstance(record.get("refsr"), str):
            text = record["refsr"] if png_key == "Software" else comment
    return text


# The keys a record may hold and their JSON types. "command" says which refsr command wrote the file; the run's keys
# are in every record, the others where they apply.
RUN_KEYS = {"refsr": str, "command": str, "scale": int, "temperature": (int, float), "weights": str,
            "weights_sha256": (str, type(None)), "tile": int, "tile_pad": int, "consistency_steps": int,
            "input": str, "input_sha256": str}
RECORD_TYPES = RUN_KEYS | {
    "seed": int,  # the draw (temperature > 0) and the grain
    "texture": str, "strength": (int, float),  # where the detail came from (absent: the learned branch), how much
    "format": str,  # the images' --format (absent: png)
    "max_pixels": int,  # the --max-pixels the input passed (absent in older records: the default)
    "device": str, "half": bool,  # a GPU's run (absent: the CPU), in float16 (absent: float32)
    "reference": str, "reference_sha256": str,  # upscale --ref: one output per reference
    "references": list, "references_sha256": list, "match_map": bool,  # upscale --match [--match-map]
    "map": bool,  # the --match-map image itself
    "frame": int, "frames": int, "from": dict, "to": dict, "animate": str,  # walk: frame i of n between two ends
    "sheet": list, "seeds": list, "reference_list": list,  # a contact sheet: its labels, and what its tiles are
}
WALK_END_KEYS = {"reference", "reference_sha256", "seed"}
LIST_ITEMS = {"references": str, "references_sha256": str, "sheet": str, "seeds": int, "reference_list": str}
# What the flags a redo command passes them to accept: a record holding anything else (nan, -3, 1e308, --scale 3)
# would print a command that does something else, or that refsr refuses.
BOUNDS = {"temperature": (0, MAX_TEMPERATURE), "strength": (0, MAX_STRENGTH), "seed": (0, MAX_SEED),
          "seeds": (0, MAX_SEED), "tile": (MIN_TILE, MAX_FLAG_INT), "tile_pad": (0, MAX_FLAG_INT),
          "consistency_steps": (0, MAX_CONSISTENCY_STEPS), "frames": (2, MAX_WALK_FRAMES),
          "frame": (0, MAX_WALK_FRAMES - 1), "max_pixels": (1, MAX_FLAG_INT)}
CHOICES = {"scale": SCALES, "texture": TEXTURES, "animate": ("webp", "gif"), "format": OUTPUT_FORMATS,
           "device": ("cuda", "mps")}


class DamagedRecord(ValueError):
    """A provenance record that lacks a key it needs, or holds a value of the wrong type."""


def check(record: dict) -> dict:
    """The record, if it has every run key and each key it has is of its type; else DamagedRecord naming the key."""
    for key in RUN_KEYS:
        if key not in record:
            raise DamagedRecord(f"its refsr record lacks {key!r}")
    for key, value in record.items():
        kind = RECORD_TYPES.get(key)
        if kind is None:  # a "redo" or "file" key would print beside (info) or over (info --json) the real one
            raise DamagedRecord(f"its refsr record holds {short(key)}, a key refsr does not write")
        if not of_type(value, kind):
            raise DamagedRecord(f"its refsr record's {key!r} is {short(value)}")
        if key in LIST_ITEMS and not all(of_type(item, LIST_ITEMS[key]) for item in value):
            raise DamagedRecord(f"its refsr record's {key!r} holds {short(value)}")
        if key in BOUNDS and not all(BOUNDS[key][0] <= v <= BOUNDS[key][1] for v in
                                     (value if isinstance(value, list) else [value])):  # nan fails both
            raise DamagedRecord(f"its refsr record's {key!r} is {short(value)}, outside {BOUNDS[key]}")
        if key in CHOICES and value not in CHOICES[key]:
            raise DamagedRecord(f"its refsr record's {key!r} is {short(value)}, not one of {CHOICES[key]}")
    for end in (record.get("from"), record.get("to")):
        # A walk end is a reference (named as `walk --ref` named it, with its sha256), or else a seed; with no key of
        # its own, and each of its keys of the type the top level's is (a seed end's sha256 was shown, and dropped).
        if end is not None and not (set(end) <= WALK_END_KEYS and (
                of_type(end["reference"], str) if "reference" in end
                else "reference_sha256" not in end and "seed" in end)
                and of_type(end.get("reference_sha256", ""), str)
                and ("seed" not in end or of_type(end["seed"], int) and 0 <= end["seed"] <= MAX_SEED)):
            raise DamagedRecord(f"its refsr record's walk end {short(end)} is neither a seed nor a reference")
    for key, name in file_names(record):
        # No file has such a name: the redo would name another (bash ends a word at a NUL) or be refused.
        if not name.strip() or "\0" in name:
            raise DamagedRecord(f"its refsr record's {key!r} names no file ({short(name)})")
    combination = contradiction(record)
    if combination:
        raise DamagedRecord(f"its refsr record holds {combination}, which no refsr command writes")
    return record


# Keys that only some commands' records hold: another's would have its redo drop them (a --match map redone as a
# plain image) or be refused.
ONLY_IN = {"frame": ("walk",), "frames": ("walk",), "from": ("walk",), "to": ("walk",), "animate": ("walk",),
           "references": ("upscale",), "references_sha256": ("upscale",), "match_map": ("upscale",),
           "map": ("upscale",), "seeds": ("sample",), "reference_list": ("upscale", "sample"),
           # A walk's references and seeds are its ends' (from, to): one beside them was shown, and its redo dropped it.
           "reference": ("upscale", "sample"), "reference_sha256": ("upscale", "sample"), "seed": ("upscale", "sample")}


def file_names(record: dict) -> list:
    """(key, name) of every file a record names: the input, weights and references, a walk's ends' included."""
    names = [(key, record[key]) for key in ("input", "weights", "reference") if key in record]
    names += [(key, name) for key in ("references", "reference_list") for name in record.get(key, [])]
    return names + [(key, record[key]["reference"]) for key in ("from", "to") if "reference" in record.get(key, {})]


def contradiction(record: dict) -> str | None:
    """What a record holds together that no command line gives (its redo command would be refused), or None."""
    if "references" in record and (not record["references"] or record["temperature"] > 0
                                   or len(record["references"]) != len(record.get("references_sha256", []))):
        return "--match without references, with a temperature, or without their sha256"
    # (The redo names the files: a hash or a --match-map of none was dropped from it without a word.)
    if {"match_map", "references_sha256"} & set(record) and "references" not in record:
        return "--match's map or references' sha256 without its references"
    if "reference_sha256" in record and "reference" not in record:
        return "a reference's sha256 without the reference"
    if "reference" in record and {"references", "reference_list"} & set(record):  # (the redo names those alone)
        return "one reference beside --match's references or a sheet's list of references"
    if "animate" in record and "sheet" in record:
        return "an animation and a contact sheet"
    if record.get("half") and "device" not in record:  # --half is refused on the CPU: its runs record a GPU
        return "--half on the CPU"
    command = record["command"]
    owned = [key for key in sorted(set(record) & set(ONLY_IN)) if command not in ONLY_IN[key]]
    if owned:
        return f"{owned[0]!r} in a record of {command!r}"
    if "frame" in record and ("sheet" in record or "animate" in record or record["frame"] >= record.get("frames", 0)):
        return "a walk's frame in a contact sheet or an animation, or past the walk's frames"
    seeds = record.get("seeds")
    if seeds is not None and (not seeds or record.get("seed", seeds[0]) != seeds[0]):  # (the redo's --n, --seed)
        return "a sheet's seeds that are none, or that do not start at its --seed"
    if seeds and seeds != list(range(seeds[0], seeds[0] + len(seeds))):
        return "seeds that are not --seed, --seed + 1, ..."  # sample --n N --seed S draws S .. S + N - 1
    if "map" in record and ("references" not in record or not record.get("match_map")):
        return "a --match-map without --match's references, or whose record says no --match-map"
    for key in ("references", "reference_list"):
        if len(set(record.get(key, []))) != len(record.get(key, [])):  # the redo's --ref named twice counts once
            return f"a reference named twice in its {key!r}"
    if "references" in record and "reference_list" in record:
        return "--match's references and a sheet's list of references"
    if "sheet" in record:  # one label a tile, as many tiles as its redo would make, and no more than --sheet takes
        if record.get("match_map") or "map" in record:
            return "a --match-map and a contact sheet"
        each = len(seeds or [0]) if command == "sample" else 1  # (sample --ref: --n draws of each reference)
        tiles = record.get("frames", 0) if command == "walk" else each * max(1, len(record.get("reference_list", [])))
        if len(record["sheet"]) != tiles or tiles > MAX_SHEET_TILES:
            return (f"a contact sheet of {len(record['sheet'])} labels for {tiles} tiles (--sheet takes at most "
                    f"{MAX_SHEET_TILES})")
    elif "seeds" in record or "reference_list" in record:
        return "a contact sheet's seeds or references without its labels"
    ends = [record.get("from"), record.get("to")]
    if all(isinstance(e, dict) for e in ends):
        if ("reference" in ends[0]) != ("reference" in ends[1]):
            return "a walk from a reference to a seed"
        if "reference" in ends[0] and any(end.get("seed", 0) != 0 for end in ends):  # (its redo drew seed 0)
            return "a walk between references with a seed (walk takes --ref or --seed, not both)"
        if "reference" not in ends[0] and record["temperature"] == 0:
            return "a walk between seeds at temperature 0"
        same = [key for key in (("reference", "reference_sha256") if "reference" in ends[0] else ("seed",))
                if key in ends[0] and ends[0][key] == ends[1].get(key)]
        if same:  # walk refuses one seed or reference given twice, by name or by content
            return "a walk from one end to itself"
    return None


def of_type(value, kind) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))  # JSON's true is no number


def short(value) -> str:
    """A value of a damaged record, cut to fit an error line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def number(value) -> str:
    """A float as a flag's value: short (1, not 1.0), and the very number (0.1234567, not %g's 0.123457)."""
    return f"{value:g}" if float(f"{value:g}") == value else repr(float(value))


def redo_command(record: dict) -> str:
    """The refsr command that makes the image a record describes again, run from the folder the original command
    ran in (the input, reference and weights files are named as it named them). It writes into the current folder
    under the naming rules (`-o` chooses another). DamagedRecord if the record cannot say."""
    check(record)
    command, temperature = record["command"], record["temperature"]
    words = ["refsr", command, path_word(record["input"])]
    if command == "walk":
        if not all(key in record for key in ("from", "to", "frames")):
            raise DamagedRecord("its refsr record of a walk lacks its ends or its number of frames")
        for end in (record["from"], record["to"]):
            words += ["--ref", path_word(end["reference"])] if "reference" in end else ["--seed", str(end["seed"])]
        words += ["--steps", str(record["frames"]), "--temperature", number(temperature)]
        if "animate" in record:
            words += ["--animate", record["animate"]]
    elif command == "sample":
        seeds = record.get("seeds") or [record.get("seed", 0)]
        words += ["--n", str(len(seeds)), "--seed", str(seeds[0]), "--temperature", number(temperature)]
        words += [w for r in references_of(record) for w in ("--ref", path_word(r))]
    elif command == "upscale":
        references = record.get("references") or references_of(record)
        words += [w for r in references for w in ("--ref", path_word(r))]
        if "references" in record:
            words += ["--match"] + (["--match-map"] if record.get("match_map") else [])
        if temperature > 0:
            words += ["--temperature", number(temperature)]
        if temperature > 0 or record.get("seed", 0) != 0:  # the draw, or the grain of a reference output
            words += ["--seed", str(record.get("seed", 0))]
    else:
        raise DamagedRecord(f"its refsr record's 'command' is {command!r}")
    textured = command != "upscale" or temperature > 0 or bool(references_of(record))
    if textured:  # records older than the analogy's have no "texture": theirs was the learned branch
        if record.get("texture", "learned") != BatchOptions.texture:
            words += ["--texture", record.get("texture", "learned")]
        if record.get("texture") == "analogy" and record.get("strength", BatchOptions.strength) != BatchOptions.strength:
            words += ["--strength", number(record["strength"])]
    if "sheet" in record:
        words += ["--sheet"]
    if record.get("format", "png") != "png":
        words += ["--format", record["format"]]
    words += ["--scale", str(record["scale"])]
    if "device" in record:
        words += ["--device", record["device"]]
    if record.get("half"):
        words += ["--half"]
    if record["weights"] != "shipped":
        words += ["--weights", path_word(record["weights"])]
    for flag, key in (("--tile", "tile"), ("--tile-pad", "tile_pad"), ("--consistency-steps", "consistency_steps"),
                      ("--max-pixels", "max_pixels")):
        if record.get(key, getattr(BatchOptions, key)) != getattr(BatchOptions, key):  # what differs from the default
            words += [flag, str(record[key])]
    return " ".join(map(shell_word, words))


def shell_word(word: str) -> str:
    """`word` quoted for a shell: shlex's quotes, or, for a name holding a control character (a newline), a line
    break or a byte that is not UTF-8, the $'...' quotes of bash and zsh, where the character is written as an
    escape, so that the command is one line (what `info` prints) that still names the file."""
    if not any(ord(c) in ESCAPES or 0xDC80 <= ord(c) <= 0xDCFF for c in word):
        # shlex leaves a leading "=" bare, and zsh reads =NAME as the path of the command NAME (=a.png: "a.png not
        # found"; =python: /usr/bin/python). Bare, the word holds no quote.
        return f"'{word}'" if word.startswith("=") and shlex.quote(word) == word else shlex.quote(word)
    # (A line break past ASCII as its UTF-8 bytes, \xc2\x85: bash reads \u0085 as those bytes only in a UTF-8 locale,
    # and as the text "\u0085" under LC_ALL=C, as cron and many containers run.)
    escaped = "".join("".join(f"\\x{b:02x}" for b in c.encode()) if ord(c) in ESCAPES
                      # a byte of a name that is not UTF-8 (os.fsdecode's surrogate): that byte, as \xE9
                      else f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF
                      else {"\\": "\\\\", "'": "\\'"}.get(c, c) for c in word)
    return f"$'{escaped}'"


def path_word(path: str) -> str:
    """A file's name as a word of a command line: one that starts with a dash (-weird.png) would be read as an option,
    ./-weird.png is the same file. (A Hub reference never starts with one.)"""
    return f"./{path}" if path.startswith("-") else path


def references_of(record: dict) -> list:
    """The --ref files of a record of one output per reference (or of their contact sheet): not --match's."""
    return record.get("reference_list") or ([record["reference"]] if "reference" in record else [])


def sheet_labels(tiles: list, temperature: float) -> list:
    """sheet_label of each tile's fields; references of one name (d1/r.png, d2/r.png) named with the nearest folders
    that tell them apart."""
    from pathlib import PurePath
    paths = [PurePath(f["reference"]) for f in tiles if "reference" in f]

    def told_apart(path):
        same = [p.parts for p in set(paths) if p.name == path.name]
        depth = next((d for d in range(1, len(path.parts)) if sum(s[-d:] == path.parts[-d:] for s in same) == 1),
                     len(path.parts))
        return "/".join(path.parts[-depth:])

    return [sheet_label(f, temperature, told_apart(PurePath(f["reference"])) if "reference" in f else None)
            for f in tiles]


def sheet_label(fields: dict, temperature: float, reference: str | None = None) -> str:
    """What a contact-sheet tile is, as the flag that redoes it: --seed N, --ref NAME (`reference`, else the
    reference's file name), a walk's frame, or T = 0."""
    from pathlib import Path
    if "frame" in fields:
        return f"frame {fields['frame'] + 1}/{fields['frames']}"
    if "references" in fields:
        return "--match"
    if "reference" in fields:
        name = reference or Path(fields["reference"]).name
        return f"--ref {name}" + (f" --seed {fields['seed']}" if fields.get("seed") else "")
    if "seed" in fields and temperature > 0:
        return f"--seed {fields['seed']}" + (f" T={temperature:g}" if temperature != 1 else "")
    return "T=0 (fidelity)"
