"""``syncctl demo``: the whole pipeline on the local services, in one command.

Loads the field-service model, seeds a few rows, registers devices, runs two workers and
three device agents in this process (each on its own broker connection), makes sync calls
that walk through the rule table and prints what each device now holds.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

from broker.client import SyncClient
from broker.connection import connect, open_channel
from broker.models import ObjectList, ObjectRef, Session, SyncResult
from broker.topology import declare_topology
from device_agent import AgentSettings, DeviceAgent, OfflineStore
from syncctl.accounts import BrokerAccounts
from syncctl.devices import register_device
from worker import Worker, WorkerSettings, load_model
from worker.database import connect as connect_database
from worker.model import EXAMPLE_MODEL, DomainModel
from worker.schema import init_database
from worker.settings import ServerSettings

__all__ = ["run_demo"]

ALICE, BOB, CAROL, DAVE = 101, 102, 103, 104
ROLES = [(ALICE, "Technician"), (BOB, "Dispatcher"), (CAROL, "Technician"), (DAVE, "Technician")]
DEVICES = [("alice-phone", ALICE, True), ("bob-tablet", BOB, True), ("dave-phone", DAVE, True)]
WEB_SESSION = ("carol-web", CAROL, False)

SEED_SQL = """
INSERT INTO technician (id, name, user_id) VALUES (1, 'Alice', 101), (2, 'Dave', 104);
INSERT INTO customer (id, name, phone, credit_limit) VALUES
    (1, 'Acme Pumps', '+31 20 555 0101', 25000), (2, 'Bolt & Co', '+31 20 555 0102', 5000),
    (3, 'Zeta Farms', '+31 20 555 0103', 1000);
INSERT INTO work_order (id, title, status, due, amount, internal_note, technician_id, customer_id,
                        autocommitted) VALUES
    (1, 'Replace pump seal', 'Open', now() + interval '1 day', 480.00, 'bill extra', 1, 1, false),
    (2, 'Annual inspection', 'Open', now() + interval '3 days', 150.00, NULL, 1, 2, false),
    (3, 'Fix valve', 'Planned', now() + interval '2 days', 90.00, NULL, 2, 1, false),
    (4, 'Half-entered order', 'Draft', NULL, NULL, NULL, 1, NULL, true);
INSERT INTO invoice (id, number, total) VALUES (1, 'INV-001', 480.00);
INSERT INTO attachment (id, name) VALUES (1, 'pump-photo.jpg');
"""


@dataclass
class Call:
    title: str
    session: Session
    objects: list[ObjectRef]
    lists: list[ObjectList] | None = None
    deleted: list[ObjectRef] | None = None
    new: list[ObjectRef] | None = None
    uncommitted: dict[ObjectRef, dict[str, object]] | None = None
    origin: str = "nanoflow"


def _calls() -> list[Call]:
    alice = Session(user_id=ALICE, device_id="alice-phone")
    bob = Session(user_id=BOB, device_id="bob-tablet")
    dave = Session(user_id=DAVE, device_id="dave-phone")
    wo = {i: ObjectRef("WorkOrder", i) for i in range(1, 5)}
    return [
        Call(
            "Alice syncs her work orders and her technician record",
            alice,
            [ObjectRef("Technician", 1)],
            lists=[ObjectList("WorkOrder", [1, 2])],
        ),
        Call(
            "Bob (dispatcher) syncs all work orders and customers",
            bob,
            [],
            lists=[ObjectList("WorkOrder", [1, 2, 3]), ObjectList("Customer", [1, 2])],
        ),
        Call(
            "Dave syncs his work order, uncommitted status change included",
            dave,
            [wo[3]],
            uncommitted={wo[3]: {"status": "On my way", "amount": 1}},
        ),
        Call(
            "Alice asks for customers: hers (name and phone only) and one she has no job for",
            alice,
            [ObjectRef("Customer", 1), ObjectRef("Customer", 3)],
        ),
        Call(
            "Alice asks for Dave's work order (her rule's constraint does not match it)",
            alice,
            [wo[3]],
        ),
        Call("An event microflow asks to sync", alice, [wo[1]], origin="event"),
        Call(
            "Carol's online web app asks to sync",
            Session(user_id=CAROL, device_id="carol-web"),
            [wo[1]],
        ),
        Call("Alice asks for an attachment (a file entity)", alice, [ObjectRef("Attachment", 1)]),
        Call("Alice asks for a non-persistable draft note", alice, [ObjectRef("DraftNote", 1)]),
        Call(
            "Alice asks for an invoice (not in the offline profile)",
            alice,
            [ObjectRef("Invoice", 1)],
        ),
        Call(
            "Alice's session asks to sync to Bob's tablet",
            Session(user_id=ALICE, device_id="bob-tablet"),
            [wo[1]],
        ),
        Call(
            "Alice: WO2 deleted in the call, a new WO, an autocommitted WO, a vanished WO",
            alice,
            [wo[1], wo[2], wo[4], ObjectRef("WorkOrder", 999), ObjectRef("WorkOrder", 1000)],
            deleted=[wo[2]],
            new=[ObjectRef("WorkOrder", 1000)],
        ),
    ]


async def _prepare_database(settings: ServerSettings, model: DomainModel) -> None:
    conn = await connect_database(settings.database_url)
    try:
        await init_database(conn, model, create_tables=True)
        await conn.execute("TRUNCATE work_order, technician, customer, invoice, attachment")
        await conn.execute(SEED_SQL)
        users = [user for user, _ in ROLES]
        await conn.execute("DELETE FROM sync.user_role WHERE user_id = ANY($1::bigint[])", users)
        await conn.executemany("INSERT INTO sync.user_role VALUES ($1, $2)", ROLES)
        accounts = BrokerAccounts(settings.management_url, settings.amqp_url)
        connection = await connect(settings.amqp_url, "syncctl-demo")
        async with connection:
            channel = await open_channel(connection)
            await declare_topology(channel)
            for device_id, user_id, offline in [*DEVICES, WEB_SESSION]:
                await channel.queue_delete(f"device.{device_id}")
                await register_device(
                    conn,
                    channel,
                    accounts,
                    device_id,
                    user_id,
                    offline=offline,
                    queue_type=settings.device_queue_type,
                )
    finally:
        await conn.close()


def _print_result(number: int, call: Call, result: SyncResult) -> None:
    print(f"\n[{number}] {call.title}")
    head = f"    -> {result.status}" + (f": {result.reason}" if result.reason else "")
    if result.status == "done":
        head += f" (synced {result.synced}, removed {result.removed}, skipped {result.skipped})"
    print(head)
    for outcome in result.objects:
        reason = f": {outcome.reason}" if outcome.reason else ""
        print(f"       {outcome.entity} {outcome.id}: {outcome.outcome}{reason}")


async def _print_device(device_id: str, path: Path) -> None:
    async with await OfflineStore.open(path) as store:
        print(f"\n{device_id} ({path}):")
        for entity in ("WorkOrder", "Technician", "Customer"):
            for object_id in await store.ids(entity):
                committed = await store.get_committed(entity, object_id)
                seen = await store.get(entity, object_id)
                version = await store.version(entity, object_id)
                print(f"    {entity} {object_id} v{version}: {committed}")
                if seen != committed:
                    print(f"        app sees (uncommitted on top): {seen}")


async def run_demo(settings: ServerSettings, *, workdir: str) -> None:
    # Always the example: the seed rows and the calls below are written for it.
    model = await load_model(EXAMPLE_MODEL)
    folder = Path(workdir)
    await asyncio.to_thread(shutil.rmtree, folder, True)
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    print(f"model {EXAMPLE_MODEL}: offline entities {sorted(model.offline_entities)}")
    await _prepare_database(settings, model)
    print(
        "database seeded; devices registered:",
        ", ".join(d for d, _, _ in DEVICES),
        "and the online session carol-web",
    )

    worker_settings = WorkerSettings(
        amqp_url=settings.amqp_url, database_url=settings.database_url, model=EXAMPLE_MODEL
    )
    workers = [
        await Worker.start(worker_settings.model_copy(update={"name": f"demo-worker-{n}"}), model)
        for n in (1, 2)
    ]
    stop = asyncio.Event()
    agents = []
    for device_id, _, _ in DEVICES:
        agent = await DeviceAgent.start(
            AgentSettings(
                amqp_url=settings.amqp_url,
                device_id=device_id,
                db_path=folder / f"{device_id}.sqlite",
            )
        )
        agents.append(asyncio.create_task(agent.run(stop)))
    print("running 2 workers and 3 device agents")

    async with await SyncClient.connect(settings.amqp_url, name="syncctl-demo") as client:
        for number, call in enumerate(_calls(), start=1):
            result = await client.synchronize_to_device(
                call.session,
                objects=call.objects,
                lists=call.lists or [],
                deleted=call.deleted or [],
                new=call.new or [],
                uncommitted=call.uncommitted,
                origin="event" if call.origin == "event" else "nanoflow",
            )
            _print_result(number, call, result)
            if result.batch_ids:
                await _wait_applied(folder / f"{call.session.device_id}.sqlite", result.batch_ids)

    stop.set()
    await asyncio.gather(*agents)
    for worker in workers:
        await worker.stop()
    print("\nWhat each device's offline database holds now:")
    for device_id, _, _ in DEVICES:
        await _print_device(device_id, folder / f"{device_id}.sqlite")


async def _wait_applied(path: Path, batch_ids: tuple[str, ...]) -> None:
    async with await OfflineStore.open(path) as store:
        await store.wait_for_batches(batch_ids, timeout=10)
