import errno
import re
from contextlib import contextmanager


class RefsrError(Exception):
    """A problem the user can fix (bad input, missing weights...): the CLI prints it as one line, no traceback."""


def shown(value: str) -> str:
    """A bad value as a message quotes it: cut, when it is long (5000 digits)."""
    return value if len(value) <= 40 else f"{value[:40]}... ({len(value)} characters)"


def name_trouble(e: Exception) -> str | None:
    """The one line for a file name the system refuses where no check of refsr's expected it, or None: an OSError
    that names its file (a name past 255 bytes, a loop of links, a folder taken away), or Path.resolve's loop of
    symbolic links (a RuntimeError before Python 3.13)."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, RuntimeError) and str(e).startswith("Symlink loop"):
        return f"a loop of symbolic links ({str(e).removeprefix('Symlink loop from ')})"
    return None


def check_torch_defaults() -> None:
    """Refuse to compute under a host program's torch defaults: set_default_dtype (float64: refsr's tensors are
    float32, what it makes anew would not be, and a seed would draw other numbers), set_default_device (what it
    makes anew lands there: "Cannot copy out of meta tensor", "Torch not compiled with CUDA"), or an autocast
    around the call (other outputs than the same call outside it)."""
    import torch
    if torch.get_default_dtype() != torch.float32:
        raise RefsrError(f"torch's default dtype is {str(torch.get_default_dtype()).removeprefix('torch.')} "
                         "(torch.set_default_dtype); refsr computes in float32 and its seeds draw float32 numbers: "
                         "set it back to torch.float32 around refsr's calls")
    device = torch.get_default_device() if hasattr(torch, "get_default_device") else torch.device("cpu")
    if device.type != "cpu":
        raise RefsrError(f"torch's default device is {device} (torch.set_default_device); refsr places its tensors "
                         "itself: set it back to 'cpu' around refsr's calls")
    if any(torch.is_autocast_enabled(kind) for kind in ("cpu", "cuda")):
        raise RefsrError("an autocast is on around this call; refsr chooses its own precision (--half): call it "
                         "outside torch.autocast")


def in_units(size: int) -> str:
    """A number of bytes in the unit that fits it (a small allocation read "0.00 GiB")."""
    for unit, shift in (("GiB", 30), ("MiB", 20)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{size / 1024:.1f} KiB"


def memory_trouble(e: BaseException) -> str | None:
    """The words for `e` when it is the computer's memory running out, with what could not be allocated in numpy's
    words without the array's details ("out of memory (Unable to allocate 25.7 GiB)"): numpy's or Pillow's
    MemoryError, the engine's OutOfMemory, the RuntimeError of torch's CPU allocator ("can't allocate memory: you
    tried to allocate 339738624 bytes") or of its loading a file ("unable to mmap 11087128 bytes from file ...:
    Cannot allocate memory (12)"), an OSError of ENOMEM. None for any other error."""
    if isinstance(e, OutOfMemory):
        return e.trouble
    if isinstance(e, MemoryError):  # Pillow's says nothing
        asked = str(e).split(" for ")[0]
    elif isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "Cannot allocate memory" in str(e)):
        asked = re.search(r"(\d+) bytes", str(e))
        asked = asked and f"Unable to allocate {in_units(int(asked[1]))}"
    elif isinstance(e, ImportError) and "failed to map segment" in str(e):  # a library loaded under a memory limit
        asked = "loading a library"
    elif isinstance(e, RuntimeError) and "could not create a primitive" in str(e):  # oneDNN's, when the memory
        # for a convolution's kernel cannot be had (under a memory limit: 2 runs in 3, the other an allocator's error)
        asked = "oneDNN could not create a primitive"
    elif isinstance(e, OSError) and e.errno == errno.ENOMEM:
        asked = None
    else:
        return None
    return f"out of memory ({asked})" if asked else "out of memory"


class OutOfMemory(RefsrError, MemoryError):
    """The computer's memory ran out for an image: a RefsrError, as the Python API's errors are, and still a
    MemoryError (the commands' line for it names what to lower)."""

    def __init__(self, what: str, e: BaseException):
        self.trouble = memory_trouble(e) or "out of memory"
        super().__init__(f"{what}: {self.trouble}")


@contextmanager
def memory_named(what: str):
    """The computer's memory running out in the block (memory_trouble) as an OutOfMemory naming `what`."""
    try:
        yield
    except (MemoryError, RuntimeError, OSError) as e:
        if memory_trouble(e) is None:
            raise
        raise OutOfMemory(what, e) from None


@contextmanager
def engine_errors_named(what):
    """The engine's RefsrErrors in the block (it knows arrays, not their files: "the network's weights overflow")
    as lines naming `what`, the input they were made for; the computer's memory is left to the caller's line."""
    try:
        yield
    except OutOfMemory:
        raise
    except RefsrError as e:
        if str(e).startswith(f"{what}: "):  # (one the engine was told the name of)
            raise
        raise RefsrError(f"{what}: {e}") from None
