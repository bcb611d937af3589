"""Work that one worker at a time does (the follow feed, bringing holders in line with a
changed model): whoever holds a session advisory lock on a connection of its own leads.

A leader that dies drops its connection and with it the lock; a frozen one loses its
session (and the lock) after ``takeover`` seconds. The others ask for the lock every
``RETRY`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg

from broker.errors import ProgramError
from worker.database import connect
from worker.devices import DEVICE_LOCK_CLASS
from worker.errors import TRANSIENT_ERRORS

__all__ = ["FEED_LOCK", "MODEL_LOCK", "RETRY", "lead"]

log = logging.getLogger(__name__)

RETRY = 1.0
# The leaders' locks: the device locks' class with key 0, no device's (hashtext gives
# any int), in classes of their own.
FEED_LOCK = DEVICE_LOCK_CLASS + 1
MODEL_LOCK = DEVICE_LOCK_CLASS + 2
_TRY = "SELECT pg_try_advisory_lock($1, 0)"

Work = Callable[[asyncpg.Connection], Awaitable[None]]
Done = Callable[[asyncpg.Connection], Awaitable[bool]]


async def _stand_by(conn: asyncpg.Connection, lock: int, done: Done | None) -> bool:
    """Until this session holds ``lock`` (``True``) or ``done`` says there is nothing left
    to lead (``False``); asking often keeps the session alive."""
    while True:
        if await conn.fetchval(_TRY, lock):
            return True
        if done is not None and await done(conn):
            return False
        await asyncio.sleep(RETRY)


async def lead(
    url: str,
    *,
    lock: int,
    name: str,
    what: str,
    takeover: float,
    work: Work,
    done: Done | None = None,
) -> None:
    """Run ``work`` whenever this worker holds ``lock``, again after each interruption;
    returns once ``work`` returned, or once ``done`` says another leader finished it
    (without ``done``, standing by lasts until this worker gets the lock)."""
    while True:
        try:
            conn = await connect(
                url,
                # A statement that hangs (a server gone mid-reply) ends the lead too.
                command_timeout=takeover,
                server_settings={
                    # A frozen leader's session ends, and its lock with it.
                    "idle_session_timeout": str(int(takeover * 1000)),
                    # Says which worker leads (pg_stat_activity, with the lock).
                    "application_name": f"{name} {what}"[:63],
                },
            )
        except ProgramError as error:
            log.warning(f"{what}: no database", extra={"error": str(error)})
            await asyncio.sleep(RETRY)
            continue
        try:
            if not await _stand_by(conn, lock, done):
                return
            log.info(f"{what}: leading")
            await work(conn)
            return
        except (*TRANSIENT_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            log.warning(f"{what} interrupted", extra={"error": repr(error)})
        except Exception:
            # A bug: said loudly, and the work goes on rather than stop for good.
            log.exception(f"{what} failed")
        finally:
            conn.terminate()
        await asyncio.sleep(RETRY)
