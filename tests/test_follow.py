"""Follow's pure parts: the model's ``follow`` flag, what is captured, the push jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.models import SyncJob
from broker.wire import decode
from worker.capture import CaptureSpec, capture_specs
from worker.impact import reverse_sql
from worker.model import ModelError, parse_model
from worker.pushes import push_body

FOLLOW_MODEL = Path(__file__).with_name("follow_model.yaml")


@pytest.mark.parametrize(
    ("entity", "reason"),
    [
        ("{table: n, follow: true}", "not-in-offline-profile: Note"),
        ("{persistable: false, offline: true, follow: true}", "non-persistable-entity: Note"),
    ],
)
def test_only_an_offline_persistable_entity_can_be_followed(entity: str, reason: str):
    with pytest.raises(ModelError) as caught:
        parse_model(f"entities: {{Note: {entity}}}")
    assert caught.value.where == "entities.Note.follow"
    assert reason in str(caught.value)


def test_follow_is_off_unless_asked():
    model = parse_model("entities: {Note: {table: n, offline: true}}")
    assert model.followed == {}
    assert capture_specs(model) == {}


def test_the_followed_tables_those_on_their_paths_and_the_roles_are_captured():
    model = parse_model(FOLLOW_MODEL.read_text())
    assert capture_specs(model) == {
        "sync.user_role": CaptureSpec("System.User", "user_id"),
        "f_order": CaptureSpec("Order"),
        "f_customer": CaptureSpec("Customer"),
        "f_region": CaptureSpec("Region"),
        # Watch holds the association a path follows backwards: its old value is kept.
        "f_watch": CaptureSpec("Watch", refs={"order_id"}),
    }


def test_a_path_is_walked_back_from_the_changed_row_to_the_followed_entity():
    model = parse_model(FOLLOW_MODEL.read_text())
    (two_hops, reverse) = model.paths("Order")
    assert reverse_sql(model, "Order", two_hops) == (
        'SELECT t0.id FROM "public"."f_order" t0 JOIN "public"."f_customer" a1 '
        'ON a1.id = t0."customer_id" WHERE a1."region_id" = ANY($2::bigint[])'
    )
    # Through a reverse hop: the rows' association now, and as it was before the change.
    assert reverse_sql(model, "Order", reverse) == (
        'SELECT t0.id FROM "public"."f_order" t0 WHERE t0.id = ANY(ARRAY(SELECT x."order_id" '
        'FROM "public"."f_watch" x WHERE x.id = ANY($2::bigint[])) || $3::bigint[])'
    )


def test_a_push_is_a_sync_job_for_the_objects_by_entity():
    body = push_body("follow.42", "dev-1", 7, [("Order", 3), ("Memo", 9), ("Order", 1)])
    job = decode(SyncJob, body)
    assert job.job_id == "follow.42"
    assert (job.session.user_id, job.session.device_id) == (7, "dev-1")
    assert job.origin == "nanoflow"
    assert job.targets() == [("Memo", 9), ("Order", 1), ("Order", 3)]
