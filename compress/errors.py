"""Errors a user can fix: the CLI prints them as one line and exits non-zero, without a traceback."""


class UserError(ValueError):
    """Bad input from the user (path, size, method name, data file...)."""
