# -*- test-case-name: tests.test_prepare -*-
"""
Auto-prepare for :mod:`txfiberdb.dbapi`, as psycopg 3's ``prepare_threshold``:
which statements can be prepared, the ``PREPARE`` text with ``$n``
placeholders and declared parameter types, and the per-connection cache
(counts, prepared statements, LRU eviction).  No I/O here: the driver sends
what this module builds.  doc/howto/performance.md says how it behaves.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Callable
from typing import Any, Optional

import psycopg2.extras

#: Prepared statements a connection keeps by default (``prepared_max``).
DEFAULT_PREPARED_MAX = 100

# Statements PREPARE accepts, sent as one statement.
_PREPARABLE = re.compile(
    r"\s*(?:SELECT|INSERT|UPDATE|DELETE|VALUES|WITH|TABLE|MERGE)\b", re.I
).match
# psycopg2's placeholders: %s, %(name)s, and %% for a literal %.
_PLACEHOLDER = re.compile(r"%(?:\(([^)]*)\))?(.)", re.S)
_DOLLAR_PARAM = re.compile(r"\$\d").search
# Command tags of DDL, after which prepared statements are forgotten.
_DDL_TAGS = ("CREATE ", "ALTER ", "DROP ")
# Statements after which the server's prepared statements may be gone.
_DROPS_PREPARED = re.compile(r"\b(?:DISCARD|DEALLOCATE)\b", re.I).search
# Unique to this process among all clients of a server (or of a pooler that
# hands one server connection to several clients): a statement name never
# runs another client's statement.
_PROCESS_TOKEN = f"{os.getpid():x}{os.urandom(3).hex()}"


def _int_type(value: int) -> str:
    """The type PostgreSQL gives the literal psycopg2 writes for an int."""
    # The parser folds a minus sign into the constant: -2147483648 is int4.
    if -2147483648 <= value <= 2147483647:
        return "int4"
    if -9223372036854775808 <= value <= 9223372036854775807:
        return "int8"
    return "numeric"


def _decimal_type(value: Any) -> str:
    if not value.is_finite():
        return "numeric!"  # 'NaN'::numeric
    if not any(c in str(value) for c in ".eE"):
        return _int_type(int(value))  # psycopg2 writes "5": an integer literal
    return "numeric"


def _float_type(value: float) -> str:
    # psycopg2 writes repr(): "1.5" is a numeric literal; inf/nan are cast.
    return "numeric" if value - value == 0 else "float8!"


def _datetime_type(value: Any) -> str:
    return "timestamp!" if value.tzinfo is None else "timestamptz!"


def _time_type(value: Any) -> str:
    return "time!" if value.tzinfo is None else "timetz!"


def _param_types() -> dict[type, Any]:
    import datetime
    import decimal
    import uuid

    return {
        str: "unknown",  # a quoted literal: its type comes from where it is used
        type(None): "unknown",
        bool: "bool",  # "true": a cast before PostgreSQL 15 (see build())
        int: _int_type,
        float: _float_type,
        decimal.Decimal: _decimal_type,
        bytes: "bytea!",
        bytearray: "bytea!",
        memoryview: "bytea!",
        datetime.datetime: _datetime_type,
        datetime.date: "date!",
        datetime.time: _time_type,
        datetime.timedelta: "interval!",
        uuid.UUID: "uuid!",
        psycopg2.extras.Json: "unknown",
    }


# Parameter types whose psycopg2 literal has a type PREPARE can declare, so
# that a prepared statement resolves operators and result types exactly as
# the literal would.  Parameters of any other type run unprepared.
_PARAM_TYPES = _param_types()


class _Prepared:
    """A statement prepared on one connection."""

    __slots__ = ("name", "execute", "names")

    def __init__(self, name: str, execute: str, names: Optional[tuple[str, ...]]):
        self.name = name
        self.execute = execute  # "EXECUTE name(%s,...)"
        self.names = names  # parameter names in $n order (dict parameters)

    def args(self, parameters: Any) -> Any:
        if self.names is None:
            return tuple(parameters) if parameters else None
        return tuple([parameters[n] for n in self.names])


class _PreparedCache:
    """
    Auto-prepare, as psycopg 3's ``prepare_threshold``: a statement (its text
    and its parameters' types) is prepared once it has run ``threshold``
    times on this connection; at most ``maxsize`` stay prepared, the least
    recently used ones are deallocated.
    """

    def __init__(
        self, threshold: int, maxsize: int, prefix: str, server_version: int
    ) -> None:
        self.server_version = server_version
        self.threshold = threshold
        self.maxsize = max(1, maxsize)
        self.prefix = prefix
        self.counts: collections.OrderedDict[Any, int] = collections.OrderedDict()
        self.names: collections.OrderedDict[Any, _Prepared] = collections.OrderedDict()
        self.deallocate: list[str] = []
        self.serial = 0
        self.lost = 0  # times the server had lost our statements

    def key(self, operation: Any, parameters: Any) -> Any:
        """The cache key, or None when the statement runs unprepared."""
        if parameters is None:
            return operation
        types = _PARAM_TYPES
        if type(parameters) is dict:
            out: list[Any] = []
            for k, v in parameters.items():
                t = types.get(type(v))
                if t is None:
                    return None
                out.append(k)
                out.append(t if t.__class__ is str else t(v))
            return (operation, "d", *out)
        if type(parameters) in (tuple, list):
            out = []
            for v in parameters:
                t = types.get(type(v))
                if t is None:
                    return None
                out.append(t if t.__class__ is str else t(v))
            return (operation, "s", *out)
        return None

    def should_prepare(self, key: Any) -> bool:
        """Count one more run of ``key``; whether to prepare it now."""
        counts = self.counts
        n = counts.get(key, 0)
        if n < 0:
            return False  # PREPARE refused it
        if n >= self.threshold:
            return True
        counts[key] = n + 1
        counts.move_to_end(key)
        if len(counts) > self.maxsize * 2:
            counts.popitem(last=False)
        return False

    def refuse(self, key: Any) -> None:
        self.counts[key] = -1
        self.counts.move_to_end(key)

    def build(
        self, key: Any, operation: str, parameters: Any
    ) -> Optional[tuple[str, _Prepared]]:
        """The PREPARE statement and the entry for ``key``, or None."""
        if ";" in operation or not _PREPARABLE(operation) or _DOLLAR_PARAM(operation):
            return None
        if parameters is None:
            text, names, types = operation, None, list[str]()
        else:
            if type(parameters) is dict:
                by_name = dict(zip(key[2::2], key[3::2], strict=True))
                pairs = by_name.items()
                by_name = {k: self._tag(t) for k, t in pairs}
                parsed = _to_dollar(operation, True, by_name.get)
            else:
                tags = [self._tag(t) for t in key[2:]]
                parsed = _to_dollar(
                    operation, False, lambda i: tags[i] if i < len(tags) else None
                )
            if parsed is None:
                return None
            text, names, types = parsed
            if names is None and len(types) != len(parameters):
                return None
        self.serial += 1
        name = f"_txf_{self.prefix}_{self.serial}"
        declared = f" ({','.join(t.rstrip('!') for t in types)})" if types else ""
        prepare = f"PREPARE {name}{declared} AS {text}"
        args = f"({','.join(['%s'] * len(types))})" if types else ""
        return prepare, _Prepared(name, f"EXECUTE {name}{args}", names)

    def _tag(self, tag: str) -> str:
        # Before PostgreSQL 15, the parser wrote TRUE/FALSE as a cast to
        # bool, naming a result column "bool".
        return "bool!" if tag == "bool" and self.server_version < 150000 else tag

    def add(self, key: Any, entry: _Prepared) -> None:
        self.counts.pop(key, None)
        self.names[key] = entry
        while len(self.names) > self.maxsize:
            _, old = self.names.popitem(last=False)
            self.deallocate.append(old.name)

    def forget(self, key: Any) -> None:
        """The server's plan of ``key`` is stale: prepare it again later."""
        entry = self.names.pop(key, None)
        if entry is not None:
            self.deallocate.append(entry.name)
        self.counts[key] = self.threshold

    def clear(self) -> None:
        """The server has none of our statements any more."""
        self.names.clear()
        self.counts.clear()
        self.deallocate.clear()


def _to_dollar(
    operation: str, named: bool, type_of: Callable[[Any], Optional[str]]
) -> Optional[tuple[str, Optional[tuple[str, ...]], list[str]]]:
    """
    ``operation`` with psycopg2's placeholders as ``$n``: the text, the
    parameter names in ``$n`` order (named style) and their type tags
    (``type_of(name or position)``).  A tag ending in ``!`` is a type
    psycopg2 writes as a cast (``'...'::date``, ``true``): the placeholder
    keeps the cast, so that a result column is named as it would be
    (``date``, ``bool``).  None when psycopg2 would refuse the placeholders
    (it says why when the statement runs unprepared).
    """
    out: list[str] = []
    names: list[str] = []
    types: list[str] = []
    index: dict[str, int] = {}
    pos = 0
    for m in _PLACEHOLDER.finditer(operation):
        out.append(operation[pos : m.start()])
        pos = m.end()
        name, kind = m.group(1), m.group(2)
        if kind == "%" and name is None:
            out.append("%")
            continue
        if kind != "s" or (name is None) == named:
            return None
        if name is None:
            tag = type_of(len(types))
            if tag is None:
                return None
            types.append(tag)
            n = len(types)
        elif name in index:
            n = index[name]
            tag = types[n - 1]
        else:
            tag = type_of(name)
            if tag is None:
                return None
            names.append(name)
            types.append(tag)
            n = index[name] = len(types)
        out.append(f"${n}::{tag[:-1]}" if tag[-1] == "!" else f"${n}")
    if "%" in operation[pos:]:
        return None  # a lone % at the end: psycopg2 refuses it
    out.append(operation[pos:])
    return "".join(out), (tuple(names) if named else None), types
