class RefsrError(Exception):
    """A problem the user can fix (bad input, missing weights...): the CLI prints it as one line, no traceback."""
