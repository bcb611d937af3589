"""Log lines: one event per line with its fields, as ``key=value`` text or one JSON object.

Callers log a fixed event name and pass what varies as fields
(``log.info("job done", extra={"job_id": ..., "synced": 3})``), so nothing that came in
from outside is ever pasted into the line as it is: text values that are not plain
tokens are JSON-quoted, which escapes newlines and control characters.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

from broker.wire import quoted

__all__ = ["LogFormat", "TextFormatter", "configure_logging", "fields_of"]

LogFormat = Literal["text", "json"]

# What every LogRecord has; anything else on a record came in through ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
}
# Long enough for a reason with its position; a forged megabyte stays out of the log.
_MAX_VALUE = 500


def fields_of(record: logging.LogRecord) -> dict[str, object]:
    """The fields a log call passed with ``extra=``."""
    return {key: value for key, value in record.__dict__.items() if key not in _STANDARD}


def _text(value: object) -> str:
    if value is None or isinstance(value, bool | int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.1f}"
    return quoted(value, limit=_MAX_VALUE)


class TextFormatter(logging.Formatter):
    """``time level logger event key=value ...``; the traceback, if any, follows."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return line + "".join(f" {key}={_text(value)}" for key, value in fields_of(record).items())


def configure_logging(level: str = "INFO", log_format: LogFormat = "text") -> None:
    """Log to stderr, one event per line, as text or (``json``) one JSON object each."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                reserved_attrs=sorted(_STANDARD - {"asctime", "levelname", "name", "message"}),
            )
        )
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # aio-pika logs every reconnect attempt at length; ours are enough.
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    # A connection that cannot be made is said once, by whoever tried: the first by
    # ``broker.connection.connect``, a reconnect attempt by aio-pika.
    logging.getLogger("aiormq.connection").addFilter(_not_a_failed_connect)


def _not_a_failed_connect(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("error when creating transport")
