"""Reading messages off the wire: strict JSON first, then the pydantic model.

Senders are often not Python, so nothing is guessed: ids must be JSON integers (``"5"``
and ``true`` are refused), ``schema_version`` must be present, and JSON that parsers
disagree on (duplicate keys, ``NaN``, ``Infinity``) is refused. A refusal carries a
precise reason that is safe to log and to send back: input is quoted, never pasted in.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from broker.models import ChangeBatch, SyncJob, SyncResult

__all__ = ["MESSAGES", "WireError", "decode", "json_schema", "quoted"]

M = TypeVar("M", bound=BaseModel)

# What `syncctl schema NAME` prints, and what each reader calls the message in reasons.
MESSAGES: dict[str, type[BaseModel]] = {"job": SyncJob, "result": SyncResult, "batch": ChangeBatch}

_SAFE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


class WireError(ValueError):
    """A message that cannot be read; ``reason`` says why (``malformed-json: ...``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def quoted(value: object, *, limit: int = 64) -> str:
    """``value`` as it may appear in a reason or a log line: plain when it is a safe
    token, else JSON-quoted (control characters escaped) and cut to ``limit`` characters."""
    text = str(value)
    if _SAFE.fullmatch(text):
        return text
    return json.dumps(text[:limit])


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Runs for every JSON object (a bulk result has 100,000): the dict is built in C, and
    # the keys are only walked when they turn out not to be unique.
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise WireError(f"malformed-json: duplicate key {quoted(key)}")
            seen.add(key)
    return data


def _no_constants(name: str) -> None:
    raise WireError(f"malformed-json: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        # 1e999 is read as infinity, which JSON cannot say and writers turn into null.
        raise WireError(f"malformed-json: {quoted(text)} is too large for a JSON number")
    return value


def _strict_json(body: bytes) -> object:
    try:
        # Decoded here, strictly: UTF-16 or a byte order mark is refused, not guessed at.
        text = body.decode("utf-8")
        return json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constants,
            parse_float=_finite,
        )
    except WireError:
        raise
    except UnicodeDecodeError:
        raise WireError("malformed-json: not UTF-8") from None
    except json.JSONDecodeError as error:
        raise WireError(
            f"malformed-json: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None


def _describe(what: str, error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(quoted(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return f"invalid-{what}: {where}: {message}" if where else f"invalid-{what}: {message}"


def decode(model: type[M], body: bytes) -> M:
    """Read one message of type ``model`` from ``body``; raises ``WireError``.

    Example::

        job = decode(SyncJob, message.body)
    """
    data = _strict_json(body)
    what = next(name for name, known in MESSAGES.items() if known is model)
    if not isinstance(data, dict):
        raise WireError(f"invalid-{what}: expected a JSON object")
    version = data.get("schema_version")
    if version != model.model_fields["schema_version"].default or type(version) is not int:
        # As JSON, so the string "1" does not read like the number 1; None when missing.
        shown = json.dumps(version)[:64] if "schema_version" in data else "None"
        raise WireError(f"unsupported-schema-version: {shown}")
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as error:
        raise WireError(_describe(what, error)) from None


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of a message (``job``, ``result`` or ``batch``), as readers check it."""
    return MESSAGES[name].model_json_schema()
