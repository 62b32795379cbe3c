"""The one exception type for mistakes a user can fix.

The CLI prints a `UserError` as a single line (no traceback) and exits non-zero; Python callers get
an ordinary exception they can catch. Raise it where the bad value enters, and say what to change.
"""


class UserError(ValueError):
    """Bad input: a wrong argument, file, config value or adapter. The message says what to change."""
