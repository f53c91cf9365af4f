"""Which failures are the user's to fix: printed as one line (no traceback) by the CLI and by a
stage process, which both import this module (the stage process never imports the CLI)."""

from __future__ import annotations

EXIT_USAGE = 2  # exit code of a one-line user error (argparse uses it for bad usage too)


class CliError(Exception):
    """A user-facing failure found by a command handler: printed as one line, exit code 2."""


def is_user_error(err: BaseException) -> bool:
    """Typed errors of detrforge's own packages (bad config, data, checkpoint...) and missing
    files carry a message that names the file and the fix: print it, not a traceback."""
    module = type(err).__module__ or ""
    return isinstance(err, FileNotFoundError) or module.split(".")[0] in ("pipeline", "stages",
                                                                           "launch")


def one_line(err: BaseException) -> str:
    """The error's message on one line (some libraries' messages span several)."""
    return " ".join(str(err).split()) or type(err).__name__
