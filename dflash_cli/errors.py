"""Errors a user can fix: the CLI prints them as one line and exits non-zero, never a traceback."""


class DflashError(Exception):
    """A problem with the user's input, files or environment, stated so they can fix it."""

    exit_code = 1


class UsageError(DflashError):
    """Bad flags or arguments (exit code 2, like click/typer usage errors)."""

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after the command already showed what it had (the partial answer, its newline and
    statistics): the CLI exits 130 without printing anything more."""
