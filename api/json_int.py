"""Integers as JSON counts them: `16.0` is the integer 16.

JSON has one number type, and JSON Schema's `"type": "integer"` admits any number with a zero
fractional part, so a schema that says `integer` promises that `"max_tokens": 16.0` is accepted.
The request models are strict (no bool-as-int, no number-as-string, no float-as-bool); this
keeps that and only reads an integral float as the integer it equals, before validation: an
int field then takes it, a float field takes the int as the same number. `2.5`, `true`, `"2"`,
NaN and infinities are refused as before.
"""

from __future__ import annotations

from typing import Any


def integral(value: Any) -> Any:
    """`value` as an int when it is a float with no fractional part; unchanged otherwise."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def integral_numbers(data: Any) -> Any:
    """A model's raw input with its integral floats made ints: the fields' values, and the
    items of lists up to lists of lists (token ids, batches of them). Nested objects are left to
    their own model, so the walk stays shallow whatever the body's nesting."""
    if not isinstance(data, dict):
        return data

    def value(v: Any, depth: int) -> Any:
        if isinstance(v, list) and depth < 2:
            return [value(x, depth + 1) for x in v]
        return integral(v)

    return {k: value(v, 0) for k, v in data.items()}
