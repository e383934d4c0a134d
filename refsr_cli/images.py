"""Image files: finding them (files, folders, globs), reading them as float tensors, writing them atomically."""
import glob
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import RefsrError
from .files import atomic_path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def list_images(folder) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        raise RefsrError(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def expand_inputs(specs) -> list:
    """Files as given, folders as their images (sorted, not recursive), globs as their matches, in order,
    without repeats."""
    found = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            matches = list_images(path)
            if not matches:
                raise RefsrError(f"{spec}: folder has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif path.exists():
            matches = [path]
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec) if Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise RefsrError(f"{spec}: no image matches this pattern")
        else:
            raise RefsrError(f"{spec}: no such file or folder")
        found += [m for m in matches if m not in found]
    return found


def unique_stems(paths) -> list:
    """A name for each path: its stem, or where stems collide, its parent folders joined to it until unique."""
    names = [p.stem for p in paths]
    depth = 1
    while len(set(names)) < len(names) and depth < 16:
        counts = {n: names.count(n) for n in names}
        names = [n if counts[n] == 1 else "-".join(p.resolve().parts[-depth - 1:-1] + (p.stem,))
                 for n, p in zip(names, paths)]
        depth += 1
    return names


def read_rgb(path) -> np.ndarray:
    """HxWx3 float32 in [0, 1], EXIF orientation applied."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise RefsrError(f"{path}: not an image, or not a format Pillow reads") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise RefsrError(f"{path}: cannot read image ({e.strerror if isinstance(e, OSError) and e.strerror else e})") from None


def write_image(array: np.ndarray, path) -> None:
    """Save HxWx3 uint8 through a temporary file in the target folder, renamed into place when complete."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
