# -*- test-case-name: tests.test_demo -*-
"""
Input checks for the shop's JSON bodies and query strings.

Every failure is a :class:`txfiberdb.klein.BadRequest` (400) whose message
names the field and what was wrong, with all problems of a body in
``details`` (``{"field": "problem", ...}``), so a client fixes them in one go.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

from txfiberdb.klein import BadRequest, NotFound

__all__ = [
    "Field",
    "MAX_ID",
    "check_id",
    "query_bool",
    "query_choice",
    "query_float",
    "query_int",
    "query_text",
    "validate",
    "validate_each",
]

#: Ids are PostgreSQL ``integer`` columns.
MAX_ID = 2**31 - 1

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@dataclass(frozen=True)
class Field:
    """One field of a JSON object: its kind and its limits."""

    kind: str  # "int", "id" (1..MAX_ID), "str", "email" or "list"
    required: bool = True
    minimum: Optional[int] = None
    maximum: Optional[int] = None
    min_length: int = 1
    max_length: Optional[int] = None
    pattern: Optional[str] = None
    pattern_help: str = ""
    default: Any = None

    def check(self, value: Any) -> Any:
        """The value, checked (strings are stripped); ValueError says why not."""
        if self.kind in ("int", "id"):
            lo = 1 if self.kind == "id" else self.minimum
            hi = MAX_ID if self.kind == "id" else self.maximum
            # JSON true/false are bools, which Python counts as ints.
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"must be an integer, not {_json_type(value)}")
            if lo is not None and value < lo or hi is not None and value > hi:
                raise ValueError(f"must be an integer {_range(lo, hi)}")
            return value
        if self.kind == "list":
            if not isinstance(value, list):
                raise ValueError(f"must be an array, not {_json_type(value)}")
            return value
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {_json_type(value)}")
        problem = unstorable(value)
        if problem:
            raise ValueError(problem)
        value = value.strip()
        if len(value) < self.min_length:
            raise ValueError(
                "must not be empty"
                if self.min_length == 1
                else f"must be at least {self.min_length} characters"
            )
        if self.max_length is not None and len(value) > self.max_length:
            raise ValueError(f"must be at most {self.max_length} characters")
        if self.kind == "email" and not _EMAIL.match(value):
            raise ValueError("must be an email address (name@example.com)")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise ValueError(self.pattern_help or f"must match {self.pattern}")
        return value


def _range(lo: Optional[int], hi: Optional[int]) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    if lo is not None:
        return f">= {lo}"
    return f"<= {hi}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number" if not isinstance(value, int) else "an integer"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _invalid(errors: dict[str, str], what: str = "invalid input") -> BadRequest:
    summary = "; ".join(f"{name} {problem}" for name, problem in errors.items())
    return BadRequest(f"{what}: {summary}", details=errors)


def validate(
    body: Any,
    fields: dict[str, Field],
    partial: bool = False,
    what: str = "the request body",
) -> dict[str, Any]:
    """
    Check a JSON object against ``fields``: no unknown fields, required ones
    present (unless ``partial``, for PATCH: at least one field), each within
    its limits.  Returns the checked values (defaults filled in unless
    ``partial``).
    """
    if not isinstance(body, dict):
        raise BadRequest(f"{what} must be a JSON object, not {_json_type(body)}")
    errors: dict[str, str] = {}
    for name in body:
        if name not in fields:
            errors[name] = f"is not a known field (known: {', '.join(fields)})"
    out: dict[str, Any] = {}
    for name, field in fields.items():
        if name not in body:
            if partial:
                continue
            if field.required:
                errors[name] = "is required"
            else:
                out[name] = field.default
            continue
        try:
            out[name] = field.check(body[name])
        except ValueError as e:
            errors[name] = str(e)
    if errors:
        raise _invalid(errors)
    if partial and not out:
        raise BadRequest(f"nothing to update: give at least one of {', '.join(fields)}")
    return out


def validate_each(
    items: list[Any], fields: dict[str, Field], name: str
) -> list[dict[str, Any]]:
    """
    :func:`validate` each object of a JSON array, with the problems of all
    of them in one :class:`BadRequest` (``lines[2].quantity``: ...).
    """
    out = []
    errors: dict[str, str] = {}
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            errors[where] = f"must be a JSON object, not {_json_type(item)}"
            continue
        try:
            out.append(validate(item, fields))
        except BadRequest as e:
            for field, problem in (e.details or {}).items():
                errors[f"{where}.{field}"] = problem
    if errors:
        raise _invalid(errors)
    return out


def check_id(value: int, what: str) -> int:
    """An id from the URL; one that cannot exist is simply not found."""
    if not 1 <= value <= MAX_ID:
        raise NotFound(f"no {what} {value}")
    return value


def unstorable(text: str) -> Optional[str]:
    """
    Why PostgreSQL could not store ``text`` (a NUL character, or an unpaired
    surrogate, which JSON's ``\\ud800`` escapes can smuggle in), or None.
    """
    if "\x00" in text:
        return "must not contain NUL (\\u0000) characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (no unpaired surrogates)"
    return None


def _arg(request: Any, name: str) -> Optional[str]:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    if len(values) > 1:
        raise BadRequest(f"query parameter {name!r} is given {len(values)} times")
    try:
        value: str = values[-1].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"query parameter {name!r} is not UTF-8") from None
    problem = unstorable(value)
    if problem:
        raise BadRequest(f"query parameter {name!r} {problem}")
    return value


def query_int(
    request: Any,
    name: str,
    default: Optional[int],
    minimum: Optional[int] = None,
    maximum: Optional[int] = None,
) -> Optional[int]:
    raw = _arg(request, name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise BadRequest(
            f"query parameter {name!r} must be an integer, not {raw[:40]!r}"
        ) from None
    if (
        minimum is not None
        and value < minimum
        or maximum is not None
        and value > maximum
    ):
        raise BadRequest(
            f"query parameter {name!r} must be an integer {_range(minimum, maximum)}"
        )
    return value


def query_float(
    request: Any, name: str, default: float, minimum: float, maximum: float
) -> float:
    raw = _arg(request, name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BadRequest(f"query parameter {name!r} must be a number, not {raw[:40]!r}")
    if not minimum <= value <= maximum:
        raise BadRequest(
            f"query parameter {name!r} must be between {minimum:g} and {maximum:g}"
        )
    return value


def query_text(request: Any, name: str, max_length: int = 100) -> Optional[str]:
    raw = _arg(request, name)
    if raw is None:
        return None
    raw = raw.strip()
    if len(raw) > max_length:
        raise BadRequest(
            f"query parameter {name!r} must be at most {max_length} characters"
        )
    return raw or None


def query_bool(request: Any, name: str) -> Optional[bool]:
    raw = _arg(request, name)
    if raw is None or raw == "":
        return None
    lowered = raw.lower()
    if lowered in ("1", "true", "yes"):
        return True
    if lowered in ("0", "false", "no"):
        return False
    raise BadRequest(
        f"query parameter {name!r} must be true or false, not {raw[:40]!r}"
    )


def query_choice(request: Any, name: str, choices: list[str], default: str) -> str:
    raw = _arg(request, name)
    if raw is None or raw == "":
        return default
    if raw not in choices:
        raise BadRequest(
            f"query parameter {name!r} must be one of {', '.join(choices)}, "
            f"not {raw[:40]!r}"
        )
    return raw
