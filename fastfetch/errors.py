"""The error every module raises for input a user can fix."""

from __future__ import annotations


class UsageError(Exception):
    """Bad arguments or unusable input: the message says what is wrong and what to do (exit 2)."""
