"""Files: writing them so that nothing is ever half-written (a temporary file beside the target, renamed when
complete), and their sha256 for provenance and model cards."""
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # once, at import: os.umask can only be read by setting it


@contextmanager
def atomic_path(path):
    """Yields a temporary path in the target's folder; on success it is renamed to `path` (an atomic replace on
    the same file system), on any error or interruption it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{path.suffix}.tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the name is: no empty file after a power cut
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 files; give the permissions a plain open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256_of(path) -> str | None:
    """The hex sha256 of a file's bytes (None for None), read in 1 MiB blocks."""
    import hashlib
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
