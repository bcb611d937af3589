"""Process plumbing shared by the programs: exit with a message, graceful shutdown."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar

from broker.errors import ProgramError
from broker.logs import configure_logging
from broker.settings import BrokerSettings, load_settings

__all__ = ["run_program", "run_service", "until_signal"]

S = TypeVar("S", bound=BrokerSettings)


def run_program(prog: str, main: Callable[[], Coroutine[Any, Any, int | None]]) -> NoReturn:
    """Run ``main()`` and exit with its status; a ``ProgramError`` ends the program with
    its message and status (2 for a wrong setting, 1 for a failure), never a traceback.

    Example::

        run_program("syncctl", lambda: command(args))
    """
    try:
        status = asyncio.run(main())
    except ProgramError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        sys.exit(error.status)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(status or 0)


async def until_signal(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``main(stop)``; SIGTERM or SIGINT sets ``stop`` so it can finish what it holds."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await main(stop)


async def _health_check(check: Callable[[S], Awaitable[None]], settings: S) -> int:
    try:
        await check(settings)
    except ProgramError as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


def run_service(
    parser: argparse.ArgumentParser,
    settings_class: type[S],
    *,
    check: Callable[[S], Awaitable[None]],
    serve: Callable[[S, asyncio.Event], Awaitable[None]],
    argv: list[str] | None = None,
) -> NoReturn:
    """A long-running program: settings from flags and ``SYNC_*``, then ``--check`` (print
    ``healthy`` and exit 0, or ``unhealthy: why`` and exit 1) or ``serve`` until SIGTERM.

    Example::

        run_service(parser, WorkerSettings, check=check, serve=run_worker)
    """
    args = parser.parse_args(argv)

    async def program() -> int:
        settings = load_settings(settings_class, args, parser)
        configure_logging(log_format=settings.log_format)
        if args.check:
            return await _health_check(check, settings)
        await until_signal(lambda stop: serve(settings, stop))
        return 0

    run_program(parser.prog, program)
