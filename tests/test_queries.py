"""Queries as pure logic: the wire field, compiling at claim time, the listing's SQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker import Query, Session, SyncJob
from broker.models import MAX_CONSTRAINT_LENGTH, MAX_QUERIES_PER_JOB
from broker.wire import WireError, decode, json_schema
from worker.access import AccessPolicy
from worker.eligibility import check_job_names
from worker.errors import JobRejected
from worker.model import parse_model
from worker.queries import compile_queries

MODEL = parse_model(Path(__file__).with_name("model.yaml").read_text())
SESSION = Session(user_id=7, device_id="dev-1")


def _job(*queries: Query) -> SyncJob:
    return SyncJob(job_id="job-1", session=SESSION, origin="nanoflow", queries=queries)


def _body(**fields: object) -> bytes:
    job = {
        "schema_version": 1,
        "job_id": "job-1",
        "session": {"user_id": 7, "device_id": "dev-1"},
        "origin": "nanoflow",
        **fields,
    }
    return json.dumps(job).encode()


def test_a_job_with_queries_reads_the_same_on_the_fast_and_the_careful_path():
    job = _job(Query("Task", '[status = "Open"]'), Query("Task", "[title = 'é']"))
    compact = job.model_dump_json().encode()
    spaced = json.dumps(json.loads(compact), indent=1).encode()
    assert decode(SyncJob, compact) == decode(SyncJob, spaced) == job


def test_a_job_without_queries_is_written_as_before_queries():
    # A worker from before queries refuses the field: a job that uses none leaves it out.
    assert "queries" not in json.loads(_job().model_dump_json())
    assert "queries" in json.loads(_job(Query("Task", "[a = 1]")).model_dump_json())


@pytest.mark.parametrize(
    ("queries", "reason"),
    [
        ([{"entity": "Task"}], "invalid-job: queries.0.constraint: Field required"),
        (
            [{"entity": "Task", "constraint": ""}],
            "invalid-job: queries.0.constraint: String should",
        ),
        (
            [{"entity": "Task", "constraint": "[" + "a" * MAX_CONSTRAINT_LENGTH + "]"}],
            "invalid-job: queries.0.constraint: String should have at most 4000 characters",
        ),
        ([{"entity": "no such", "constraint": "[a = 1]"}], "invalid-job: queries.0.entity:"),
        (
            [{"entity": "Task", "constraint": "[a = 1]"}] * (MAX_QUERIES_PER_JOB + 1),
            "invalid-job: queries: Tuple should have at most 100 items",
        ),
        (
            [{"entity": "Task", "constraint": "[" + "a" * 1998 + "]"}] * 2
            + [{"entity": "Task", "constraint": "[]"}],
            "invalid-job: the queries' constraints have 4002 characters; at most 4000 per job",
        ),
        (
            [{"entity": "Task", "constraint": "[a = 1]", "sql": "x"}],
            "invalid-job: queries.0.sql: Extra inputs are not permitted",
        ),
    ],
)
def test_a_malformed_query_is_refused_on_the_wire(queries: list[object], reason: str):
    with pytest.raises(WireError) as refused:
        decode(SyncJob, _body(queries=queries))
    assert refused.value.reason.startswith(reason)


def test_the_job_schema_describes_queries():
    schema = json_schema("job")
    assert schema["properties"]["queries"]["items"] == {"$ref": "#/$defs/Query"}
    assert schema["properties"]["queries"]["maxItems"] == MAX_QUERIES_PER_JOB
    query = schema["$defs"]["Query"]
    assert query["required"] == ["entity", "constraint"]
    assert query["properties"]["constraint"]["maxLength"] == MAX_CONSTRAINT_LENGTH
    assert query["additionalProperties"] is False


def test_a_query_entity_is_checked_as_a_named_one_is():
    job = _job(Query("Task", "[status = 'x']"), Query("Report", "[text = 'x']"))
    with pytest.raises(JobRejected) as rejected:
        check_job_names(job, MODEL, job.targets())
    assert rejected.value.reason == "not-in-offline-profile: Report"


def test_queries_compile_once_at_claim_time():
    job = _job(Query("Task", "[status = 'Open']"), Query("Ticket", "[priority > 2]"))
    compiled = compile_queries(job, MODEL)
    assert [(query.entity, query.constraint.members) for query in compiled] == [
        ("Task", frozenset({"status"})),
        ("Ticket", frozenset({"priority"})),
    ]


def test_a_bad_query_is_one_line_naming_the_entity_and_the_position():
    job = _job(Query("Task", "[status = 'Open']"), Query("Task", "[status = 'x'\n and ]"))
    with pytest.raises(JobRejected) as rejected:
        compile_queries(job, MODEL)
    assert rejected.value.reason == (
        "invalid-query: Task: line 2, column 6: expected a condition (a member path, not(), "
        "contains() or '('), found ']'"
    )


def test_a_long_input_quoted_in_the_reason_is_cut():
    job = _job(Query("Task", "[due = '" + "x" * 3000 + "']"))
    with pytest.raises(JobRejected) as rejected:
        compile_queries(job, MODEL)
    reason = rejected.value.reason
    assert reason.startswith("invalid-query: Task: line 1, column 8: not an ISO 8601 date")
    assert reason.endswith("xxx...") and len(reason) < 260 and "\n" not in reason


def _listing(entity: str, roles: set[str], constraint: str):
    [query] = compile_queries(_job(Query(entity, constraint)), MODEL)
    return AccessPolicy(MODEL).listing(entity, frozenset(roles), query.constraint)


def test_a_listing_is_keyset_paged_with_values_bound():
    listing = _listing("Task", {"Admin"}, "[status = 'x'' OR 1=1']")
    assert listing is not None
    assert listing.sql == (
        'SELECT t0.id FROM "public"."t_task" t0 WHERE t0.id > $1::bigint AND '
        '((lower(t0."status") = lower($3::text)) IS TRUE) ORDER BY t0.id LIMIT $2::int'
    )
    assert listing.arguments(41, 500, user_id=7) == [41, 500, "x' OR 1=1"]


def test_a_listing_asks_that_a_rule_granting_each_compared_member_matches():
    listing = _listing("Ticket", {"Member"}, "[status = 'Open']")
    assert listing is not None
    # Only the project manager's rule lets a Member read a ticket's status.
    assert 'a1."manager_id" = $4::bigint' in listing.sql
    assert "owner_id" not in listing.sql
    assert listing.params.values(user_id=7) == ["Open", 7]


@pytest.mark.parametrize(
    ("entity", "roles", "constraint"),
    [
        ("Task", {"Worker"}, "[secret = 'x']"),  # no rule of theirs grants it
        ("Task", set(), "[status = 'x']"),  # no rule applies
        ("Task", {"Admin"}, "[false()]"),
    ],
)
def test_a_listing_that_can_match_nothing_is_not_run(entity: str, roles: set[str], constraint: str):
    assert _listing(entity, roles, constraint) is None
