"""Connections to several RabbitMQ nodes (a comma-separated URL), on the real broker.

The second node is the broker itself; the first is a TCP relay to it that the tests cut,
as a node that dies would.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest

from broker.connection import amqp_urls, connect, node_of, open_channel
from broker.errors import BrokerUnavailable, ConfigurationError
from tests.conftest import Services, wait_for


class _Relay:
    """Forwards a local port to the broker until ``cut()`` closes it and its streams."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        self._writers |= {writer, up_writer}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()


def _at_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit(":", 1)[0] + f":{port}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
async def relay(services: Services) -> AsyncIterator[tuple[_Relay, int]]:
    relay = _Relay(urlsplit(services.amqp_url).port or 5672)
    port = await relay.start()
    yield relay, port
    with contextlib.suppress(RuntimeError):
        await relay.cut()


async def test_the_first_connection_goes_to_the_first_node_that_answers(services: Services):
    dead = _at_port(services.amqp_url, 1)
    connection = await connect(f"{dead},{services.amqp_url}", "test-nodes")
    try:
        assert node_of(connection) == f"127.0.0.1:{urlsplit(services.amqp_url).port}"
    finally:
        await connection.close()


async def test_no_node_in_reach_names_each_node(services: Services):
    dead = [_at_port(services.amqp_url, port) for port in (1, 2)]
    with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1: .*; 127\.0\.0\.1:2: "):
        await connect(",".join(dead), "test-nodes")


def test_the_nodes_must_name_one_user(services: Services):
    other = services.amqp_url.replace("sync:sync@", "other:secret@")
    with pytest.raises(ConfigurationError, match="same user"):
        amqp_urls(f"{services.amqp_url},{other}")
    with pytest.raises(ConfigurationError, match="scheme"):
        amqp_urls(f"{services.amqp_url},127.0.0.1:5672")


async def test_a_connection_whose_node_dies_moves_on_and_keeps_consuming(
    services: Services, relay: tuple[_Relay, int]
):
    cut, port = relay
    connection = await connect(f"{_at_port(services.amqp_url, port)},{services.amqp_url}", "t")
    publisher = await connect(services.amqp_url, "test-nodes-publisher")
    try:
        channel = await open_channel(connection)
        queue = await channel.declare_queue(f"test-nodes-{uuid.uuid4().hex[:8]}", auto_delete=True)
        received: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            await received.put(message.body)

        await queue.consume(on_message)
        assert node_of(connection) == f"127.0.0.1:{port}"

        await cut.cut()

        # The robust connection comes back on the other node and replays the consumer.
        async def moved() -> bool:
            return connection.connected.is_set() and node_of(connection) != f"127.0.0.1:{port}"

        await wait_for(moved, timeout=15)
        send = await open_channel(publisher)
        for _ in range(150):
            with contextlib.suppress(aio_pika.exceptions.DeliveryError):
                await send.default_exchange.publish(
                    aio_pika.Message(b"after"), routing_key=queue.name, mandatory=True
                )
                break
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(received.get(), timeout=10) == b"after"
    finally:
        await connection.close()
        await publisher.close()
