"""The wire contract: every message that crosses RabbitMQ, as frozen pydantic models.

Each message carries a literal ``schema_version``; a reader rejects versions it does not
know with a clear reason instead of guessing. A change that breaks readers gets a new
version.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    Strict,
    model_serializer,
    model_validator,
)

__all__ = [
    "DEVICE_ID_PATTERN",
    "ENTITY_NAME_PATTERN",
    "JOB_ID_PATTERN",
    "MAX_CONSTRAINT_LENGTH",
    "MAX_ID",
    "MAX_OBJECTS_PER_JOB",
    "MAX_QUERIES_PER_JOB",
    "Change",
    "ChangeBatch",
    "ObjectKey",
    "ObjectList",
    "ObjectOutcome",
    "ObjectRef",
    "Origin",
    "OverlayChange",
    "Query",
    "RemoveChange",
    "RemoveReason",
    "ResyncChange",
    "Session",
    "SyncJob",
    "SyncProgress",
    "SyncResult",
    "UncommittedChange",
    "UpsertChange",
]

# Entities may be module-qualified (System.User); members are plain identifiers.
ENTITY_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,62}(\.[A-Za-z][A-Za-z0-9_]{0,62})?$"
MEMBER_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_]{0,62}$"
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
# Job and batch ids, and reasons taken from the broker: safe in a log line as they are.
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
# Ids and versions are PostgreSQL bigints.
MAX_ID = 2**63 - 1
# Bounds the work one job can cause; larger selections are split by the caller.
MAX_OBJECTS_PER_JOB = 100_000
# Queries' constraints are parsed by the worker; these bound the parsing a job can cause
# (the length is of all the job's constraints together).
MAX_CONSTRAINT_LENGTH = 4_000
MAX_QUERIES_PER_JOB = 100

EntityName = Annotated[str, Field(pattern=ENTITY_NAME_PATTERN)]
MemberName = Annotated[str, Field(pattern=MEMBER_NAME_PATTERN)]
DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
JobId = Annotated[str, Field(pattern=JOB_ID_PATTERN)]
# Strict: a JSON id is an integer, never "5" or true. (ObjectRef's own __init__ would
# otherwise validate in lax mode even when the message is read strictly.)
ObjectId = Annotated[int, Strict(), Field(ge=1, le=MAX_ID)]
# Row versions are PostgreSQL bigints; SQLite's INTEGER holds the same range.
Version = Annotated[int, Strict(), Field(ge=0, le=MAX_ID)]
# Batches of a job, counted from 1.
Count = Annotated[int, Strict(), Field(ge=1, le=MAX_ID)]
Origin = Literal["nanoflow", "event"]
RemoveReason = Literal["deleted", "gone", "no-access"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _version_required(schema: dict[str, Any]) -> None:
    """Python callers get ``schema_version`` by default; on the wire it is required."""
    schema["required"] = ["schema_version", *schema.get("required", [])]


class _Message(_Frozen):
    """A whole message on the wire, as opposed to a part of one."""

    model_config = ConfigDict(json_schema_extra=_version_required)


# An object as (entity, id): how the worker keys the objects of a job internally.
ObjectKey = tuple[str, int]


class _Positional(_Frozen):
    """A part callers build positionally, fields in the order of ``_positional``.

    Validation calls a model's own ``__init__`` with the input's keys as they are, so it
    takes any keys: a missing or unknown field gets pydantic's error, not a TypeError."""

    _positional: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *args: Any, **fields: Any) -> None:
        if len(args) > len(self._positional):
            raise TypeError(f"{type(self).__name__} takes {len(self._positional)} arguments")
        super().__init__(**dict(zip(self._positional, args, strict=False)), **fields)


class ObjectRef(_Positional):
    """One object, by entity and id: ``ObjectRef("WorkOrder", 1)``."""

    _positional = ("entity", "id")
    entity: EntityName
    id: ObjectId

    if TYPE_CHECKING:

        def __init__(self, entity: str, id: int) -> None: ...


class ObjectList(_Positional):
    """A list of objects of one entity: ``ObjectList("WorkOrder", [1, 2, 3])``."""

    _positional = ("entity", "ids")
    entity: EntityName
    ids: tuple[ObjectId, ...]

    if TYPE_CHECKING:

        def __init__(self, entity: str, ids: list[int] | tuple[int, ...]) -> None: ...


class Query(_Positional):
    """The objects of one entity that match an XPath constraint (SPEC §5) and that the
    user may read: ``Query("WorkOrder", "[status = 'Open']")``. The worker parses the
    constraint with the access rules' compiler."""

    _positional = ("entity", "constraint")
    entity: EntityName
    constraint: Annotated[str, Field(min_length=1, max_length=MAX_CONSTRAINT_LENGTH)]

    if TYPE_CHECKING:

        def __init__(self, entity: str, constraint: str) -> None: ...


class Session(_Frozen):
    """Who asks: the session's user and the device the call came from."""

    user_id: ObjectId
    device_id: DeviceId


class UncommittedChange(_Frozen):
    """Changes the server action made to an object without committing them."""

    ref: ObjectRef
    changes: dict[MemberName, Any]

    @property
    def key(self) -> ObjectKey:
        return (self.ref.entity, self.ref.id)


class SyncJob(_Message):
    """A request to synchronize objects to the session's device."""

    schema_version: Literal[1] = 1
    job_id: JobId
    session: Session
    origin: Origin
    objects: tuple[ObjectRef, ...] = ()
    lists: tuple[ObjectList, ...] = ()
    # Resolved by the worker into objects, appended to the named ones (``targets()``).
    queries: tuple[Query, ...] = Field(default=(), max_length=MAX_QUERIES_PER_JOB)
    deleted: tuple[ObjectRef, ...] = ()
    new: tuple[ObjectRef, ...] = ()
    uncommitted: tuple[UncommittedChange, ...] = ()

    @model_validator(mode="after")
    def _bounded(self) -> SyncJob:
        named = len(self.objects) + sum(len(object_list.ids) for object_list in self.lists)
        context = len(self.deleted) + len(self.new) + len(self.uncommitted)
        if named + context > MAX_OBJECTS_PER_JOB:
            raise ValueError(
                f"job names {named + context} objects; at most {MAX_OBJECTS_PER_JOB} per job"
            )
        text = sum(len(query.constraint) for query in self.queries)
        if text > MAX_CONSTRAINT_LENGTH:
            raise ValueError(
                f"the queries' constraints have {text} characters; at most "
                f"{MAX_CONSTRAINT_LENGTH} per job"
            )
        return self

    @model_serializer(mode="wrap")
    def _without_unused_queries(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # Written only when there are some: workers from before queries refuse the field
        # (extra="forbid"), and keep reading every other job as they did.
        data: dict[str, Any] = handler(self)
        if not self.queries:
            data.pop("queries", None)
        return data

    def targets(self) -> list[ObjectKey]:
        """The named objects as ``(entity, id)``, each once, in the order first named.

        Plain tuples, not ``ObjectRef``s: a bulk job names up to 100,000 objects, and the
        entity and ids were validated with the job already.
        """
        keys = [(ref.entity, ref.id) for ref in self.objects]
        for object_list in self.lists:
            keys.extend((object_list.entity, object_id) for object_id in object_list.ids)
        return list(dict.fromkeys(keys))


class UpsertChange(_Frozen):
    op: Literal["upsert"] = "upsert"
    entity: EntityName
    id: ObjectId
    version: Version
    data: dict[str, Any]


class RemoveChange(_Frozen):
    op: Literal["remove"] = "remove"
    entity: EntityName
    id: ObjectId
    reason: RemoveReason
    # The row version the worker saw, when the row still existed.
    version: Version | None = None


class OverlayChange(_Frozen):
    """Uncommitted changes of the call, shown to the app on top of the committed state."""

    op: Literal["overlay"] = "overlay"
    entity: EntityName
    id: ObjectId
    changes: dict[str, Any]


class ResyncChange(_Frozen):
    """Batches for this device were lost (its queue overflowed or they expired unread).

    The device must synchronize everything it holds again; ``reason`` is the broker's
    dead-letter reason (``maxlen`` or ``expired``) and ``since`` when the first was lost.
    """

    op: Literal["resync"] = "resync"
    reason: Annotated[str, Field(pattern=JOB_ID_PATTERN)]
    since: datetime


Change = Annotated[
    UpsertChange | RemoveChange | OverlayChange | ResyncChange, Field(discriminator="op")
]


class ChangeBatch(_Message):
    """A bounded group of changes for one device, applied in one SQLite transaction.

    ``position`` is the batch's place (from 1) among the ``total`` batches of its job, so
    a device can tell how far it has applied a job.
    """

    schema_version: Literal[1] = 1
    batch_id: JobId
    job_id: JobId
    device_id: DeviceId
    position: Count
    total: Count
    changes: tuple[Change, ...]

    @model_validator(mode="after")
    def _placed(self) -> ChangeBatch:
        if self.position > self.total:
            raise ValueError(f"position {self.position} is past the total {self.total}")
        return self


class ObjectOutcome(_Frozen):
    entity: EntityName
    id: ObjectId
    outcome: Literal["synced", "removed", "skipped"]
    reason: str | None = None


class SyncResult(_Message):
    """What the caller learns about its job."""

    schema_version: Literal[1] = 1
    job_id: JobId
    status: Literal["done", "ignored", "rejected"]
    reason: str | None = None
    synced: int = 0
    removed: int = 0
    skipped: int = 0
    objects: tuple[ObjectOutcome, ...] = ()
    # The batches that carry this job's changes; the device has applied the job once
    # its store lists all of them.
    batch_ids: tuple[str, ...] = ()


class SyncProgress(_Message):
    """How far a job has come: ``published`` of its ``total`` batches are confirmed by the
    broker. Sent to a caller that asked for progress, before its ``SyncResult``."""

    schema_version: Literal[1] = 1
    job_id: JobId
    published: Count
    total: Count

    @model_validator(mode="after")
    def _bounded(self) -> SyncProgress:
        if self.published > self.total:
            raise ValueError(f"published {self.published} is past the total {self.total}")
        return self
