"""Reading messages off the wire: strict JSON first, then the pydantic model.

Senders are often not Python, so nothing is guessed: ids must be JSON integers (``"5"``
and ``true`` are refused), ``schema_version`` must be present, and JSON that parsers
disagree on (duplicate keys, ``NaN``, ``Infinity``) is refused. A refusal carries a
precise reason that is safe to log and to send back: input is quoted, never pasted in.

Change batches have a second reader, ``decode_batch``, for the device agent's hot path:
it gives plain structs (no pydantic models) and takes the same batches as ``decode``.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from pydantic import BaseModel, ValidationError

from broker.models import (
    DEVICE_ID_PATTERN,
    ENTITY_NAME_PATTERN,
    JOB_ID_PATTERN,
    MAX_ID,
    ChangeBatch,
    SyncJob,
    SyncProgress,
    SyncResult,
)

__all__ = [
    "MESSAGES",
    "ReadBatch",
    "ReadChange",
    "ReadOverlay",
    "ReadRemove",
    "ReadResync",
    "ReadUpsert",
    "WireError",
    "as_read_batch",
    "decode",
    "decode_batch",
    "json_schema",
    "quoted",
]

M = TypeVar("M", bound=BaseModel)

# What `syncctl schema NAME` prints, and what each reader calls the message in reasons.
MESSAGES: dict[str, type[BaseModel]] = {
    "job": SyncJob,
    "result": SyncResult,
    "progress": SyncProgress,
    "batch": ChangeBatch,
}

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


_ANY = msgspec.json.Decoder()
# Writes back what the fast paths read (``_strict_json``, ``_takes``), to compare bytes.
_ENCODER = msgspec.json.Encoder()


def _strict_json(body: bytes) -> object:
    # Fast path: a body that msgspec reads and writes back to the same bytes has no
    # duplicate key (the object would shrink), no NaN, no number too large for a double
    # and no other spelling parsers could read differently, so the checks below would
    # pass; it is read once, in C. Senders' compact JSON (pydantic's, JSON.stringify's)
    # takes it; anything else takes the careful path, with its precise reasons.
    try:
        data = _ANY.decode(body)
    except msgspec.DecodeError:
        pass
    else:
        if _ENCODER.encode(data) == body:
            return data
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
    """The JSON Schema of a message (``job``, ``result``, ``progress`` or ``batch``), as
    readers check it."""
    return MESSAGES[name].model_json_schema()


# The batch reader. ``decode`` runs Python for every JSON object (the duplicate-key hook)
# and builds a pydantic model per change: a 500-object batch takes about 8 ms. This one
# reads the batch into msgspec structs in C, then proves it is a batch ``decode`` takes by
# encoding it again: a body that is byte for byte what its own structs encode to holds no
# duplicate key (the encoding writes each key once), no NaN, no whitespace and no escape
# a parser could read another way, and every value passed the structs' types, which are
# no looser than the models'. The worker writes exactly that encoding (pydantic's compact
# JSON). Any other spelling, and anything the structs refuse, goes to ``decode``: its
# reason on a refusal, else its batch in the same structs.


def _anchored(pattern: str) -> str:
    # msgspec matches with Python's re, where ``$`` also matches before a final newline;
    # pydantic's patterns end at the end of the string.
    return pattern.removesuffix("$") + r"\Z"


_Id = Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]
_Version = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
_Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]
_JobId = Annotated[str, msgspec.Meta(pattern=_anchored(JOB_ID_PATTERN))]
_DeviceId = Annotated[str, msgspec.Meta(pattern=_anchored(DEVICE_ID_PATTERN))]
_ENTITY_NAME = re.compile(ENTITY_NAME_PATTERN)
# pydantic's JSON parser refuses nesting past about 200 levels; msgspec reads deeper. A
# body with this many brackets besides the batch's own goes to ``decode``.
_MAX_VALUE_BRACKETS = 100


class ReadUpsert(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="op", tag="upsert"
):
    # The entity's pattern is checked once per entity and batch (``_takes``): a pattern
    # per change would cost more than the rest of the reading.
    entity: str
    id: _Id
    version: _Version
    data: dict[str, Any]


class ReadRemove(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="op", tag="remove"
):
    entity: str
    id: _Id
    reason: Literal["deleted", "gone", "no-access"]
    # UNSET when the key is missing, so that encoding again leaves it out as well.
    version: _Version | msgspec.UnsetType | None = msgspec.UNSET


class ReadOverlay(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="op", tag="overlay"
):
    entity: str
    id: _Id
    changes: dict[str, Any]


class ReadResync(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="op", tag="resync"
):
    reason: _JobId
    since: datetime


ReadChange = ReadUpsert | ReadRemove | ReadOverlay | ReadResync


class ReadBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A ``ChangeBatch`` as ``decode_batch`` reads it: the same fields, in plain structs."""

    schema_version: Literal[1]
    batch_id: _JobId
    job_id: _JobId
    device_id: _DeviceId
    position: _Count
    total: _Count
    changes: tuple[ReadChange, ...]

    def __post_init__(self) -> None:
        if self.position > self.total:
            # msgspec reports it as a ValidationError; ``decode`` then gives the reason.
            raise ValueError("position past the total")


_BATCH = msgspec.json.Decoder(ReadBatch)


def _takes(batch: ReadBatch, body: bytes) -> bool:
    """Whether ``decode`` would read ``body`` as ``batch`` (see above)."""
    entities: set[str] = set()
    own = 2  # the batch's own brackets: the envelope and its list of changes
    for change in batch.changes:
        if isinstance(change, ReadResync):
            own += 1
        else:
            entities.add(change.entity)
            # the change, and the data of an upsert or the changes of an overlay
            own += 1 if isinstance(change, ReadRemove) else 2
    if not all(_ENTITY_NAME.fullmatch(entity) for entity in entities):
        return False
    if body.count(b"[") + body.count(b"{") - own > _MAX_VALUE_BRACKETS:
        return False
    return _ENCODER.encode(batch) == body


def as_read_batch(batch: ChangeBatch) -> ReadBatch:
    """A batch built in Python, in the structs ``decode_batch`` gives."""
    changes: list[ReadChange] = []
    for change in batch.changes:
        if change.op == "upsert":
            changes.append(ReadUpsert(change.entity, change.id, change.version, change.data))
        elif change.op == "remove":
            changes.append(ReadRemove(change.entity, change.id, change.reason, change.version))
        elif change.op == "overlay":
            changes.append(ReadOverlay(change.entity, change.id, change.changes))
        else:
            changes.append(ReadResync(change.reason, change.since))
    return ReadBatch(
        1,
        batch.batch_id,
        batch.job_id,
        batch.device_id,
        batch.position,
        batch.total,
        tuple(changes),
    )


def decode_batch(body: bytes) -> ReadBatch:
    """Read a change batch from ``body`` as ``decode(ChangeBatch, body)`` would, into
    plain structs; raises ``WireError`` with ``decode``'s reason.

    Example::

        batch = decode_batch(message.body)
        upserts = [c for c in batch.changes if isinstance(c, ReadUpsert)]
    """
    try:
        batch = _BATCH.decode(body)
    except msgspec.DecodeError:  # also msgspec.ValidationError
        pass
    else:
        if _takes(batch, body):
            return batch
    return as_read_batch(decode(ChangeBatch, body))
