"""Log set-up for every Outbox process: plain lines for people, JSON lines for machines.

`OUTBOX_LOG_JSON=1` gives one JSON object per line with the structured fields each log
call passes in `extra` (message_id, account, verdict, code...). Bodies and passwords are
never passed to a logger in the first place.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str)


class HideMessageContent(logging.Filter):
    """Celery's consumer logs the raw body and headers of a message it cannot run (an
    unregistered task name, an undecodable payload). For `outbox.enqueue` that is a whole
    email: keep the task name and id, drop the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "celery.worker.consumer.consumer" or not record.args:
            return True
        from celery.worker.consumer import consumer

        args = record.args if isinstance(record.args, tuple) else (record.args,)
        hidden = "<hidden by Outbox: message content is never logged>"
        if record.msg is consumer.UNKNOWN_TASK_ERROR and len(args) >= 4:
            headers = args[2] if isinstance(args[2], dict) else {}
            kept = {k: headers.get(k) for k in ("task", "id") if k in headers}
            record.args = (args[0], hidden, kept, args[3])
        elif record.msg is consumer.INVALID_TASK_ERROR and len(args) >= 2:
            record.args = (args[0], hidden)
        elif record.msg is consumer.MESSAGE_DECODE_ERROR and len(args) >= 5:
            record.args = (args[0], args[1], args[2], hidden, hidden)
        elif "body:" in str(record.msg) or any("body:" in str(a) for a in args):
            record.args = tuple(hidden for _ in args)
        return True


def configure_logging(*, json_lines: bool, level: str | int = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(HideMessageContent())
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; webhooks may carry tokens in their URLs.
    logging.getLogger("httpx").setLevel(logging.WARNING)
