"""SQL text built from the validated model: identifiers quoted, values always bound."""

from __future__ import annotations

import re

__all__ = ["quote_ident", "quote_table"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def quote_ident(name: str) -> str:
    """Quote an identifier that the model already validated; refuse anything else."""
    if not _IDENT.match(name):
        raise ValueError(f"not a safe SQL identifier: {name!r}")
    return f'"{name}"'


def quote_table(table: str) -> str:
    return ".".join(quote_ident(part) for part in table.split("."))
