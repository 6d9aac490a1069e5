"""The store's own errors: what a request names that the database does not hold.

Each names the request field it is about (`field`), so a door can report it the way it
reports its own validation errors, without the store knowing about doors.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of the store's refusals; `field` is the request field at fault."""

    field: str = "request"


class InvalidAccountSettings(StoreError):
    """Account settings the store will not save; `errors` names each field and why."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        self.field = errors[0][0] if errors else "account"
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in errors))
