"""`RowError`: why one dataset row is refused (shared by the row-format modules)."""

from __future__ import annotations


class RowError(ValueError):
    """A row that is not one of the accepted formats; `reason` is shown to the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
