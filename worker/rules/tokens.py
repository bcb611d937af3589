"""Splits a constraint into tokens, each carrying its position in the text."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from worker.rules.errors import ConstraintError

__all__ = ["Kind", "Token", "tokenize"]


class Kind(Enum):
    LBRACKET = "'['"
    RBRACKET = "']'"
    LPAREN = "'('"
    RPAREN = "')'"
    COMMA = "','"
    SLASH = "'/'"
    OPERATOR = "a comparison operator"
    STRING = "a string"
    NUMBER = "a number"
    TOKEN = "a token"
    NAME = "a name"
    END = "the end of the constraint"


@dataclass(frozen=True, slots=True)
class Token:
    kind: Kind
    text: str
    start: int

    @property
    def end(self) -> int:
        return self.start + len(self.text)

    def describe(self) -> str:
        return Kind.END.value if self.kind is Kind.END else repr(self.text)


# Order matters: '[%' before '[', '<=' before '<', a negative number before a name.
_PATTERNS: tuple[tuple[Kind, str], ...] = (
    (Kind.TOKEN, r"\[%[A-Za-z0-9_.]+%\]"),
    (Kind.LBRACKET, r"\["),
    (Kind.RBRACKET, r"\]"),
    (Kind.LPAREN, r"\("),
    (Kind.RPAREN, r"\)"),
    (Kind.COMMA, r","),
    (Kind.SLASH, r"/"),
    (Kind.OPERATOR, r"!=|<=|>=|=|<|>"),
    (Kind.STRING, r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\""),
    (Kind.NUMBER, r"-?\d+(?:\.\d+)?(?![A-Za-z_])"),
    # Names may carry a module prefix (System.User) and a hyphen (starts-with).
    (Kind.NAME, r"[A-Za-z_][A-Za-z0-9_]*(?:[.-][A-Za-z_][A-Za-z0-9_]*)*"),
)
_SCANNER = re.compile("|".join(f"(?P<{kind.name}>{pattern})" for kind, pattern in _PATTERNS))


def tokenize(text: str) -> list[Token]:
    """All tokens of ``text``, ending with an ``END`` token.

    Example::

        [token.kind for token in tokenize("[a = 1]")]
        # [LBRACKET, NAME, OPERATOR, NUMBER, RBRACKET, END]
    """
    nul = text.find("\0")
    if nul != -1:
        # PostgreSQL text cannot hold it: refused here, with its position, not at sync time.
        raise ConstraintError("unexpected character '\\x00'", text, nul)
    tokens: list[Token] = []
    position = _skip_space(text, 0)
    while position < len(text):
        match = _SCANNER.match(text, position)
        if match is None:
            unclosed = text[position] in "'\""
            message = "unclosed string" if unclosed else f"unexpected character {text[position]!r}"
            raise ConstraintError(message, text, position)
        assert match.lastgroup is not None
        tokens.append(Token(Kind[match.lastgroup], match.group(), position))
        position = _skip_space(text, match.end())
    tokens.append(Token(Kind.END, "", len(text)))
    return tokens


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position
