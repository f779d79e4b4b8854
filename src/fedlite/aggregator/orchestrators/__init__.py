"""Round orchestrators, one per module registering itself by name (``[rounds] mode``)."""

from fedlite.aggregator.orchestrators import sync  # noqa: F401  (registers "sync")
from fedlite.aggregator.orchestrators.registry import Orchestrator, make, names

__all__ = ["Orchestrator", "make", "names"]
