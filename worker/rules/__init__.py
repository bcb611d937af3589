"""Access-rule constraints: tokens → parser → syntax tree → SQL (SPEC §5)."""

from worker.rules.errors import ConstraintError
from worker.rules.parser import parse
from worker.rules.sql import (
    CURRENT_USER,
    Constraint,
    EntityShape,
    Hop,
    Parameters,
    check_constraint,
)

__all__ = [
    "CURRENT_USER",
    "Constraint",
    "ConstraintError",
    "EntityShape",
    "Hop",
    "Parameters",
    "check_constraint",
    "parse",
]
