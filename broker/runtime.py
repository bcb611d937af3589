"""Process plumbing shared by the programs: logging and graceful shutdown on signals."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["configure_logging", "given_flags", "run_until_signal"]


def configure_logging(level: str = "INFO") -> None:
    """One line per event: time, level, logger and the ``key=value`` message."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # aio-pika logs every reconnect attempt at length; ours are enough.
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)


async def _serve(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await main(stop)


def run_until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)``; SIGTERM or SIGINT sets ``stop`` so it can finish what it holds."""
    asyncio.run(_serve(main))


def given_flags(
    args: argparse.Namespace, *, commands: tuple[str, ...] = ("check",)
) -> dict[str, Any]:
    """The flags given on the command line, as settings overrides (unset ones fall back to
    the environment)."""
    return {k: v for k, v in vars(args).items() if v is not None and k not in commands}
