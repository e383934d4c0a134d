"""What a batch tells its user, and when: messages and a progress bar on stderr, JSON lines on stdout for scripts,
the counts of the summary line; and SIGINT and SIGTERM held while a file is written and reported, so that the two
never part."""
import contextlib
import errno
import json
import os
import signal
import sys


# Control characters (and Unicode's line breaks) as escapes, so that a file name holding a newline or a terminal
# escape still gives one line of message: repr's spelling, \n or \x1b.
ESCAPES = {c: repr(chr(c))[1:-1] for c in [*range(32), 127, 0x85, 0x2028, 0x2029]}


def one_line(text: str) -> str:
    return str(text).translate(ESCAPES)


def error_line(message: str) -> None:
    """refsr's one-line error on stderr."""
    to_stderr(f"refsr: error: {one_line(message)}")


def warning_line(message: str) -> None:
    """refsr's one-line warning on stderr."""
    to_stderr(f"refsr: warning: {one_line(message)}")


def to_stderr(line: str) -> None:
    """A message on stderr. Where stderr cannot be written (2>&-), there is nowhere to say anything: the message is
    dropped and the work goes on; the exit code still tells."""
    if sys.stderr is None:  # (print would write to stdout instead)
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        to_devnull(sys.stderr)


def say_line(progress, line: str) -> None:
    """One line of message on stderr: above the live progress bar where one is shown (on a terminal), else plain."""
    if progress is not None and not progress.disable:
        progress.console.print(one_line(line), markup=False, highlight=False, emoji=False, soft_wrap=True)
    else:
        to_stderr(one_line(line))


def to_devnull(stream) -> None:
    """A standard stream's descriptor pointed at /dev/null, so that the interpreter's last flush of what is left in
    its buffer cannot fail (a traceback, and exit code 120)."""
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):  # not a file (a test's captured stream)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


class StdoutClosed(BaseException):
    """Standard output cannot be written: its reader is gone (`| head`), its disk is full, it is closed. Not a
    failure of the file whose report it was, which is written: the run stops, as a program does whose output nobody
    reads (a BaseException, so that no handler of one file's errors takes it)."""

    def __init__(self, error: OSError):
        super().__init__(error.strerror or str(error))
        self.error = error


def to_stdout(line: str) -> None:
    """One line of refsr's results (JSON lines, info, a URL) on stdout, written through at once."""
    if sys.stdout is None:  # started with stdout closed (>&-)
        raise StdoutClosed(OSError(errno.EBADF, "it is closed"))
    try:
        try:
            print(line, flush=True)
        except UnicodeEncodeError:  # a strict stdout (en_US.UTF-8) and a name of other bytes (os.fsdecode's
            # surrogates): the name's own bytes, as ls writes them; a character its encoding lacks, escaped
            encoding = sys.stdout.encoding or "utf-8"
            try:
                data = line.encode(encoding, "surrogateescape")
            except UnicodeEncodeError:
                data = line.encode(encoding, "backslashreplace")
            sys.stdout.flush()
            sys.stdout.buffer.write(data + b"\n")
            sys.stdout.buffer.flush()
    except OSError as e:
        raise StdoutClosed(e) from None


def stdout_lost(error: OSError) -> int:
    """After stdout failed: say why, except for a closed pipe (`| head`: what its reader wanted, and as quiet as any
    other tool). Returns the exit code."""
    if sys.stdout is not None:
        to_devnull(sys.stdout)
    if not isinstance(error, BrokenPipeError):
        error_line(f"cannot write to standard output ({error.strerror or error})")
    return 1


class Interrupted(BaseException):
    """Ctrl-C that no command caught, carried past click (which prints a blank line for a KeyboardInterrupt)."""


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that the atomic writes clean up as they do for Ctrl-C."""


SIGNALLED = []  # SIGINT and SIGTERM as this process took them (cli.Commands.main starts each command empty)
SIGNAL_EXITS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}  # line, exit code


def on_sigterm(signum, frame):
    SIGNALLED.append(signum)
    raise Terminated()


def on_sigint(signum, frame):
    SIGNALLED.append(signum)
    raise KeyboardInterrupt


def reraise_signal() -> None:
    """Raise again the signal this process took, if any: C code (torch's, Pillow's) can turn the KeyboardInterrupt
    raised inside it into an error of its own (a ValueError), which would read as a bug, or a bad file, and a batch
    would go on past the user's Ctrl-C. Called where an error is caught to be reported and passed over."""
    if SIGNALLED:
        raise (Terminated() if SIGNALLED[0] == signal.SIGTERM else KeyboardInterrupt()) from None


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block is done, then act as they would have: a file that is written is also
    reported, never one without the other. (Handlers, not a signal mask: any of torch's threads may take a signal.)"""
    caught = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), caught[0])


class Reporter:
    """Messages on stderr (a rich progress bar when not quiet), JSON lines on stdout with --json, and the counts."""

    def __init__(self, quiet: bool, as_json: bool):
        self.quiet, self.as_json = quiet, as_json
        self.counts = {"written": 0, "skipped": 0, "failed": 0}
        self.progress = None
        from rich.console import Console
        console = Console(stderr=True)
        if not quiet and not as_json and console.is_terminal:  # no bar into a file or pipe (it left a blank line)
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=console, transient=True)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def _print(self, line: str):
        say_line(self.progress, line)

    def say(self, message: str):
        if not self.quiet:
            self._print(message)

    def warn(self, message: str):
        if not self.quiet:
            self._print(f"refsr: warning: {message}")

    def error(self, message: str):
        self._print(f"refsr: error: {message}")

    def failed(self, message: str):
        self.error(message)
        self.counts["failed"] += 1

    def wrote(self, report: dict):
        self.counts["written"] += 1
        if self.as_json:
            to_stdout(json.dumps(report))
        else:
            self.say(f"wrote {report['output']}")

    def task(self, description: str, total: int):
        if self.progress is None:
            return None
        task = self.progress.add_task(description, total=total)
        return lambda: self.progress.advance(task)
