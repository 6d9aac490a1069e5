"""Outbox configuration: `settings` (from the environment) and the Celery `app`."""

from config.celery import app

__all__ = ["app"]
