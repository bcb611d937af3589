"""Who may do what on the broker: each device has its own AMQP account.

A device's account may publish jobs (write on ``sync.jobs``) and consume its own queue
(read on ``device.<id>``), nothing else: no configure, no other queue, no change batches.
The broker stamps and checks the ``user_id`` of what it publishes, so a job from a device
account names its device beyond doubt. Per-user limits bound the connections and channels
one account may hold, so one device's credentials cannot exhaust the node.
"""

from __future__ import annotations

import re

from broker.topology import JOBS_EXCHANGE, device_queue_name

__all__ = [
    "DEVICE_LIMITS",
    "DEVICE_USER_PREFIX",
    "device_account",
    "device_of_account",
    "device_permissions",
]

DEVICE_USER_PREFIX = "device."
# RabbitMQ per-user limits of a device account. A device uses 1 connection and 1 channel
# (2 while it checks its queue at start); its health check and an app publishing jobs
# from the device add one connection each. The fourth connection is headroom for a
# reconnect while the broker has not yet closed the dead one (two missed heartbeats).
DEVICE_LIMITS: dict[str, int] = {"max-connections": 4, "max-channels": 8}


def device_account(device_id: str) -> str:
    """The AMQP user name of a device."""
    return f"{DEVICE_USER_PREFIX}{device_id}"


def device_of_account(user_id: str | None) -> str | None:
    """The device an AMQP user name belongs to, or ``None`` for any other account."""
    if user_id is None or not user_id.startswith(DEVICE_USER_PREFIX):
        return None
    return user_id.removeprefix(DEVICE_USER_PREFIX) or None


def device_permissions(device_id: str) -> dict[str, str]:
    """RabbitMQ permission patterns (regular expressions over resource names)."""
    return {
        "configure": "^$",
        "write": f"^{re.escape(JOBS_EXCHANGE.name)}$",
        "read": f"^{re.escape(device_queue_name(device_id))}$",
    }
