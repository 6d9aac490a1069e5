"""Outbox configuration: `settings` (from the environment) and the Celery `app`.

`app` is imported on first use, so `import config.settings` alone never builds the
Celery app (nor reads the process environment). `celery -A config` finds `config.app`.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "app":
        from config.celery import app

        return app
    raise AttributeError(f"module 'config' has no attribute {name!r}")


__all__ = ["app"]
