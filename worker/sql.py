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
    """``schema.table`` quoted; a table without a schema is in ``public``, whatever the
    search path of the role at hand (an operator's role named like a schema, say ``sync``,
    would otherwise create and find tables there)."""
    schema, _, name = table.rpartition(".")
    return f"{quote_ident(schema or 'public')}.{quote_ident(name)}"
