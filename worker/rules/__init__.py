"""Access-rule constraints: tokens → parser → syntax tree → SQL (SPEC §5)."""

from worker.rules.errors import ConstraintError
from worker.rules.parser import parse
from worker.rules.sql import CURRENT_USER, Parameters, compile_constraint

__all__ = ["CURRENT_USER", "ConstraintError", "Parameters", "compile_constraint", "parse"]
