"""The device agent: applies change batches to the device's offline SQLite database."""

from device_agent.agent import AppliedBatch, DeviceAgent
from device_agent.settings import AgentSettings
from device_agent.store import JobProgress, OfflineStore

__all__ = ["AgentSettings", "AppliedBatch", "DeviceAgent", "JobProgress", "OfflineStore"]
