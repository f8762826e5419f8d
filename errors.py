"""The one exception type that every command-line entry point prints without a traceback."""


class UserError(Exception):
    """A mistake the user can fix; the message says what was wrong and how to fix it."""
