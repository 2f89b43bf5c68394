"""One exception type for mistakes a user can fix.

Anything raised as ``UserError`` reaches the terminal as a single sentence (no traceback):
the CLI catches it, prints ``error: <message>`` and exits with status 2. The message names
what is wrong (the config field, the file) and how to fix it.
"""


class UserError(Exception):
    """A bad config, input file, checkpoint or command line, explained in one sentence."""


def check(ok: bool, message: str) -> None:
    """Raises ``UserError(message)`` unless ``ok``: one line per validation rule."""
    if not ok:
        raise UserError(message)
