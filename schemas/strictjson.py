"""JSON as the wire contract accepts it: stricter than `json.loads`, which lets through what
later fails deep inside a service (an `internal.error` instead of a clear rejection) or means
something other than it says. Refused, each with a one-line reason:

- nesting deeper than `MAX_DEPTH` (1,000 levels raised RecursionError);
- an integer outside 64 bits (4,300+ digits raised ValueError; `seq` of 10^4000 was taken);
- NaN, Infinity, -Infinity (not JSON; stored as null);
- a key twice in one object (the last silently won: two readers may see two messages);
- a lone UTF-16 surrogate in a string (not encodable as UTF-8: the canonical form failed).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32
INT_LIMIT = 2**63
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class JsonError(ValueError):
    """Not JSON as the contract takes it; the text says what."""


def _depth(payload: bytes) -> int:
    depth = deepest = 0
    for byte in _STRINGS.sub(b'""', payload):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def _int(text: str) -> int:
    if len(text.lstrip("-")) > 19 or not -INT_LIMIT <= (value := int(text)) < INT_LIMIT:
        raise JsonError(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is outside 64 bits")
    return value


def _constant(name: str) -> Any:
    raise JsonError(f"{name} is not a JSON number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise JsonError(f"key {twice[:40]!r} appears twice in one object")
    return obj


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise JsonError(f"string {value[:40]!r} holds a lone surrogate") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def loads(payload: bytes | str) -> Any:
    """Parse `payload`; raise JsonError (a ValueError) naming what is wrong."""
    data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    if (deepest := _depth(data)) > MAX_DEPTH:
        raise JsonError(f"nested {deepest} levels deep, over the limit of {MAX_DEPTH}")
    try:
        value = json.loads(data, parse_int=_int, parse_constant=_constant, object_pairs_hook=_object)
    except JsonError:
        raise
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise JsonError(f"not JSON: {exc}") from None
    _check_strings(value)
    return value
