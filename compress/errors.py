"""Errors a user can fix: the CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

_Result = TypeVar("_Result")


class UserError(ValueError):
    """Bad input from the user (path, size, method name, data file...)."""


def report_or_exit_code(run: Callable[[], _Result], report: Callable[[_Result], str]) -> int:
    """A command's body for ``main()``: print ``report(run())`` and return 0, or print the `UserError`
    it raised as one ``error: ...`` line on stderr and return 2 (no traceback)."""
    try:
        result = run()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(result))
    return 0

