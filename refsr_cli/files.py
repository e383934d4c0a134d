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


class AppearedMeanwhile(FileExistsError):
    """The target of an exclusive write (replace=False) was created by someone else while it was being written."""


def held_folder(folder: Path) -> int | None:
    """A descriptor of `folder`, for atomic_path: should the folder be renamed or moved while a file is written into
    it (the write then fails), the temporary is still removed from it, wherever it went, not looked for under the
    old name. None where the system cannot remove a file through one (Windows) or the folder cannot be opened."""
    if os.unlink not in os.supports_dir_fd:
        return None
    try:
        return os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a folder that can be written to but not read (mode -wx): mkstemp says what is wrong, if anything
        return None


@contextmanager
def atomic_path(path, replace: bool = True):
    """Yields a temporary path in the target's folder; on success it becomes `path`, on any error or interruption it
    is removed. `replace`: an atomic rename over whatever is there; else an exclusive hard link, which fails
    (AppearedMeanwhile) when a file of that name appeared meanwhile (another process writing into the same folder):
    a check made before the work began cannot see it."""
    path = Path(path)
    folder = held_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{short_stem(path)}.", suffix=f"{path.suffix}.tmp", dir=path.parent)
    except BaseException:
        if folder is not None:
            os.close(folder)
        raise
    try:
        os.close(fd)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # the data is on disk before the name is: no empty file after a power cut
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600 files; give the permissions a plain open() would
        if replace:
            os.replace(tmp, path)
        else:
            publish_exclusively(tmp, path)
    except BaseException:
        try:
            if folder is not None:
                os.unlink(os.path.basename(tmp), dir_fd=folder)
            else:
                os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    finally:
        if folder is not None:
            os.close(folder)


NAME_MAX = 255  # bytes in one file name: Linux's, macOS's and Windows' file systems alike


def short_stem(path: Path) -> str:
    """The stem of the temporary name of `path` (".{stem}.XXXXXXXX{suffix}.tmp"), cut so that the temporary name
    fits in a file name wherever `path` itself does (a 250-byte stem). Cut by bytes, never within a character."""
    room = NAME_MAX - len(os.fsencode(f"..XXXXXXXX{path.suffix}.tmp"))
    return os.fsdecode(os.fsencode(path.stem)[:max(room, 1)].decode(errors="ignore").encode())


def publish_exclusively(tmp: str, path: Path) -> None:
    """`tmp` under the name `path` only if no file has that name: a hard link (atomic, and refused when the name
    exists), then the temporary name removed. A file system without hard links gets a rename after a last check."""
    appeared = AppearedMeanwhile(f"{path} appeared while it was being written (another process?); it is kept")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise appeared from None
    except OSError:  # no hard links here (some network and FAT file systems)
        if path.exists():
            raise appeared from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def read_unchanged(path, read):
    """read(path), and the sha256 of the file it read: hashed before and after, so that a file replaced while it
    was read (another process saving it) is refused rather than recorded under the other file's hash (whose redo
    would make another image)."""
    from .errors import RefsrError
    # And which file it is, as written: a file replaced and then replaced back with the same bytes (a script saving
    # two models in turn) passed the hash, with the other file's tensors read in between, recorded under this hash.
    identity = file_identity(path)
    before = sha256_of(path)
    value = read(path)
    if sha256_of(path) != before or file_identity(path) != identity:
        raise RefsrError(f"{path}: changed while it was read (another process saving it?); run again")
    return value, before


def file_identity(path) -> tuple | None:
    """(device, inode, size, modification time) of the file at `path`, or None when there is none: another file put
    there, or this one written in place, changes it (reading it does not)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def sha256_of(path) -> str | None:
    """The hex sha256 of a file's bytes (None for None), read in 1 MiB blocks; a RefsrError naming the file when it
    is not a regular file or cannot be read. Opened without waiting and then asked what it is: a file that became a
    FIFO since it was listed (another process) hung the batch in open(), and a read's EIO carries no file name (it
    was reported as stdout's)."""
    return None if path is None else hexdigest_of(path, "sha256")


def git_sha1_of(path) -> str:
    """The git blob sha1 of a file (as `git hash-object`: the Hub's ETag of a file not stored with LFS)."""
    return hexdigest_of(path, "sha1", git_blob=True)


def hexdigest_of(path, algorithm: str, git_blob: bool = False) -> str:
    """sha256_of's reading, for any hashlib algorithm; with `git_blob`, of git's "blob SIZE\0" header and the bytes."""
    import hashlib
    import stat
    from .errors import RefsrError
    digest = hashlib.new(algorithm)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # (no effect on a regular file's reads)
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):  # asked of the descriptor: open(fd) of a folder raised an error naming "3"
        os.close(fd)
        raise RefsrError(f"{path}: {'is a folder' if stat.S_ISDIR(status.st_mode) else 'not a regular file'}")
    if git_blob:
        digest.update(b"blob %d\0" % status.st_size)
    with open(fd, "rb") as f:
        try:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        except OSError as e:  # a failing disk, a file of /proc
            raise RefsrError(f"{path}: cannot be read ({e.strerror or e})") from None
    return digest.hexdigest()


def safetensors_name(path) -> str:
    """`path` as safetensors' Rust code opens it: a str that is valid UTF-8, else a RefsrError saying so. A name
    that is not (bytes of another encoding, as os.fsdecode gives them) was said to be "not a readable safetensors
    checkpoint"."""
    from .errors import RefsrError
    name = os.fspath(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise RefsrError(f"{path}: safetensors can open only file names that are valid UTF-8, and this one is not; "
                         "rename it (or its folder)") from None
    return name
