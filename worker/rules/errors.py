"""The one error a constraint raises, with the position of the mistake."""

from __future__ import annotations

__all__ = ["ConstraintError"]


class ConstraintError(ValueError):
    """A constraint does not parse or does not fit the model.

    ``position`` is the offset in ``text``; ``str()`` gives line, column and a caret::

        line 1, column 8: unknown member 'stauts' of WorkOrder
          [stauts = 'Open']
           ^^^^^^
    """

    def __init__(self, message: str, text: str, start: int, end: int | None = None) -> None:
        self.message = message
        self.text = text
        self.position = start
        self.end = max(end if end is not None else start + 1, start + 1)
        super().__init__(self._render())

    @property
    def line(self) -> int:
        return self.text.count("\n", 0, self.position) + 1

    @property
    def column(self) -> int:
        return self.position - (self.text.rfind("\n", 0, self.position) + 1) + 1

    def _render(self) -> str:
        line_start = self.text.rfind("\n", 0, self.position) + 1
        line_end = self.text.find("\n", self.position)
        source_line = self.text[line_start : line_end if line_end != -1 else len(self.text)]
        width = min(self.end, line_start + len(source_line) + 1) - self.position
        caret = " " * (self.column - 1) + "^" * max(width, 1)
        return f"line {self.line}, column {self.column}: {self.message}\n  {source_line}\n  {caret}"
