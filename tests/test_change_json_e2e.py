"""The change JSON PostgreSQL writes (``worker.access``) holds the values in the format of
docs/device-db.md, the one the worker wrote when it serialized rows itself, for every
column type a model type may be read from."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from pydantic import TypeAdapter

from broker import ObjectRef, SyncClient, wire
from broker.wire import decode_batch
from tests.conftest import MakeDevice, Services, insert, sync_settled, worker_settings
from worker import DomainModel, Worker
from worker.access import UPSERT, AccessPolicy
from worker.model import parse_model
from worker.publisher import encode_batch

_COLUMNS = {
    "s": ("text", "string"),
    "n": ("bigint", "long"),
    "d_numeric": ("numeric(12,4)", "decimal"),
    "d_integer": ("integer", "decimal"),
    "d_double": ("double precision", "decimal"),
    "flag": ("boolean", "boolean"),
    "at_tz": ("timestamptz", "datetime"),
    "at_naive": ("timestamp", "datetime"),
    "day": ("date", "datetime"),
}
_ROWS: list[dict[str, Any]] = [
    {
        "s": 'quote " back\\slash \u00fcn\u00efcode \x01 tab\t',
        "n": 2**62,
        "d_numeric": Decimal("480.5000"),
        "d_integer": 7,
        "d_double": 1.25,
        "flag": True,
        "at_tz": datetime(2025, 5, 1, 10, 0, 0, 510000, tzinfo=UTC),
        "at_naive": datetime(2025, 5, 1, 10, 0, 0, 5),
        "day": date(2025, 5, 1),
    },
    {
        "s": "",
        "n": -1,
        "d_numeric": Decimal("-0.0001"),
        "d_integer": 0,
        "d_double": -2.5e-7,
        "flag": False,
        "at_tz": datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
        "at_naive": datetime(2025, 5, 1, 10, 0, 0),
        "day": date(1970, 1, 1),
    },
    dict.fromkeys(_COLUMNS),
]
_MODEL = parse_model(
    json.dumps(
        {
            "entities": {
                "Value": {
                    "table": "t_json_values",
                    "offline": True,
                    "attributes": {name: kind for name, (_, kind) in _COLUMNS.items()},
                    "access": [{"roles": ["Reader"], "read": "*"}],
                }
            }
        }
    )
)


def _refuse(model: object, body: bytes) -> None:
    raise AssertionError("the strict reader was needed")


_VALUES: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


@pytest.fixture
async def values_table(services: Services) -> Any:
    conn = await asyncpg.connect(services.database_url, server_settings={"timezone": "UTC"})
    columns = ", ".join(f"{name} {sql_type}" for name, (sql_type, _) in _COLUMNS.items())
    await conn.execute(
        "DROP TABLE IF EXISTS public.t_json_values; "
        f"CREATE TABLE public.t_json_values (id bigint PRIMARY KEY, version bigint NOT NULL, "
        f"autocommitted boolean NOT NULL DEFAULT false, {columns})"
    )
    for object_id, row in enumerate(_ROWS, start=1):
        names = ", ".join(row)
        places = ", ".join(f"${i}" for i in range(3, len(row) + 3))
        await conn.execute(
            f"INSERT INTO public.t_json_values (id, version, {names}) VALUES ($1, $2, {places})",
            object_id,
            1,
            *row.values(),
        )
    yield conn
    await conn.execute("DROP TABLE public.t_json_values")
    await conn.close()


async def test_postgresql_writes_each_value_as_the_worker_serialized_it(
    values_table: Any, monkeypatch: pytest.MonkeyPatch
):
    query = AccessPolicy(_MODEL).query("Value", frozenset({"Reader"}))
    records = await values_table.fetch(query.sql, *query.arguments([1, 2, 3], user_id=1))
    written = {record["id"]: json.loads(record[UPSERT]) for record in records}
    for object_id in range(1, len(_ROWS) + 1):
        # What the worker wrote before PostgreSQL did: the values as asyncpg reads them,
        # serialized by pydantic.
        fetched = await values_table.fetchrow(
            f"SELECT {', '.join(_COLUMNS)} FROM public.t_json_values WHERE id = $1", object_id
        )
        expected = json.loads(_VALUES.dump_json(dict(fetched)))
        assert written[object_id] == {
            "op": "upsert",
            "entity": "Value",
            "id": object_id,
            "version": 1,
            "data": expected,
        }
    # The agent reads what PostgreSQL wrote on its fast path, without the strict reader;
    # only a float with an exponent (PostgreSQL writes -2.5e-07) is handed to that one.
    monkeypatch.setattr(wire, "decode", _refuse)
    fast = [record[UPSERT] for record in records if record["id"] != 2]
    assert (
        len(decode_batch(encode_batch("job-1", "dev-1", fast, position=1, total=1).body).changes)
        == 2
    )
    assert written[1]["data"]["at_tz"] == "2025-05-01T10:00:00.510000Z"
    assert written[1]["data"]["d_numeric"] == "480.5000"
    assert written[2]["data"]["at_tz"] == "1999-12-31T23:59:59Z"


@pytest.mark.usefixtures("clean_queues")
async def test_a_device_holds_decimals_and_datetimes_in_the_documented_format(
    client: SyncClient,
    make_device: MakeDevice,
    pg: asyncpg.Connection,
    services: Services,
    model: DomainModel,
):
    # Sessions do not start in UTC here: the worker must not depend on the server's zone.
    await pg.execute("ALTER DATABASE sync SET timezone = 'Asia/Kolkata'")
    try:
        worker = await Worker.start(worker_settings(services), model)
        try:
            device = await make_device(1, ["Admin"])
            due = datetime(2025, 5, 1, 10, 0, 0, 510587, tzinfo=UTC)
            task = await insert(pg, "t_task", title="t", amount=Decimal("480.00"), due=due)
            await sync_settled(client, device, [ObjectRef("Task", task)])
            held = await device.store.get_committed("Task", task)
        finally:
            await worker.stop()
    finally:
        await pg.execute("ALTER DATABASE sync RESET timezone")
    assert held is not None
    assert held["amount"] == "480.00"
    assert held["due"] == "2025-05-01T10:00:00.510587Z"
