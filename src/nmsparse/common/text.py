"""Message and table helpers shared by every layer: did-you-mean hints, unknown-key errors, Markdown tables."""

from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(value, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for the closest of `choices` to `value`, or "" when none is close."""
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_keys(d, valid: Iterable[str], where: str) -> None:
    """ValueError naming `where`.key for the first key of mapping `d` not in `valid`, with a suggestion."""
    if not isinstance(d, dict):
        raise TypeError(f"{where} must be a mapping, got {type(d).__name__}")
    valid = list(valid)
    for key in d:
        if key not in valid:
            hint = did_you_mean(key, valid) or "."
            raise ValueError(f"unknown key {where}.{key}{hint} Valid keys: {', '.join(valid)}")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table of `rows` under `headers` (cells formatted with str)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
