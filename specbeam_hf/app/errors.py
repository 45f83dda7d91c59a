"""The application's error type and how its messages are kept to one line."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(message).split())


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
