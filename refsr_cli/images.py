"""Image files: finding them (files, folders, globs), reading what people actually have (alpha, grayscale, palette,
CMYK, 16-bit PNG, EXIF orientation, ICC profiles, animations), and writing results atomically in the same kind."""
import glob
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import OutOfMemory, RefsrError, name_trouble
from .files import atomic_path
from .options import DEFAULT_MAX_PIXELS
from .provenance import PROVENANCE_KEY, SOFTWARE, embedded_text, software_tag

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# What refsr writes: formats with a place for its record (a PNG text chunk, EXIF). A BMP has none, so refsr could
# not tell its own output from a photo (it would upscale its outputs again, and eval and train take them as photos).
FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "tif": "TIFF", "tiff": "TIFF"}
MIN_SIDE = 4  # below this, bicubic resampling and back-projection have nothing to work with

# We check the pixel count ourselves, before decoding and with our own limit (--max-pixels).
Image.MAX_IMAGE_PIXELS = None


def list_images(folder) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        raise RefsrError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def source_images(folder) -> list:
    """The images of a folder that are not refsr's own outputs: the HR photos `eval` measures and `train` learns
    from (an output written into the folder is no photo; upscale leaves them out of its inputs too)."""
    return [p for p in list_images(folder) if not is_refsr_output(p)]


def is_refsr_output(path) -> bool:
    """Whether an image file was written by refsr (its Software tag), read from the header alone."""
    try:
        with Image.open(path) as im:
            software = embedded_text(im, "Software", 0x0131) or ""
    except Exception:  # unreadable files are reported when they are read as inputs
        return False
    return isinstance(software, str) and software.split(" ")[0] == SOFTWARE


def expand_inputs(specs, skip_outputs: bool = False) -> list:
    """Files as given, folders as their images (sorted, not recursive), globs as their matches, in order,
    without repeats. With `skip_outputs`, folders and globs leave out refsr's own outputs (`upscale dir/ -o dir/`
    run twice must not upscale its outputs again); a file named on its own is always taken."""
    found = []
    for spec in specs:
        try:
            matches = spec_images(spec, skip_outputs)
            known = {f.resolve() for f in found}
            found += [m for m in matches if m.resolve() not in known]
        except OSError as e:  # a name past the file system's limit
            raise RefsrError(f"{spec}: {e.strerror or e}") from None
        except RuntimeError as e:
            if not name_trouble(e):  # only Path.resolve's "Symlink loop" is the name's
                raise
            raise RefsrError(f"{spec}: a loop of symbolic links") from None
    return found


def spec_images(spec, skip_outputs: bool) -> list:
    """The images one name on the command line stands for (see expand_inputs)."""
    if not str(spec).strip():  # Path("") is the current folder: an empty shell variable would upscale it
        raise RefsrError(f"{str(spec)!r}: an empty name, not a file or folder")
    path = Path(spec)
    if path.is_dir():
        matches = list_images(path)
        if not matches:
            raise RefsrError(f"{spec}: folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    elif path.exists():
        if not path.is_file():  # a FIFO or a device: reading it would wait for a writer, forever
            raise RefsrError(f"{spec}: not a regular file")
        matches = [path]
    elif glob.has_magic(spec):
        matches = sorted(Path(p) for p in glob.glob(spec) if Path(p).suffix.lower() in IMAGE_SUFFIXES
                         and Path(p).is_file())
        if not matches:
            raise RefsrError(f"{spec}: no image matches this pattern")
    elif path.is_symlink():
        raise RefsrError(f"{spec}: a link to nothing (or a loop of links)")
    else:
        raise RefsrError(f"{spec}: no such file or folder")
    if skip_outputs and matches != [path]:
        matches = [m for m in matches if not is_refsr_output(m)]
        if not matches:
            raise RefsrError(f"{spec}: holds only refsr outputs, no image of its own" if path.is_dir() else
                             f"{spec}: matches only refsr outputs, no image of their own (name one to take it)")
    return matches


def unique_stems(paths) -> list:
    """A file-name-safe name for each path: its stem; where stems collide, the nearest parent folders that tell
    them apart joined to it (day/beach.png and night/beach.png: day-beach, night-beach), never the folders they share,
    so that a name does not depend on where the files are mounted; where no folder tells them apart (a.png and a.jpg
    side by side), the suffix; then a counter."""
    names = [p.stem for p in paths]
    for stem in {n for n in names if names.count(n) > 1}:
        group = [i for i, n in enumerate(names) if n == stem]
        folders = [paths[i].resolve().parent.parts for i in group]
        shared = len(os.path.commonprefix(folders))
        folders = [f[shared:] for f in folders]
        tagged = lambda depth: ["-".join(f[len(f) - min(depth, len(f)):] + (stem,)) for f in folders]
        deepest = max(len(f) for f in folders)
        depth = next((d for d in range(1, deepest) if len(set(tagged(d))) == len(group)), deepest)
        for i, name in zip(group, tagged(depth)):
            names[i] = name
    names = [f"{n}-{p.suffix.lstrip('.')}" if names.count(n) > 1 else n for n, p in zip(names, paths)]
    seen = {}
    for i, n in enumerate(names):
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            names[i] = f"{n}-{seen[n]}"
    return names


@dataclass
class Picture:
    """An image as the model sees it (RGB in [0, 1]) plus what must survive into the output."""
    rgb: np.ndarray  # HxWx3 float32
    alpha: np.ndarray | None = None  # HxW float32, or None
    grayscale: bool = False
    bits: int = 8  # 8, or 16 for 16-bit PNG
    icc_profile: bytes | None = None
    warnings: list = field(default_factory=list)


def megapixels(count: int) -> str:
    """A pixel count as a message says it: 64 Mpx; 0.001 Mpx, not 0, for a small --max-pixels."""
    return f"{count / 1e6:,.0f} Mpx" if count >= 10 ** 7 else f"{count / 1e6:.3g} Mpx"


def exif_transpose(data: np.ndarray, orientation: int) -> np.ndarray:
    """HxWxC uint8 or uint16 pixels turned upright by Pillow's ImageOps.exif_transpose, plane by plane (16-bit
    colour PNGs are decoded by pypng, so there is no Pillow image of the whole to hand it)."""
    if orientation == 1:
        return data
    planes = []
    for c in range(data.shape[2]):
        plane = Image.fromarray(np.ascontiguousarray(data[..., c]))  # mode L or I;16
        plane.getexif()[0x0112] = orientation
        planes.append(np.asarray(ImageOps.exif_transpose(plane)))
    return np.stack(planes, axis=2)


def _png_bit_depth(path) -> int:
    """The bit depth in a PNG's IHDR chunk (Pillow reports 16-bit colour PNGs as 8-bit modes)."""
    with open(path, "rb") as f:
        head = f.read(25)
    return head[24] if len(head) == 25 and head[12:16] == b"IHDR" else 8


def _read_png16(path):
    """A 16-bit PNG as (HxWxC uint16, grayscale, has_alpha); Pillow would truncate it to 8 bits."""
    import png  # pypng: the one reader of 16-bit colour PNGs among our dependencies
    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    data = np.vstack([np.asarray(r, dtype=np.uint16) for r in rows]).reshape(height, width, info["planes"])
    if info["bitdepth"] < 16:  # an sBIT chunk: asDirect gave its depth (0..1023 for 10 bits), read as 16 it was black
        data = np.round(data.astype(np.float64) * (65535 / (2 ** info["bitdepth"] - 1))).astype(np.uint16)
    return data, info["greyscale"], info["alpha"]


def _high_depth_grey(path, values: np.ndarray) -> np.ndarray:
    """16-bit integer grey as it is; 32-bit integer grey if it fits 16 bits; float grey in [0, 1] at 16 bits.
    Anything else has no meaning an upscaler could guess (HDR, raw counts): refused rather than wrapped or clipped."""
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
            raise RefsrError(f"{path}: floating-point pixels outside [0, 1] (HDR or raw data); convert it to an 8- "
                             "or 16-bit image first")
        return np.round(values * 65535).astype(np.uint16)[..., None]
    if values.min() < 0 or values.max() > 65535:
        raise RefsrError(f"{path}: 32-bit integer pixels outside 0..65535; convert it to an 8- or 16-bit image first")
    return values.astype(np.uint16)[..., None]


def read_picture(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Picture:
    """Read an image for processing; every problem becomes a RefsrError naming the file and the reason."""
    try:
        return _read_picture(Path(path), max_pixels)
    except MemoryError as e:  # decoding it, or its float copy: a large image under a raised --max-pixels
        raise OutOfMemory(str(path), e) from None


def _read_picture(path: Path, max_pixels: int) -> Picture:
    if path.is_dir():
        raise RefsrError(f"{path}: is a folder, not an image")
    if path.exists() and not path.is_file():
        raise RefsrError(f"{path}: not a regular file")  # a FIFO would be waited on forever
    try:
        with Image.open(path) as im:  # reads the header only
            pixels = im.width * im.height
            if max_pixels and pixels > max_pixels:
                raise RefsrError(f"{path}: {im.width}x{im.height} is {megapixels(pixels)}, over the "
                                 f"{megapixels(max_pixels)} limit (upscale, sample and walk raise it with "
                                 "--max-pixels)")
            if min(im.size) < MIN_SIDE:
                raise RefsrError(f"{path}: {im.width}x{im.height} is too small (at least {MIN_SIDE}x{MIN_SIDE})")
            warnings = []
            if getattr(im, "n_frames", 1) > 1:
                what = f"{im.n_frames} pages" if im.format == "TIFF" else f"animated ({im.n_frames} frames)"
                warnings.append(f"{path}: {what}; only the first {'page' if im.format == 'TIFF' else 'frame'} is "
                                "upscaled")
            orientation = im.getexif().get(0x0112, 1)
            icc = im.info.get("icc_profile")
            mode = im.mode
            if im.format == "PNG" and _png_bit_depth(path) == 16:
                (data, grayscale, has_alpha), bits = _read_png16(path), 16
            else:
                im.seek(0)
                im.load()
                grayscale = mode in ("1", "L", "LA", "I", "I;16", "I;16B", "La", "F")
                has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info
                if mode == "CMYK":
                    warnings.append(f"{path}: CMYK converted to RGB without colour management")
                    icc = None  # a CMYK profile would be wrong on the RGB output
                if mode in ("I", "I;16", "I;16B", "F"):  # 16/32-bit integer or float grayscale (TIFF)
                    data, bits = _high_depth_grey(path, np.asarray(im)), 16
                else:
                    target = ("LA" if has_alpha else "L") if grayscale else ("RGBA" if has_alpha else "RGB")
                    data, bits = np.asarray(im.convert(target)), 8
                    data = data[..., None] if data.ndim == 2 else data
    except (RefsrError, MemoryError):
        raise
    except Exception as e:
        raise decode_trouble(path, e) from None

    data = exif_transpose(data, orientation)
    values = data.astype(np.float32)
    values /= 65535.0 if bits == 16 else 255.0  # in place: one float copy of a large image, not two
    colour = values[..., :1] if grayscale else values[..., :3]
    return Picture(rgb=np.repeat(colour, 3, axis=2) if grayscale else colour,
                   alpha=values[..., -1] if has_alpha else None,
                   grayscale=grayscale, bits=bits, icc_profile=icc, warnings=warnings)


def decode_trouble(path: Path, e: Exception) -> RefsrError:
    """The one line for an image file Pillow (or pypng) could not read."""
    if isinstance(e, UnidentifiedImageError):
        return RefsrError(f"{path}: not an image, or not a format Pillow reads")
    if isinstance(e, FileNotFoundError):
        return RefsrError(f"{path}: no such file")
    if isinstance(e, PermissionError):
        return RefsrError(f"{path}: permission denied")
    if isinstance(e, (OSError, ValueError, SyntaxError, struct.error, zlib.error, EOFError)):
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "MAX_TEXT_CHUNK" in reason:  # a whole image, with a text chunk larger than Pillow reads
            return RefsrError(f"{path}: holds a text chunk larger than Pillow reads ({reason})")
        return RefsrError(f"{path}: corrupt or truncated image ({reason})")
    return RefsrError(f"{path}: cannot decode image ({type(e).__name__}: {e})")  # pypng's png.Error and others


def read_rgb(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """HxWx3 float32 in [0, 1] (references: alpha and bit depth do not matter)."""
    return read_picture(path, max_pixels).rgb


# The longest side a format can hold: WebP's bitstream has 14 bits for it, JPEG's header 16 (libjpeg takes 65500),
# GIF's 16. PNG and TIFF hold any refsr writes.
MAX_SIDES = {"WEBP": 16383, "JPEG": 65500, "GIF": 65535}


def check_side(path, height: int, width: int) -> None:
    """Refuse, before any work, an output larger than its format can hold (an 8x WebP of a 2100-pixel photo)."""
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG")
    limit = MAX_SIDES.get(fmt)
    if limit is not None and max(height, width) > limit:
        raise RefsrError(f"{path}: {width}x{height} is more than {fmt} can hold ({limit} pixels a side); use PNG")


def output_format(path) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower().lstrip("."))
    if Path(path).suffix.lower() == ".bmp":
        raise RefsrError(f"{path}: a BMP file cannot hold refsr's record of how it was made; use .png (lossless)")
    if Path(path).suffix.lower() == ".gif":  # (walk -o anim.gif: the animation is asked for with --animate)
        raise RefsrError(f"{path}: refsr writes a GIF only as a walk's animation (--animate gif, beside its frames); "
                         f"name an image file or a folder (use one of {', '.join(sorted(FORMATS))})")
    if fmt is None:
        raise RefsrError(f"{path}: unknown output format (use one of {', '.join(sorted(FORMATS))})")
    return fmt


# zlib level 1, as OpenCV writes PNGs by default: half the time of Pillow's level 6 for about 10 % larger files.
# At level 6 writing a PNG took a third of an upscale (docs/benchmarks.md).
PNG_COMPRESS_LEVEL = 1


class _AfterHeader:
    """A file wrapper that passes writes through and slips `chunks` in right after the PNG signature and IHDR chunk
    (the first 33 bytes): where pypng's writer, which takes no ICC profile or text, would put nothing."""

    HEADER = 8 + 25

    def __init__(self, f, chunks):
        self.f, self.chunks, self.written = f, chunks, 0

    def write(self, data: bytes):
        if self.chunks is not None and self.written + len(data) >= self.HEADER:
            cut = self.HEADER - self.written
            self.f.write(data[:cut])
            import png
            for kind, content in self.chunks:
                png.write_chunk(self.f, kind, content)
            self.chunks, data, self.written = None, data[cut:], self.HEADER
        self.written += len(data)
        self.f.write(data)


def _write_png16(f, array: np.ndarray, icc: bytes | None, text: dict) -> None:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by channel count) written by pypng row by row, with the ICC
    profile and the text chunks after its header."""
    import png
    height, width, channels = array.shape
    writer = png.Writer(width, height, greyscale=channels <= 2, alpha=channels in (2, 4), bitdepth=16,
                        compression=PNG_COMPRESS_LEVEL)
    extra = [(b"iCCP", b"icc\x00\x00" + zlib.compress(icc))] if icc else []
    extra += [(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1")) for key, value in text.items()]
    # Big-endian bytes, one row at a time: pypng's packed 16-bit rows, without a second copy of the image.
    writer.write_packed(_AfterHeader(f, extra), (array[y].astype(">u2").tobytes() for y in range(height)))


def write_picture(array: np.ndarray, path, icc_profile: bytes | None = None, provenance: dict | None = None,
                  replace: bool = True) -> None:
    """Save HxWxC (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA; uint8, or uint16 for PNG) through a temporary file in the
    target folder, renamed into place when complete (with `replace` False, only if no file took the name meanwhile:
    files.atomic_path). Every file carries the Software tag and, when given, the
    provenance as JSON: a PNG text chunk `refsr`, or the EXIF ImageDescription of JPEG, WebP and TIFF."""
    text = {"Software": software_tag()}
    if provenance is not None:
        text[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)  # ASCII: fits tEXt and EXIF
    path = Path(path)
    fmt = output_format(path)
    channels = array.shape[2]
    if fmt == "JPEG" and channels in (2, 4):
        raise RefsrError(f"{path}: JPEG has no alpha channel; write PNG, WebP or TIFF to keep transparency")
    if provenance is not None:
        check_record(path, provenance)
    if array.dtype == np.uint16 and fmt != "PNG":
        array = (array // 257).astype(np.uint8)  # only PNG stores 16 bits here
    with atomic_path(path, replace) as tmp:
        if array.dtype == np.uint16:
            with open(tmp, "wb") as f:
                _write_png16(f, array, icc_profile, text)
        else:
            image = Image.fromarray(array[..., 0] if channels == 1 else array)
            options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
            if fmt == "PNG":
                options["compress_level"] = PNG_COMPRESS_LEVEL
            if icc_profile and fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
                options["icc_profile"] = icc_profile
            if fmt == "PNG":
                from PIL.PngImagePlugin import PngInfo
                options["pnginfo"] = PngInfo()
                for key, value in text.items():
                    options["pnginfo"].add_text(key, value)
            else:
                options["exif"] = exif_record(text)
            image.save(tmp, format=fmt, **options)


def exif_record(text: dict) -> bytes:
    """The EXIF of a JPEG, WebP or TIFF output: the Software tag, and the record as its ImageDescription."""
    exif = Image.Exif()
    exif[0x0131] = text["Software"]
    if PROVENANCE_KEY in text:
        exif[0x010E] = text[PROVENANCE_KEY]
    return exif.tobytes()


JPEG_MAX_EXIF = 65533  # bytes: one JPEG marker segment, less its length field (Pillow's MAX_BYTES_IN_MARKER)


def check_record(path, provenance: dict) -> None:
    """Refuse a JPEG whose record is more than its EXIF can hold (the names of hundreds of --match references on
    long paths): before any work with the run's record, exactly when writing."""
    if output_format(path) != "JPEG":
        return
    size = len(exif_record({"Software": software_tag(), PROVENANCE_KEY: json.dumps(provenance, sort_keys=True)}))
    if size > JPEG_MAX_EXIF:
        raise RefsrError(f"{path}: refsr's record of how it was made takes {size} bytes, more than a JPEG's EXIF "
                         f"holds ({JPEG_MAX_EXIF}); write PNG, WebP or TIFF (or give fewer references)")


# Pillow's GIF and WebP writers take every frame at once, so an animation's frames are all held until it is
# written: up to 8 bytes a pixel of each (noise frames of 800x800: GIF 5.0, WebP 7.5; bench/animation_memory.py).
ANIMATION_BYTES_PER_PIXEL = 8
ANIMATION_BUDGET = 1 << 32  # bytes: 16 frames of a 720x720 photo at 8x


def check_animation(path, frames: int, height: int, width: int) -> None:
    """Refuse, before any work, an animation whose frames would not fit ANIMATION_BUDGET."""
    need = frames * height * width * ANIMATION_BYTES_PER_PIXEL
    if need > ANIMATION_BUDGET:
        raise RefsrError(f"{path}: {frames} frames of {width}x{height} would take about {need / 2 ** 30:.1f} GiB of "
                         f"memory to animate, more than {ANIMATION_BUDGET >> 30} GiB; give fewer --steps, or leave "
                         f"out --animate (the frames are written without it)")


def write_animation(frames, path, provenance: dict, replace: bool = True) -> None:
    """The image files `frames`, in order, as one looping animated WebP or GIF (10 frames a second), written
    atomically. 8-bit RGB, whatever the frames' depth (a 16-bit grey frame is scaled, not clipped), with the Software
    tag and the provenance: in EXIF for WebP, in the comment for GIF."""
    path = Path(path)
    images = []
    for frame in frames:
        rgb = read_picture(frame, max_pixels=0).rgb  # refsr's own frames: no decompression-bomb limit
        images.append(Image.fromarray((rgb * 255).round().astype(np.uint8)))
    fmt = path.suffix.lstrip(".").upper()
    record = json.dumps(provenance | {"refsr": software_tag()}, sort_keys=True)
    if fmt == "WEBP":
        options = {"lossless": False, "quality": 90, "exif": exif_record({"Software": software_tag(),
                                                                          PROVENANCE_KEY: record})}
    else:
        options = {"comment": record.encode("latin-1")}
    with atomic_path(path, replace) as tmp:
        images[0].save(tmp, format=fmt, save_all=True, append_images=images[1:], duration=100, loop=0, **options)
