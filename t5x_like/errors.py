"""One exception type for mistakes a user can fix.

Anything raised as ``UserError`` reaches the terminal as a single sentence (no traceback):
the CLI catches it, prints ``error: <message>`` and exits with status 2. The message names
what is wrong (the config field, the file) and how to fix it.
"""

import os
import sys


class UserError(Exception):
    """A bad config, input file, checkpoint or command line, explained in one sentence."""


def check(ok: bool, message: str) -> None:
    """Raises ``UserError(message)`` unless ``ok``: one line per validation rule."""
    if not ok:
        raise UserError(message)


def print_error(sentence: str) -> None:
    """Writes ``error: <sentence>`` as a line of its own, whatever other threads print.

    When a run fails, library threads (orbax's, tensorstore's) may still be printing
    tracebacks through ``sys.stderr``, which off a terminal writes each piece straight to the
    descriptor; a ``print`` could land inside one of their lines. One write, opened by a
    newline, cannot be split and always starts a line. A stream without a descriptor (a
    notebook's, a test's capture) gets the same line in one ``write``.
    """
    line = f"\nerror: {sentence}\n"
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        sys.stderr.write(line)
        return
    os.write(fd, line.encode(errors="backslashreplace"))
