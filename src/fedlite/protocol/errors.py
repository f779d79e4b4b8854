"""The one exception family for anything malformed on the wire."""

from __future__ import annotations


class ProtocolError(ValueError):
    """A message that cannot be accepted; `reason` is a short machine-readable tag for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
