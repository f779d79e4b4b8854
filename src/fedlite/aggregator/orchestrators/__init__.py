"""Round orchestrators, one per module registering itself by name (``[rounds] mode``)."""

from fedlite.aggregator.orchestrators import fedbuff, sync  # noqa: F401  (they register)
from fedlite.aggregator.orchestrators.registry import Orchestrator, config_types, make, names

__all__ = ["Orchestrator", "config_types", "make", "names"]
