"""Lists by constraint (SPEC §13): a job's queries, checked when the job is claimed and
turned into objects under the device's lock.

A query's constraint is compiled by the access rules' compiler (the same grammar, tokens
and errors), so a bad one rejects the job before any device work. Under the lock, each
query lists the matching ids the user may read (``AccessPolicy.listing``), a chunk at a
time; they join the job's targets and go the way named objects go (fetch, decide, send).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from broker.models import MAX_OBJECTS_PER_JOB, ObjectKey, SyncJob
from worker.access import AccessPolicy
from worker.errors import JobRejected
from worker.model import DomainModel
from worker.rules import Constraint, ConstraintError, check_constraint

__all__ = ["CompiledQuery", "compile_queries", "list_targets"]

# A parser message quotes the input it stopped at; a reason stays one short line.
_MAX_MESSAGE = 200


@dataclass(frozen=True)
class CompiledQuery:
    entity: str
    constraint: Constraint


def compile_queries(job: SyncJob, model: DomainModel) -> tuple[CompiledQuery, ...]:
    """The job's queries, compiled; ``JobRejected`` (``invalid-query: ...``, with the line
    and column) for the first that does not compile. Their entities must have passed
    ``check_job_names``.

    A query compares members of its entity only: following an association would test
    another object's members, which the user may not be allowed to read.
    """
    compiled = []
    for query in job.queries:
        try:
            constraint = check_constraint(
                query.constraint, entities=model.entities, entity=query.entity, hops=False
            )
        except ConstraintError as error:
            message = error.message
            if len(message) > _MAX_MESSAGE:
                message = message[: _MAX_MESSAGE - 3] + "..."
            raise JobRejected(
                f"invalid-query: {query.entity}: line {error.line}, column {error.column}: "
                f"{message}"
            ) from None
        compiled.append(CompiledQuery(query.entity, constraint))
    return tuple(compiled)


async def list_targets(
    conn: asyncpg.Connection,
    policy: AccessPolicy,
    targets: Sequence[ObjectKey],
    queries: Sequence[CompiledQuery],
    *,
    user_id: int,
    roles: frozenset[str],
    chunk_size: int,
) -> list[ObjectKey]:
    """``targets`` followed by what ``queries`` list, each object once; ``JobRejected``
    (``query-too-large: ...``) past ``MAX_OBJECTS_PER_JOB`` objects in all, found
    without reading more than one object past the limit."""
    found = dict.fromkeys(targets)
    for query in queries:
        listing = policy.listing(query.entity, roles, query.constraint)
        before, after = len(found), 0
        while listing is not None:
            room = MAX_OBJECTS_PER_JOB - len(found)
            limit = min(chunk_size, room + 1)
            # fetch() keeps the statement prepared per connection: one round trip a chunk.
            ids = [
                record[0]
                for record in await conn.fetch(
                    listing.sql, *listing.arguments(after, limit, user_id=user_id)
                )
            ]
            found.update(dict.fromkeys((query.entity, object_id) for object_id in ids))
            if len(found) > MAX_OBJECTS_PER_JOB:
                raise JobRejected(_too_large(query.entity, before))
            if len(ids) < limit:
                break
            after = ids[-1]
    return list(found)


def _too_large(entity: str, before: int) -> str:
    besides = f" besides the {before} the job has already" if before else ""
    return (
        f"query-too-large: {entity} matches more than {MAX_OBJECTS_PER_JOB - before} "
        f"objects{besides}; at most {MAX_OBJECTS_PER_JOB} per job"
    )
