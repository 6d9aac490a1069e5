"""The store's own errors: what a request names that the database does not hold.

Each names the request field it is about (`field`), so a door can report it the way it
reports its own validation errors, without the store knowing about doors.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of the store's refusals; `field` is the request field at fault."""

    field: str = "request"
