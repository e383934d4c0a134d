"""The `refsr` command (`python -m refsr_cli`, and the script pyproject.toml installs)."""
import os
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


if __name__ == "__main__":
    run()
