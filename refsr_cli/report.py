"""What a batch tells its user, and when: messages and a progress bar on stderr, JSON lines on stdout for scripts,
the counts of the summary line; and SIGINT and SIGTERM held while a file is written and reported, so that the two
never part."""
import contextlib
import json
import os
import signal
import sys


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that the atomic writes clean up as they do for Ctrl-C."""


def on_sigterm(signum, frame):
    raise Terminated()


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
        if not quiet and not as_json:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=Console(stderr=True), transient=True)

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def _print(self, line: str):
        if self.progress is not None:
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, file=sys.stderr)

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
            print(json.dumps(report), flush=True)
        else:
            self.say(f"wrote {report['output']}")

    def task(self, description: str, total: int):
        if self.progress is None:
            return None
        task = self.progress.add_task(description, total=total)
        return lambda: self.progress.advance(task)
