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


def allocation(e: MemoryError) -> str:
    """What a MemoryError could not allocate, in numpy's words without the array's details ("Unable to allocate
    25.7 GiB"), for an out-of-memory line."""
    if isinstance(e, OutOfMemory):
        return e.allocation
    return str(e).split(" for ")[0] or "MemoryError"


class OutOfMemory(RefsrError, MemoryError):
    """The computer's memory ran out for an image: a RefsrError, as the Python API's errors are, and still the
    MemoryError it was (the commands' line for it names what to lower)."""

    def __init__(self, what: str, e: MemoryError):
        self.allocation = allocation(e)
        super().__init__(f"{what}: out of memory ({self.allocation})")
