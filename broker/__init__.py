"""The wire contract of sync-to-device: topology, message models and the ``SyncClient``."""

from broker.client import SyncClient
from broker.errors import BrokerUnavailable, Refused, Unroutable
from broker.models import (
    ChangeBatch,
    ObjectList,
    ObjectOutcome,
    ObjectRef,
    OverlayChange,
    Query,
    RemoveChange,
    ResyncChange,
    Session,
    SyncJob,
    SyncProgress,
    SyncResult,
    UncommittedChange,
    UpsertChange,
)

__all__ = [
    "BrokerUnavailable",
    "ChangeBatch",
    "ObjectList",
    "ObjectOutcome",
    "ObjectRef",
    "OverlayChange",
    "Query",
    "Refused",
    "RemoveChange",
    "ResyncChange",
    "Session",
    "SyncClient",
    "SyncJob",
    "SyncProgress",
    "SyncResult",
    "UncommittedChange",
    "Unroutable",
    "UpsertChange",
]
