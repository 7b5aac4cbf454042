# -*- test-case-name: tests.test_klein -*-
"""What the library logs and answers of an error: its first line only."""

from __future__ import annotations

from typing import Optional

__all__ = ["first_line"]


def first_line(error: Optional[BaseException]) -> str:
    """
    The first line of ``error``'s message (of the DB-API error a SQLAlchemy
    error wraps, when it wraps one): no SQL, no parameters, no DETAIL lines;
    the class name when the message is empty.
    """
    orig = getattr(error, "orig", None) or error
    lines = str(orig).strip().splitlines()
    return lines[0] if lines else type(orig).__name__
