"""Model file loading: valid files load, bad ones fail at load with the position."""

from __future__ import annotations

import pytest

from worker.model import EXAMPLE_MODEL, ModelError, parse_model
from worker.sql import quote_ident

EXAMPLE = EXAMPLE_MODEL


def test_example_model_loads_with_its_offline_profile():
    model = parse_model(EXAMPLE.read_text())
    assert set(model.offline_entities) == {"WorkOrder", "Technician", "Customer"}
    assert model.why_not_syncable("Attachment") == "file-entity: Attachment"
    assert model.why_not_syncable("DraftNote") == "non-persistable-entity: DraftNote"
    assert model.why_not_syncable("Invoice") == "not-in-offline-profile: Invoice"


def test_file_entity_is_found_through_generalization_chain():
    model = parse_model(
        """
        entities:
          Doc: {table: doc, generalization: System.FileDocument, offline: true}
          Scan: {table: scan, generalization: Doc, offline: true}
        """
    )
    assert model.is_file("Scan")


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("entities: {A: {offline: true}}", "entities.A", "needs a 'table'"),
        ("entities: {A: {table: 'a; drop table x'}}", "entities.A.table", "should match pattern"),
        ("entities: {'A b': {table: a}}", "entities.A b.[key]", "should match pattern"),
        (
            "entities: {A: {table: a, attributes: {'x\" text); drop table a; --': string}}}",
            'entities.A.attributes.x" text); drop table a; --.[key]',
            "should match pattern",
        ),
        (
            "entities: {A: {table: a, associations: {A_B: {to: A, column: 'b; drop table a'}}}}",
            "entities.A.associations.A_B.column",
            "should match pattern",
        ),
        (
            "entities: {A: {table: a, attributes: {t: text}}}",
            "entities.A.attributes.t",
            "Input should be",
        ),
        (
            "entities: {A: {table: a, attributes: {id: string}}}",
            "entities.A",
            "reserved member names",
        ),
        ("entities: {A: {table: a, colour: red}}", "entities.A.colour", "Extra inputs"),
        (
            "entities: {A: {table: a, associations: {A_B: {to: B, column: b_id}}}}",
            "entities.A.associations.A_B.to",
            "unknown entity 'B'",
        ),
        (
            "entities: {A: {table: a, access: [{roles: [R], read: [x]}]}}",
            "entities.A.access[0].read",
            "unknown members ['x']",
        ),
        (
            "entities: {A: {table: a, access: [{roles: [], read: '*'}]}}",
            "entities.A.access.0.roles",
            "at least 1",
        ),
        ("entities: [", "line 1, column 12", "not valid YAML"),
    ],
)
def test_bad_model_fails_at_load_with_position(text: str, where: str, message: str):
    with pytest.raises(ModelError) as raised:
        parse_model(text, "m.yaml")
    assert raised.value.where == where
    assert message in str(raised.value)


def test_sql_identifiers_are_quoted_and_anything_else_refused():
    with pytest.raises(ValueError, match="not a safe SQL identifier"):
        quote_ident('x"; drop table t; --')
