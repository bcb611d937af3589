"""The syntax tree of a constraint: small immutable nodes, each with its span in the text."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal as TypingLiteral

__all__ = [
    "And",
    "Comparison",
    "Constant",
    "Empty",
    "Exists",
    "Expr",
    "Function",
    "FunctionName",
    "Literal",
    "Not",
    "Operator",
    "Or",
    "Path",
    "Span",
    "Step",
    "TokenRef",
    "Value",
]

Operator = TypingLiteral["=", "!=", "<", "<=", ">", ">="]
FunctionName = TypingLiteral["contains", "starts-with"]


@dataclass(frozen=True, slots=True)
class Span:
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Step:
    name: str
    span: Span


@dataclass(frozen=True, slots=True)
class Path:
    """``Assoc/Entity/.../member``: association hops, optionally ending in a member."""

    steps: tuple[Step, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Literal:
    """A string, number or boolean written in the constraint."""

    value: str | int | Decimal | bool
    span: Span


@dataclass(frozen=True, slots=True)
class Empty:
    span: Span


@dataclass(frozen=True, slots=True)
class TokenRef:
    """``[%Name%]``, quoted or not; ``name`` is what stands between the percent signs."""

    name: str
    span: Span


Value = Literal | Empty | TokenRef


@dataclass(frozen=True, slots=True)
class Comparison:
    operator: Operator
    path: Path
    value: Value
    span: Span


@dataclass(frozen=True, slots=True)
class Function:
    """``contains(path, 'x')`` or ``starts-with(path, 'x')``."""

    name: FunctionName
    path: Path
    value: Value
    span: Span


@dataclass(frozen=True, slots=True)
class Exists:
    """A bare association path: true when an associated object exists."""

    path: Path
    span: Span


@dataclass(frozen=True, slots=True)
class Constant:
    """``true()`` or ``false()`` on its own."""

    value: bool
    span: Span


@dataclass(frozen=True, slots=True)
class Not:
    operand: Expr
    span: Span


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Expr, ...]
    span: Span


Expr = Comparison | Function | Exists | Constant | Not | And | Or
