"""The failure of a secure-aggregation stage on the device (importable without the secure stages' crypto)."""

from __future__ import annotations


class StageFailed(Exception):
    """The secure round cannot go on for this device (it aborts the round)."""
