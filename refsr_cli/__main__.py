"""The `refsr` command (`python -m refsr_cli`, and the script pyproject.toml installs)."""
import os
import signal
import sys


def run():
    try:
        from .cli import main  # click, then the rest as each command needs it
        main(prog_name="refsr")
    except KeyboardInterrupt:  # Ctrl-C while refsr loads, before its commands handle it: one line, not a traceback
        try:
            os.write(2, b"refsr: error: interrupted\n")
        except OSError:  # stderr closed
            pass
        sys.exit(130)
    finally:
        # The command has said what it did and is exiting: a second Ctrl-C now would raise inside torch's atexit
        # finalisers, a traceback after the command's line.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    run()
