"""SQL text built from the validated model: identifiers quoted, values always bound."""

from __future__ import annotations

import re

from worker.model import Entity

__all__ = ["quote_ident", "quote_table", "select_objects_sql"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def quote_ident(name: str) -> str:
    """Quote an identifier that the model already validated; refuse anything else."""
    if not _IDENT.match(name):
        raise ValueError(f"not a safe SQL identifier: {name!r}")
    return f'"{name}"'


def quote_table(table: str) -> str:
    return ".".join(quote_ident(part) for part in table.split("."))


def select_objects_sql(entity: Entity) -> str:
    """One query for a chunk of ids of one entity: ``$1`` is a ``bigint[]`` of ids.

    Columns come back under their member names, so rows map straight to device data.
    """
    assert entity.table is not None, "only persistable entities are fetched"
    columns = ["id", "version", "autocommitted"]
    columns += [quote_ident(attribute) for attribute in entity.attributes]
    columns += [
        f"{quote_ident(association.column)} AS {quote_ident(name)}"
        for name, association in entity.associations.items()
    ]
    return (
        f"SELECT {', '.join(columns)} FROM {quote_table(entity.table)} WHERE id = ANY($1::bigint[])"
    )
