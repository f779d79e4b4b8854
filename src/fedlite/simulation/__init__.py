"""fedlite.simulation: federated runs from Python with the product's own agent, codec and aggregator code."""

from fedlite.simulation.api import run
from fedlite.simulation.history import History
from fedlite.simulation.options import Partition

__all__ = ["History", "Partition", "run"]
