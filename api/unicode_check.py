"""Refusing text that JSON can carry but UTF-8 cannot: one validator for every request model."""

from __future__ import annotations

from typing import Any


def valid_unicode(value: Any) -> Any:
    """A pydantic validator: JSON can carry lone surrogates (`"\\ud800"`), which no tokenizer
    or response encoder takes; refuse them where they enter."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    elif isinstance(value, list | tuple):
        for v in value:
            valid_unicode(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            valid_unicode(k)
            valid_unicode(v)
    return value
