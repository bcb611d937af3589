"""Process plumbing shared by the programs: exit with a message, graceful shutdown."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn

from broker.errors import ProgramError

__all__ = ["run_program", "until_signal"]


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
