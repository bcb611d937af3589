"""Workers: consume sync jobs, resolve objects in PostgreSQL, publish change batches."""

from worker.app import Worker
from worker.model import DomainModel, ModelError, load_model, parse_model
from worker.settings import WorkerSettings

__all__ = ["DomainModel", "ModelError", "Worker", "WorkerSettings", "load_model", "parse_model"]
