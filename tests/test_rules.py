"""The constraint parser and compiler as pure logic: each construct, each error's position."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from worker.model import ModelError, parse_model
from worker.rules import ConstraintError, Parameters, check_constraint, parse
from worker.rules.ast import (
    And,
    Comparison,
    Constant,
    Empty,
    Exists,
    Function,
    Literal,
    Not,
    Or,
    Span,
    TokenRef,
)
from worker.rules.tokens import Kind, tokenize

MODEL = parse_model(Path(__file__).with_name("model.yaml").read_text())


def _compile(text: str, entity: str = "Ticket") -> tuple[str, Parameters]:
    params = Parameters(first=2)
    constraint = check_constraint(text, entities=MODEL.entities, entity=entity)
    return constraint.sql(params), params


def test_tokens_carry_their_position():
    tokens = tokenize("[a/B.c >= '[%CurrentUser%]' or [%X%]]")
    assert [(t.kind, t.start) for t in tokens] == [
        (Kind.LBRACKET, 0),
        (Kind.NAME, 1),
        (Kind.SLASH, 2),
        (Kind.NAME, 3),
        (Kind.OPERATOR, 7),
        (Kind.STRING, 10),
        (Kind.NAME, 28),
        (Kind.TOKEN, 31),
        (Kind.RBRACKET, 36),
        (Kind.END, 37),
    ]


def test_brackets_join_with_and_and_and_binds_tighter_than_or():
    tree = parse("[a = 1 or b = 2 and c = 3][d = empty]")
    assert isinstance(tree, And)
    first, second = tree.operands
    assert isinstance(first, Or)
    assert isinstance(first.operands[1], And)
    assert isinstance(second, Comparison)
    assert (second.value, second.span) == (Empty(Span(31, 36)), Span(27, 36))


def test_values_of_each_kind():
    tree = parse(
        "[a = 'it''s' and b = \"q\" and c = -2 and d = 1.50 and e = true() and f = false()"
        " and g = '[%CurrentUser%]' and h = [%BeginOfCurrentDay%]]"
    )
    assert isinstance(tree, And)
    values = [item.value for item in tree.operands if isinstance(item, Comparison)]
    assert [v.value if isinstance(v, Literal) else v.name for v in values] == [  # type: ignore[union-attr]
        "it's",
        "q",
        -2,
        Decimal("1.50"),
        True,
        False,
        "CurrentUser",
        "BeginOfCurrentDay",
    ]
    assert isinstance(values[6], TokenRef)


def test_not_parentheses_functions_constants_and_paths():
    tree = parse("[not((A/B/c = 1)) and contains(x, 'y') and starts-with(x, 'z') and true()][P/Q]")
    assert isinstance(tree, And)
    inner, path = tree.operands
    assert isinstance(inner, And)
    negated, contains, starts, constant = inner.operands
    assert isinstance(negated, Not) and isinstance(negated.operand, Comparison)
    assert [step.name for step in negated.operand.path.steps] == ["A", "B", "c"]
    assert isinstance(contains, Function) and contains.name == "contains"
    assert isinstance(starts, Function) and starts.name == "starts-with"
    assert constant == Constant(True, Span(67, 73))
    assert isinstance(path, Exists) and path.span == Span(75, 78)


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        ("", 0, "expected '[', found the end"),
        ("status = 'x'", 0, "expected '[', found 'status'"),
        ("[status = 'x'", 13, "expected ']', found the end"),
        ("[status = ]", 10, "expected a value"),
        ("[status = 'x]", 10, "unclosed string"),
        ("[status == 'x']", 9, "expected a value"),
        ("[status = 'x' and]", 17, "expected a condition"),
        ("[status = 'x' xor b = 1]", 14, "expected ']', found 'xor'"),
        ("[(a = 1]", 7, "expected ')'"),
        ("[a/ = 1]", 4, "expected a name"),
        ("[a = 1]]", 7, "expected '['"),
        ("[matches(a, 'x')]", 1, "unsupported function matches()"),
        ("[contains(a 'x')]", 12, "expected ','"),
        ("[a = 1 # 2]", 7, "unexpected character '#'"),
        ("[a = 'x\0y']", 7, "unexpected character '\\x00'"),
        ("[" + "(" * 33 + "a = 1" + ")" * 33 + "]", 33, "nested too deeply: at most 32 levels"),
        ("[" + "not(" * 33 + "a = 1" + ")" * 33 + "]", 132, "nested too deeply"),
    ],
)
def test_syntax_errors_say_where_and_what_was_expected(text: str, position: int, message: str):
    with pytest.raises(ConstraintError) as raised:
        parse(text)
    assert raised.value.position == position
    assert message in str(raised.value)


def test_error_shows_line_column_and_a_caret():
    with pytest.raises(ConstraintError) as raised:
        parse("[status = 'x'\n and ]")
    error = raised.value
    assert (error.line, error.column) == (2, 6)
    assert str(error).splitlines() == [
        "line 2, column 6: expected a condition (a member path, not(), contains() or '('), "
        "found ']'",
        "   and ]",
        "       ^",
    ]


@pytest.mark.parametrize(
    ("text", "span", "message"),
    [
        ("[stauts = 'Open']", (1, 7), "unknown member 'stauts' of Ticket"),
        ("[Ticket_Project/Project/nme = 'x']", (24, 27), "unknown member 'nme' of Project"),
        ("[Nope/Project/name = 'x']", (1, 13), "no association 'Nope' between Ticket and Project"),
        (
            "[Ticket_Project/Ticket/title = 'x']",
            (1, 22),
            "association 'Ticket_Project' does not lead from Ticket to Ticket",
        ),
        ("[priority = 'high']", (12, 18), "priority is an integer, not comparable with a string"),
        (
            "[priority = 1.5]",
            (12, 15),
            "priority is an integer, not comparable with a decimal number",
        ),
        ("[status = 3]", (10, 11), "status is a string, not comparable with a number"),
        ("[urgent = 1]", (10, 11), "urgent is a boolean, not comparable with a number"),
        ("[urgent > true()]", (1, 16), "urgent is a boolean: only = and != apply"),
        ("[cost = true()]", (8, 14), "cost is a decimal, not comparable with a boolean"),
        ("[due = 5]", (7, 8), "due is a datetime, not comparable with a number"),
        ("[due = 'tomorrow']", (7, 17), "not an ISO 8601 date or time: 'tomorrow'"),
        ("[priority = 9223372036854775808]", (12, 31), "out of range for a 64-bit integer"),
        ("[Ticket_Owner = -9223372036854775809]", (16, 36), "out of range for a 64-bit"),
        (
            "[due = '[%CurrentUser%]']",
            (7, 24),
            "due is a datetime, not comparable with [%CurrentUser%]",
        ),
        ("[status = '[%CurrentDateTime%]']", (10, 31), "status is a string, not comparable with"),
        ("[status = '[%CurrentObject%]']", (10, 29), "unsupported token [%CurrentObject%]"),
        ("[Ticket_Owner = '[%Today%]']", (16, 27), "unsupported token [%Today%]"),
        ("[status < empty]", (1, 15), "empty can only be compared with = or !="),
        ("[contains(priority, '1')]", (10, 18), "contains() needs a string attribute"),
        ("[starts-with(status, 1)]", (21, 22), "starts-with() needs a string literal"),
        ("[status]", (1, 7), "a path on its own must end at an entity or an association"),
        ("[Ticket_Project/Project = empty]", (1, 23), "Project is an object"),
        ("[Ticket_Owner > 3]", (1, 17), "Ticket_Owner is an association: only = and != apply"),
        (
            "[Ticket_Project = '[%CurrentUser%]']",
            (18, 35),
            "Ticket_Project leads to Project, not to System.User",
        ),
        ("[Ticket_Owner = 'x']", (16, 19), "compare it with empty, an id or [%CurrentUser%]"),
        (
            "[Ticket_Owner/System.User/name = 'x']",
            (26, 30),
            "only System.UserRoles may follow System.User",
        ),
        (
            "[Ticket_Owner/System.User/System.UserRoles = 'Boss']",
            (1, 51),
            "System.UserRoles can only be compared (= or !=) with a [%UserRole_<name>%] token",
        ),
    ],
)
def test_compile_errors_point_at_the_offending_part(text: str, span: tuple[int, int], message: str):
    with pytest.raises(ConstraintError) as raised:
        _compile(text)
    assert (raised.value.position, raised.value.end) == span
    assert message in raised.value.message


def test_association_to_a_table_less_entity_cannot_be_followed():
    model = parse_model(
        "entities:\n"
        "  A: {table: a, offline: true, associations: {A_D: {to: D, column: d_id}}}\n"
        "  D: {persistable: false, attributes: {x: string}}\n"
    )
    with pytest.raises(ConstraintError, match="D has no table to follow"):
        check_constraint("[A_D/D/x = 'y']", entities=model.entities, entity="A")


def test_values_travel_as_parameters_and_identifiers_are_quoted():
    sql, params = _compile("[status = 'x'' OR 1=1 --'][Ticket_Project/Project/name = 'y']")
    assert "OR 1=1" not in sql
    assert sql == (
        '(lower(t0."status") = lower($2::text)) IS TRUE AND EXISTS (SELECT 1 '
        'FROM "public"."t_project" a1 WHERE a1.id = t0."project_id" '
        'AND lower(a1."name") = lower($3::text))'
    ).join("()")
    assert params.values(user_id=7) == ["x' OR 1=1 --", "y"]


def test_the_session_user_is_one_parameter_bound_per_job():
    sql, params = _compile("[Ticket_Owner = '[%CurrentUser%]' or Ticket_Owner = [%CurrentUser%]]")
    assert sql.count("$2::bigint") == 2
    assert params.values(user_id=42) == [42]


def test_reverse_hop_joins_on_the_other_side_column():
    sql, _ = _compile(
        "[Assignment_Project/Assignment/Assignment_User = '[%CurrentUser%]']", entity="Project"
    )
    assert 'FROM "public"."t_assignment" a1 WHERE a1."project_id" = t0.id' in sql


def test_bad_constraint_fails_the_model_load_with_the_rules_position():
    text = (
        "entities:\n"
        "  A:\n"
        "    table: a\n"
        "    offline: true\n"
        "    attributes: {status: string}\n"
        "    access:\n"
        "      - {roles: [R], read: '*'}\n"
        "      - {roles: [R], read: '*', constraint: \"[stauts = 'x']\"}\n"
    )
    with pytest.raises(ModelError) as raised:
        parse_model(text, "m.yaml")
    assert raised.value.where == "entities.A.access[1].constraint"
    assert "line 1, column 2: unknown member 'stauts' of A" in str(raised.value)
    assert str(raised.value).endswith("[stauts = 'x']\n   ^^^^^^")


def test_nesting_up_to_the_limit_parses():
    parse("[" + "not((" * 16 + "a = 1" + "))" * 16 + "]")


def test_double_quoted_strings_are_values_as_single_quoted_ones_are():
    double, _ = _compile('[status = "it\'s ""open"""]')
    single, params = _compile("[status = 'it''s \"open\"']")
    assert double == single
    assert params.values(user_id=7) == ['it\'s "open"']


def test_a_constraint_knows_the_members_of_its_own_entity_it_reads():
    constraint = check_constraint(
        "[status = 'x'][contains(title, 'y') or Ticket_Owner = empty]"
        "[Ticket_Project/Project/name = 'z']",
        entities=MODEL.entities,
        entity="Ticket",
    )
    assert constraint.members == {"status", "title", "Ticket_Owner", "Ticket_Project"}


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("[Ticket_Project/Project/name = 'x']", (1, 23)),
        ("[status = 'x' or Ticket_Owner/System.User/System.UserRoles = 'y']", (17, 41)),
    ],
)
def test_without_hops_a_path_to_another_object_is_refused_where_it_starts(
    text: str, span: tuple[int, int]
):
    with pytest.raises(ConstraintError) as raised:
        check_constraint(text, entities=MODEL.entities, entity="Ticket", hops=False)
    assert (raised.value.position, raised.value.end) == span
    assert raised.value.message.startswith("a query cannot follow association")
