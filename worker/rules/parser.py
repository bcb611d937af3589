"""Parses the XPath subset of SPEC §5 into the syntax tree of ``worker.rules.ast``.

Grammar::

    constraint := ("[" or "]")+                    brackets are joined with "and"
    or         := and ("or" and)*
    and        := unary ("and" unary)*
    unary      := "not" "(" or ")" | "(" or ")" | "true" "(" ")" | "false" "(" ")"
                | ("contains" | "starts-with") "(" path "," value ")"
                | path [operator value]          a bare path tests that an object exists
    path       := name ("/" name)*
    value      := string | number | "empty" | "true()" | "false()" | token
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal
from typing import cast

from worker.rules.ast import (
    And,
    Comparison,
    Constant,
    Empty,
    Exists,
    Expr,
    Function,
    FunctionName,
    Literal,
    Not,
    Operator,
    Or,
    Path,
    Span,
    Step,
    TokenRef,
    Value,
)
from worker.rules.errors import ConstraintError
from worker.rules.tokens import Kind, Token, tokenize

__all__ = ["parse"]

_QUOTED_TOKEN = re.compile(r"^\[%([A-Za-z0-9_.]+)%\]$")
_FUNCTIONS: dict[str, FunctionName] = {"contains": "contains", "starts-with": "starts-with"}
# Parentheses and not() nest by recursion: bounded well below Python's recursion limit,
# as constraints also come from jobs (queries), not only from the model.
MAX_DEPTH = 32


def parse(text: str) -> Expr:
    """The syntax tree of ``text``; raises ``ConstraintError`` at the first mistake.

    Example::

        parse("[status = 'Open'][not(due = empty)]")
        # And(operands=(Comparison(...), Not(...)), ...)
    """
    return _Parser(text).constraint()


class _Parser:
    def __init__(self, text: str) -> None:
        self._text = text
        self._tokens = tokenize(text)
        self._index = 0
        self._depth = 0

    @property
    def _current(self) -> Token:
        return self._tokens[self._index]

    def _advance(self) -> Token:
        token = self._current
        self._index += 1
        return token

    def _error(self, expected: str, token: Token | None = None) -> ConstraintError:
        token = token or self._current
        return ConstraintError(
            f"expected {expected}, found {token.describe()}", self._text, token.start, token.end
        )

    def _expect(self, kind: Kind) -> Token:
        if self._current.kind is not kind:
            raise self._error(kind.value)
        return self._advance()

    def _at(self, kind: Kind) -> bool:
        # A method, not an attribute test, so type checkers do not narrow across _advance().
        return self._current.kind is kind

    def _is_word(self, word: str, offset: int = 0) -> bool:
        token = self._tokens[min(self._index + offset, len(self._tokens) - 1)]
        return token.kind is Kind.NAME and token.text == word

    def _next_is(self, kind: Kind) -> bool:
        return self._tokens[min(self._index + 1, len(self._tokens) - 1)].kind is kind

    def constraint(self) -> Expr:
        if self._at(Kind.END):
            raise self._error("'['")
        parts: list[Expr] = []
        while not self._at(Kind.END):
            self._expect(Kind.LBRACKET)
            parts.append(self._or())
            self._expect(Kind.RBRACKET)
        if len(parts) == 1:
            return parts[0]
        return And(tuple(parts), Span(0, len(self._text)))

    def _or(self) -> Expr:
        return self._chain("or", self._and, Or)

    def _and(self) -> Expr:
        return self._chain("and", self._unary, And)

    def _chain(
        self,
        word: str,
        operand: Callable[[], Expr],
        node: Callable[[tuple[Expr, ...], Span], Expr],
    ) -> Expr:
        """``operand (word operand)*``: one operand as is, several joined in ``node``."""
        start = self._current.start
        operands = [operand()]
        while self._is_word(word):
            self._advance()
            operands.append(operand())
        if len(operands) == 1:
            return operands[0]
        return node(tuple(operands), self._span_from(start))

    def _unary(self) -> Expr:
        start = self._current.start
        if self._at(Kind.LPAREN):
            self._enter(self._advance())
            inner = self._or()
            self._expect(Kind.RPAREN)
            self._depth -= 1
            return inner
        if self._at(Kind.NAME) and self._next_is(Kind.LPAREN):
            return self._call(start)
        if not self._at(Kind.NAME):
            raise self._error("a condition (a member path, not(), contains() or '(')")
        path = self._path()
        if not self._at(Kind.OPERATOR):
            return Exists(path, path.span)
        operator = cast(Operator, self._advance().text)
        value = self._value()
        return Comparison(operator, path, value, self._span_from(start))

    def _call(self, start: int) -> Expr:
        name = self._advance().text
        self._expect(Kind.LPAREN)
        if name in ("true", "false"):
            self._expect(Kind.RPAREN)
            return Constant(name == "true", self._span_from(start))
        if name == "not":
            self._enter(self._tokens[self._index - 1])
            operand = self._or()
            self._expect(Kind.RPAREN)
            self._depth -= 1
            return Not(operand, self._span_from(start))
        function = _FUNCTIONS.get(name)
        if function is not None:
            path = self._path()
            self._expect(Kind.COMMA)
            value = self._value()
            self._expect(Kind.RPAREN)
            return Function(function, path, value, self._span_from(start))
        raise ConstraintError(
            f"unsupported function {name}(); supported: not, true, false, contains, starts-with",
            self._text,
            start,
            start + len(name),
        )

    def _enter(self, opening: Token) -> None:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ConstraintError(
                f"nested too deeply: at most {MAX_DEPTH} levels of '(' and not()",
                self._text,
                opening.start,
                opening.end,
            )

    def _path(self) -> Path:
        steps = [self._step()]
        while self._at(Kind.SLASH):
            self._advance()
            steps.append(self._step())
        return Path(tuple(steps), Span(steps[0].span.start, steps[-1].span.end))

    def _step(self) -> Step:
        token = self._expect(Kind.NAME)
        return Step(token.text, Span(token.start, token.end))

    def _value(self) -> Value:
        token = self._current
        span = Span(token.start, token.end)
        if token.kind is Kind.STRING:
            self._advance()
            text = token.text[1:-1].replace(token.text[0] * 2, token.text[0])
            quoted_token = _QUOTED_TOKEN.match(text)
            if quoted_token:
                return TokenRef(quoted_token.group(1), span)
            return Literal(text, span)
        if token.kind is Kind.TOKEN:
            self._advance()
            return TokenRef(token.text[2:-2], span)
        if token.kind is Kind.NUMBER:
            self._advance()
            number = Decimal(token.text) if "." in token.text else int(token.text)
            return Literal(number, span)
        if self._is_word("empty"):
            self._advance()
            return Empty(span)
        if (self._is_word("true") or self._is_word("false")) and self._next_is(Kind.LPAREN):
            self._advance()
            self._advance()
            closing = self._expect(Kind.RPAREN)
            return Literal(token.text == "true", Span(token.start, closing.end))
        raise self._error("a value (a string, a number, empty, true(), false() or a token)")

    def _span_from(self, start: int) -> Span:
        return Span(start, self._tokens[self._index - 1].end)
