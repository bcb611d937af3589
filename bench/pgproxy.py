"""A loopback TCP proxy that delays what a client sends to PostgreSQL, so every round
trip costs at least the delay: a database far away, for the worker-bound scale-out.

    async with delaying_proxy(5433, delay_ms=5.0) as port:
        ...  # postgresql://user:pw@127.0.0.1:{port}/db

Each chunk read from the client is forwarded to the server ``delay_ms`` after it was
read (a delay line: chunks keep their order and do not add up their delays); what the
server sends back is forwarded at once. Bounded: at most ``max_connections`` clients at
a time (more are closed at once) and at most ``QUEUED_CHUNKS`` chunks in the delay line
per connection, past which the proxy stops reading from that client. Both sides of a
connection close when either does; leaving the block closes the listener and every
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["delaying_proxy"]

HOST = "127.0.0.1"
CHUNK = 65536
QUEUED_CHUNKS = 64


async def _delayed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float
) -> None:
    """Client to server: each chunk written ``delay`` seconds after it was read; at the
    client's end of file, what it sent still goes out, on time."""
    line: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUED_CHUNKS)

    async def write() -> None:
        while (item := await line.get()) is not None:
            due, chunk = item
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(chunk)
            await writer.drain()

    writing = asyncio.create_task(write())
    try:
        while chunk := await reader.read(CHUNK):
            await line.put((time.monotonic() + delay, chunk))
        await line.put(None)
        await writing
    finally:
        writing.cancel()
        await asyncio.gather(writing, return_exceptions=True)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Server to client, as it comes."""
    while chunk := await reader.read(CHUNK):
        writer.write(chunk)
        await writer.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


@asynccontextmanager
async def delaying_proxy(
    server_port: int, *, delay_ms: float, max_connections: int = 256
) -> AsyncIterator[int]:
    """Listen on a free loopback port, forward to ``127.0.0.1:server_port``; yields the
    proxy's port."""
    delay = delay_ms / 1000
    connections: set[asyncio.Task[None]] = set()

    async def serve(client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(connections) >= max_connections:
            await _close(client)
            return
        connections.add(task)
        server: asyncio.StreamWriter | None = None
        try:
            server_reader, server = await asyncio.open_connection(HOST, server_port)
            up = asyncio.create_task(_delayed(client_reader, server, delay))
            down = asyncio.create_task(_copy(server_reader, client))
            # Either side ending (or failing) ends the connection: the other is cancelled.
            _, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            for side in pending:
                side.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
        except OSError:
            pass  # the server refused, or a side reset: the connection just ends
        except asyncio.CancelledError:
            # The proxy is closing. The task ends normally: asyncio's stream callback
            # reports a cancelled connection task as an error.
            pass
        finally:
            connections.discard(task)
            await _close(client)
            if server is not None:
                await _close(server)

    listener = await asyncio.start_server(serve, HOST, 0)
    port: int = listener.sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        listener.close()
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await listener.wait_closed()
